"""Declarative argument checks: one table per function, one error voice for the package.

Modelled on scikit-learn's ``_parameter_constraints``: a function declares what
each argument may be, once, and :func:`check_params` raises the same one-line
error everywhere::

    _CONSTRAINTS = {"z": [Interval(float, 0, None)], "min_layers": [Interval(int, 1, None)], "split": [Options("valid", "test")]}

    def diagnose(ds, *, z=2.0, min_layers=2, split="valid"):
        check_params(_CONSTRAINTS, z=z, min_layers=min_layers, split=split)

An argument passes when it satisfies any one of its constraints; ``None`` in the
list allows ``None``. The error names the argument, what it must be, what was
received and, for options, the choices:
``min_layers must be an integer >= 1; got 0``. The two text helpers of the
package's messages live here too: :func:`choices` and :func:`shape_text`.

This module imports nothing outside the standard library.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Interval", "Options", "check_params", "choices", "shape_text"]


def choices(values: Sequence[object], limit: int = 12) -> str:
    """``a, b, c`` for error messages, shortened for long lists.

    Example:
        >>> choices(range(30), limit=4)
        '0, 1, ..., 29 (30 in all)'
    """
    items = [str(v) for v in values]
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[: limit - 2]) + f", ..., {items[-1]} ({len(items)} in all)"


def shape_text(shape: Sequence[int]) -> str:
    """A per-example shape as the package writes it (stores, plans, messages): ``64x7x7``; ``scalar`` for ``()``.

    Example:
        >>> shape_text((64, 7, 7))
        '64x7x7'
    """
    return "x".join(str(s) for s in shape) if len(shape) else "scalar"



@dataclass(frozen=True)
class Interval:
    """A real (``float``) or whole (``int``) number between ``low`` and ``high`` (``None``: unbounded).

    Booleans are never numbers here, and a ``float`` interval refuses NaN and infinities.
    ``closed`` says which ends belong to the interval: ``"both"``, ``"left"``, ``"right"``
    or ``"neither"``.
    """

    kind: type
    low: float | None = None
    high: float | None = None
    closed: str = "both"

    def accepts(self, value: object) -> bool:
        if isinstance(value, bool):
            return False
        if self.kind is int:
            if not isinstance(value, numbers.Integral):
                return False
        elif not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            return False
        if self.low is not None:
            if value < self.low or (value == self.low and self.closed in ("right", "neither")):
                return False
        if self.high is not None:
            if value > self.high or (value == self.high and self.closed in ("left", "neither")):
                return False
        return True

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        left = ">=" if self.closed in ("both", "left") else ">"
        right = "<=" if self.closed in ("both", "right") else "<"
        if self.low is not None and self.high is not None:
            lo = "[" if left == ">=" else "("
            hi = "]" if right == "<=" else ")"
            return f"{what} in {lo}{self.low}, {self.high}{hi}"
        if self.low is not None:
            return f"{what} {left} {self.low}"
        if self.high is not None:
            return f"{what} {right} {self.high}"
        return what


class Options:
    """One of a fixed set of values (compared with ``==``)."""

    def __init__(self, *values: object):
        self.values = tuple(values)

    def accepts(self, value: object) -> bool:
        return any(value == v and type(value) is type(v) for v in self.values)

    def describe(self) -> str:
        return "one of " + choices([repr(v) for v in self.values])


def check_params(constraints: Mapping[str, Sequence[object]], **values: object) -> None:
    """Raise ``ValueError`` for the first argument that satisfies none of its constraints.

    Args:
        constraints: ``{name: [constraint, ...]}``; a constraint is an :class:`Interval`,
            :class:`Options`, a type (``isinstance``) or ``None`` (the value may be ``None``).
        **values: the arguments to check, by name; every name must be in ``constraints``.

    Example:
        >>> check_params({"k": [Interval(int, 1, None)]}, k=0)
        Traceback (most recent call last):
        ValueError: k must be an integer >= 1; got 0
    """
    for name, value in values.items():
        allowed = constraints[name]
        if any(_satisfies(c, value) for c in allowed):
            continue
        described = [_describe(c) for c in allowed]
        raise ValueError(f"{name} must be {' or '.join(described)}; got {value!r}")


def _satisfies(constraint: object, value: object) -> bool:
    if constraint is None:
        return value is None
    if isinstance(constraint, type):
        return isinstance(value, constraint) and not (isinstance(value, bool) and constraint is not bool)
    return constraint.accepts(value)


def _describe(constraint: object) -> str:
    if constraint is None:
        return "None"
    if isinstance(constraint, type):
        return f"a {constraint.__name__}"
    return constraint.describe()
