"""The ``gradsketch`` command line: one typer app that gathers each application's commands.

``gradsketch demo``, ``gradsketch attribute`` (attribution), ``gradsketch spectrum``,
``gradsketch intrinsic-dim``, ``gradsketch bench sketches`` and ``gradsketch info``.
"""

from __future__ import annotations

import importlib
import json

import typer

app = typer.Typer(
    help="Sketch gradients and Hessian-vector products of PyTorch models: attribution, spectra, "
         "intrinsic dimension.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# (module, name under which its commands appear; None merges them at the top level)
_SUBAPPS = [
    ("gradsketch.cli_attribution", None),
    ("gradsketch.cli_spectrum", None),
    ("gradsketch.cli_intrinsic", None),
    ("gradsketch.cli_bench", "bench"),
]


def _register() -> None:
    for module, name in _SUBAPPS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:  # an application not shipped in this build
            if err.name != module:
                raise
            continue
        if name is None:  # merge the sub-app's commands at the top level (its own callback is not needed)
            app.registered_commands.extend(mod.app.registered_commands)
        else:
            app.add_typer(mod.app, name=name, help=(mod.__doc__ or "").strip().split("\n")[0] or None)


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


_register()


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
