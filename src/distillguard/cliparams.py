"""Checks of numeric command-line options, shared by the commands.

A float option takes ``nan``, ``inf`` and negative values as click parses them; a run
that divides by a zero tick or prints a negative rate is the result. :func:`positive`
refuses them before the command runs, naming the option and the range it takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import click

Callback = Callable[[click.Context, click.Parameter, float | None], float | None]


def positive_problem(value: float, upper: float = math.inf, unit: str = "seconds"
                     ) -> str | None:
    """Why ``value`` is not a number in (0, ``upper``] of ``unit`` (None when it is)."""
    if 0.0 < value <= upper and value < math.inf:      # false for NaN too
        return None
    if upper < math.inf:
        return f"{value} is not in (0, {upper:g}] {unit}"
    return f"{value} is not a positive number of {unit}"


def positive(upper: float = math.inf, unit: str = "seconds") -> Callback:
    """A click callback that refuses a value outside (0, ``upper``] (NaN included)."""
    def check(_ctx: click.Context, _param: click.Parameter, value: float | None
              ) -> float | None:
        if value is not None and (problem := positive_problem(value, upper, unit)):
            raise click.BadParameter(problem)
        return value
    return check
