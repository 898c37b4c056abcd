"""Regenerate BENCHMARKS.md from benchmarks/summary.md and the per-area results in benchmarks/results/."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
ORDER = ["sketch_speed", "sketch_quality", "grads", "attribution", "spectrum", "intrinsic"]


def main() -> None:
    parts = [(ROOT / "summary.md").read_text().rstrip(), "", "# Details"]
    for name in ORDER:
        f = ROOT / "results" / f"{name}.md"
        if not f.exists():
            continue
        text = f.read_text().rstrip()
        # demote headings one level so each results file is a section of this document
        lines = [("#" + ln) if ln.startswith("#") else ln for ln in text.splitlines()]
        parts += ["", f"<!-- from benchmarks/results/{name}.md -->", *lines]
    (ROOT.parent / "BENCHMARKS.md").write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
