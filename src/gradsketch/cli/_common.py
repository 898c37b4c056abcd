"""What every command shares: bad input becomes a one-line usage error (exit status 2), never a traceback."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import typer

# typer >= 0.20 carries its own copy of click, whose exceptions are the ones its main loop handles: take the
# classes from typer itself so that this works with either
UsageError: type[Exception] = typer.BadParameter.__mro__[1]
ClickException: type[Exception] = typer.BadParameter.__mro__[2]
try:
    from typer._click.globals import get_current_context  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import get_current_context  # type: ignore[no-redef]

__all__ = ["usage_errors", "command_line", "option_hint"]

_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_, ]*):")


def option_hint(message: str, options: Any = ()) -> str | None:
    """``--name`` for a message ``"name: expected ..."`` when ``name`` is one of ``options``."""
    m = _NAME.match(message)
    if not m:
        return None
    names = [n.strip() for n in m.group(1).split(",")]
    hits = [f"--{n.replace('_', '-')}" for n in names if n in options]
    return "/".join(hits) or None


@contextlib.contextmanager
def usage_errors(options: Any = (), entry_hint: str = "--entry") -> Iterator[None]:
    """Turn ValueError / TypeError (bad options, a bad entry point, data the model cannot take, a store that
    holds other rows) into a click usage error: one ``Error: ...`` line and exit status 2."""
    from ..attribution import DataMismatchError, StoreMismatchError

    try:
        yield
    except (ClickException, typer.Exit, typer.Abort):
        raise
    except StoreMismatchError as e:
        raise typer.BadParameter(_one_line(e), param_hint="--store/--out") from e
    except DataMismatchError as e:
        raise typer.BadParameter(_one_line(e), param_hint=entry_hint) from e
    except FileNotFoundError as e:  # e.g. data that must be fetched first
        raise UsageError(_one_line(e)) from e
    except (ValueError, TypeError) as e:
        msg = _one_line(e)
        hint = entry_hint if msg.startswith("entry:") else option_hint(msg, options)
        if hint:
            raise typer.BadParameter(msg, param_hint=hint) from e
        raise UsageError(msg) from e


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def command_line() -> str:
    """The running command with the options given (for provenance in reports)."""
    ctx = get_current_context(silent=True)
    if ctx is None:
        return "gradsketch"
    parts = [ctx.command_path]
    for name, value in ctx.params.items():
        src = ctx.get_parameter_source(name)
        if src is None or src.name == "DEFAULT" or value is None:
            continue
        opt = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(opt if value else f"--no-{name.replace('_', '-')}")
        elif name == "entry" and not any(p.name == name and type(p).__name__.endswith("Option")
                                         for p in ctx.command.params):
            parts.append(str(value))
        else:
            parts += [opt, str(value)]
    return " ".join(parts)
