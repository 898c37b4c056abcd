"""``gradsketch bench``: parse the options, call :func:`gradsketch.bench.speed_table`."""

from __future__ import annotations

import typer

from ._common import usage_errors

app = typer.Typer(help="Benchmarks.", no_args_is_help=True, rich_markup_mode=None)


@app.command()
def sketches(quick: bool = typer.Option(False, "--quick", help="small sizes (n = 2^14, 2^16; d = 2^8, 2^10)"),
             log2_n: list[int] = typer.Option(None, "--log2-n", help="log2 of the input sizes"),
             log2_d: list[int] = typer.Option(None, "--log2-d", help="log2 of the sketch sizes"),
             variant: list[str] = typer.Option(None, "--variant", help="restrict to these variants"),
             repeats: int = typer.Option(3, min=1, help="timed repeats per case (median)"),
             memory: bool = typer.Option(True, help="measure peak extra resident memory")) -> None:
    """Time every sketch kind as a multiple of reading the batch once (and its peak extra memory)."""
    from ..bench import speed_table

    ns = list(log2_n or []) or ([14, 16] if quick else [20, 22, 24])
    ds = list(log2_d or []) or ([8, 10] if quick else [10, 12, 14])
    with usage_errors(("log2_n", "log2_d")):
        if min(ns) < 1 or max(ns) > 30 or min(ds) < 1 or max(ds) > 30:
            raise ValueError(f"log2_n, log2_d: expected integers in [1, 30], got {ns} and {ds}")
        speed_table(ns, ds, variant or None, repeats=repeats if not quick else max(repeats, 5), memory=memory,
                    echo=typer.echo)
