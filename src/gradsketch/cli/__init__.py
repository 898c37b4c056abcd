"""The ``gradsketch`` command line: commands that parse their options and call the library.

``gradsketch demo``, ``attribute``, ``spectrum``, ``intrinsic-dim``, ``bench sketches``, ``data fetch|list``,
``store verify|repair`` and ``info``. Every command that runs on a user's model takes it through the same entry point,
``module:function`` returning a :class:`gradsketch.Entry` (loaded by :func:`gradsketch.entry.load_entry`, the
one loader). Options are checked before any work starts; bad input is one ``Error:`` line with exit
status 2. The pipelines live in the library: :mod:`gradsketch.attribution.pipeline`,
:mod:`gradsketch.spectrum.pipeline`, :mod:`gradsketch.intrinsic.pipeline`, :mod:`gradsketch.bench`.
"""

from __future__ import annotations

import json

import typer

from . import bench, data, store
from .attribute import attribute, demo
from .intrinsic import intrinsic_dim
from .spectrum import spectrum

__all__ = ["app", "main"]

app = typer.Typer(
    help="Sketch gradients and Hessian-vector products of PyTorch models: attribution, spectra, "
         "intrinsic dimension.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,  # plain click errors: one "Error: ..." line, no boxes
)

app.command("demo")(demo)
app.command("attribute")(attribute)
app.command("spectrum")(spectrum)
app.command("intrinsic-dim")(intrinsic_dim)
app.add_typer(bench.app, name="bench", help="Benchmarks (sketch speed table).")
app.add_typer(data.app, name="data", help="Fetch data sets (the only step that downloads).")
app.add_typer(store.app, name="store", help="Check and repair a gradient store (verify, repair).")


@app.command()
def info() -> None:
    """Print the versions, the available sketch kinds and the compute devices."""
    import torch

    import gradsketch
    from gradsketch.sketch import KINDS, PRECONDITIONERS
    from gradsketch.sketch._native import status as native_status

    typer.echo(json.dumps({
        "gradsketch": gradsketch.__version__,
        "torch": torch.__version__,
        "sketch_kinds": sorted(KINDS),
        "preconditioners": list(PRECONDITIONERS),
        "cuda": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        "native_kernels": native_status(),
    }, indent=2))


def _init_distributed_from_env() -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), initialise the default process group
    (NCCL with CUDA, else gloo) so that the library's calls share the work; returns whether it did."""
    import os

    import torch

    from ..linalg.distributed import init_from_env

    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return init_from_env()


def main() -> None:
    """Console-script entry point (``gradsketch``); under ``torchrun`` every rank runs the command and the
    ranks share the work (``torchrun --nproc_per_node N -m gradsketch.cli attribute ...``)."""
    started = _init_distributed_from_env()
    try:
        app()
    finally:
        if started:
            import torch.distributed as dist

            try:
                dist.barrier()  # no rank tears the group down while rank 0 still writes the outputs
            finally:
                dist.destroy_process_group()


if __name__ == "__main__":
    main()
