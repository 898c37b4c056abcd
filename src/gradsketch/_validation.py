"""Argument checks shared by every gradsketch module: one message form, one argument order.

Every check takes ``(value, name, ...)`` and returns the value converted to its canonical type, or raises
``TypeError`` (the wrong kind of object) / ``ValueError`` (the right kind, a bad value) with the message
``"<name>: expected <what>, got <what arrived>"``.

>>> check_int(3, "k", minimum=1)
3
>>> check_real(float("nan"), "damping", minimum=0.0)
Traceback (most recent call last):
    ...
ValueError: damping: expected a finite number, got nan
>>> check_choice("cg", "solver", ("explicit", "cg", "lissa"))
'cg'
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, Literal, overload

__all__ = ["check_int", "check_real", "check_choice", "check_bool", "check_callable", "check_type",
           "describe"]


def describe(value: Any) -> str:
    """``"<type> (<repr>)"`` shortened to 80 characters: how a bad value is shown in messages.

    >>> describe("abc")
    "str ('abc')"
    """
    r = repr(value)
    if len(r) > 80:
        r = r[:77] + "..."
    return f"{type(value).__name__} ({r})"


@overload
def check_int(value: Any, name: str, minimum: int | None = ..., maximum: int | None = ...,
              allow_none: Literal[False] = ...) -> int: ...
@overload
def check_int(value: Any, name: str, minimum: int | None = ..., maximum: int | None = ...,
              allow_none: bool = ...) -> int | None: ...
def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None,
              allow_none: bool = False) -> int | None:
    """An integer (``int`` or a numpy integer, not a bool, not a float) in ``[minimum, maximum]``.

    >>> check_int(4, "d")
    4
    >>> check_int(2.7, "k")
    Traceback (most recent call last):
        ...
    TypeError: k: expected an integer, got float (2.7)
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {describe(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: expected an integer <= {maximum}, got {value}")
    return value


@overload
def check_real(value: Any, name: str, minimum: float | None = ..., maximum: float | None = ...,
               min_inclusive: bool = ..., max_inclusive: bool = ..., allow_none: Literal[False] = ...
               ) -> float: ...
@overload
def check_real(value: Any, name: str, minimum: float | None = ..., maximum: float | None = ...,
               min_inclusive: bool = ..., max_inclusive: bool = ..., allow_none: bool = ...
               ) -> float | None: ...
def check_real(value: Any, name: str, minimum: float | None = None, maximum: float | None = None,
               min_inclusive: bool = True, max_inclusive: bool = True, allow_none: bool = False
               ) -> float | None:
    """A finite real number (not a bool) in the given interval, returned as ``float``.

    >>> check_real(-1, "damping", minimum=0.0)
    Traceback (most recent call last):
        ...
    ValueError: damping: expected a number >= 0.0, got -1.0
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if minimum is not None and (value < minimum or (value == minimum and not min_inclusive)):
        rel = ">=" if min_inclusive else ">"
        raise ValueError(f"{name}: expected a number {rel} {minimum}, got {value}")
    if maximum is not None and (value > maximum or (value == maximum and not max_inclusive)):
        rel = "<=" if max_inclusive else "<"
        raise ValueError(f"{name}: expected a number {rel} {maximum}, got {value}")
    return value


def check_choice(value: Any, name: str, choices: Iterable[str]) -> str:
    """One of a fixed set of strings.

    >>> check_choice("fast", "mode", ("explicit", "implicit"))
    Traceback (most recent call last):
        ...
    ValueError: mode: expected one of ('explicit', 'implicit'), got 'fast'
    """
    choices = tuple(choices)
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected one of {choices}, got {describe(value)}")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """``True`` or ``False`` (not 0/1).

    >>> check_bool(True, "progress")
    True
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {describe(value)}")
    return value


def check_callable(value: Any, name: str, what: str = "a callable") -> Any:
    """A callable; ``what`` describes its signature in the message.

    >>> check_callable(len, "fn") is len
    True
    """
    if not callable(value):
        raise TypeError(f"{name}: expected {what}, got {describe(value)}")
    return value


def check_type(value: Any, name: str, types: type | tuple[type, ...], what: str | None = None) -> Any:
    """An instance of ``types``; ``what`` names the expected kind in the message.

    >>> check_type([1], "sizes", (list, tuple))
    [1]
    """
    if not isinstance(value, types):
        if what is None:
            ts = types if isinstance(types, tuple) else (types,)
            what = " or ".join(t.__name__ for t in ts)
        raise TypeError(f"{name}: expected {what}, got {describe(value)}")
    return value


def check_count_or_fraction(value: Any, name: str) -> int | float:
    """A number of examples (an int ≥ 1) or a fraction of them (a float in (0, 1]).

    >>> check_count_or_fraction(250, "size"), check_count_or_fraction(0.25, "size")
    (250, 0.25)
    >>> check_count_or_fraction(1.5, "size")
    Traceback (most recent call last):
    ...
    ValueError: size: expected a fraction in (0, 1] or an int >= 1 (examples), got 1.5
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected an int (examples) or a float fraction in (0, 1], got {describe(value)}")
    if (isinstance(value, float) and not 0.0 < value <= 1.0) or (isinstance(value, int) and value < 1):
        raise ValueError(f"{name}: expected a fraction in (0, 1] or an int >= 1 (examples), got {value}")
    return value
