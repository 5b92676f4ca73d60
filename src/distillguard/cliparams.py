"""Checks of numeric command-line options, shared by the commands.

A float option takes ``nan``, ``inf`` and negative values as click parses them (and
click's own ``FloatRange`` lets NaN through, since every comparison with it is false); a
run that divides by a zero tick, prints a negative rate or tests at a significance level
of 5 is the result. :func:`positive` and :func:`within` refuse such values before the
command runs, naming the option and the range it takes. :data:`PORT` is the range the
settings allow a port.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import click

Callback = Callable[[click.Context, click.Parameter, float | None], float | None]

# As the settings' ports (server.port, server.admin_port): 0 asks the system for a free one.
PORT = click.IntRange(0, 65_535)


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


def within_problem(value: float, low: float, high: float, *, low_open: bool = False,
                   high_open: bool = False, unit: str = "") -> str | None:
    """Why ``value`` is not in the interval from ``low`` to ``high`` (each end open or
    closed); None when it is. NaN is never in it."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if above and below and math.isfinite(value):
        return None
    interval = (f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                + (f" {unit}" if unit else ""))
    return f"{value} is not in {interval}"


def within(low: float, high: float, *, low_open: bool = False, high_open: bool = False,
           unit: str = "") -> Callback:
    """A click callback that refuses a value outside the interval (NaN included)."""
    def check(_ctx: click.Context, _param: click.Parameter, value: float | None
              ) -> float | None:
        if value is not None and (problem := within_problem(
                value, low, high, low_open=low_open, high_open=high_open, unit=unit)):
            raise click.BadParameter(problem)
        return value
    return check
