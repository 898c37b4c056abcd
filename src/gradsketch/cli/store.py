"""``gradsketch store verify|repair``: check a gradient store on disk, and make damage cheap to recover."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import usage_errors

app = typer.Typer(help="Check and repair a gradient/feature store directory.", no_args_is_help=True,
                  rich_markup_mode=None)


@app.command("verify")
def verify(path: Path = typer.Argument(..., help="store directory (the one holding manifest.json, e.g. "
                                                 "OUT/store/features_0)")) -> None:
    """Check every file of the store: the manifest, the data file, and each chunk's marker and sha256.
    Prints one line per finding; exit status 0 when nothing is damaged (missing chunks are not damage: a fit
    computes them), 1 when something is."""
    from ..store.repair import check_store

    with usage_errors(("path",)):
        report = check_store(path)
    for line in report.lines():
        typer.echo(line)
    if not report.ok:
        typer.echo(f"to recover: gradsketch store repair {path}", err=True)
        raise typer.Exit(1)


@app.command("repair")
def repair(path: Path = typer.Argument(..., help="store directory (the one holding manifest.json)")) -> None:
    """Mark the damaged chunks of the store missing, so that rerunning the same fit (the same Python call or
    `gradsketch attribute` command as before) recomputes only them. A lost chunks/ directory or data file
    is recreated empty (every chunk is then recomputed). A damaged manifest is not repairable: delete the
    store and refit. Exit status 0 when the store is usable afterwards, 1 when it is not."""
    from ..store.repair import repair_store

    with usage_errors(("path",)):
        report = repair_store(path)
    for line in report.lines():
        typer.echo(line)
    if not report.ok:
        raise typer.Exit(1)
    if report.missing:
        typer.echo(f"rerun the fit that wrote this store: it recomputes the {len(report.missing)} missing chunk(s) "
                   "and reuses the rest")
