"""Rebuild BENCHMARKS.md: the one-page summary (benchmarks/summary.md) and a list of the per-area results files
(benchmarks/results/*.md, each with its first line as title), which keep every table and setting."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
ORDER = ["sketch_speed", "sketch_quality", "grads", "attribution", "spectrum", "intrinsic"]


def main() -> None:
    parts = [(ROOT / "summary.md").read_text().rstrip(), "", "## Details", ""]
    names = ORDER + sorted(p.stem for p in (ROOT / "results").glob("*.md") if p.stem not in ORDER)
    for name in names:
        f = ROOT / "results" / f"{name}.md"
        if not f.exists():
            continue
        title = f.read_text().splitlines()[0].lstrip("# ").strip()
        parts.append(f"- [{title}](benchmarks/results/{name}.md)")
    (ROOT.parent / "BENCHMARKS.md").write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
