"""Arrival processes and token sizes fitted to the Azure LLM inference traces.

The two traces in ``shared/data/timing`` (conversation and code services, one hour of
production requests each) give, per request, an arrival time, the context (prompt) size
and the generated (completion) size in tokens. The fit is non-parametric: we keep

* the inter-arrival gaps divided by their mean (mean 1), so that a client's renewal
  process at any rate has the burstiness (coefficient of variation, heavy tail, clumps of
  near-zero gaps) of real traffic, and
* the empirical distributions of context and generated tokens, sampled by index.

Everything here is deterministic given the files; :func:`timing_model` caches one fit per
process. The fitted summary (rates, gap CV, token quantiles) is what ``docs/simulator.md``
reports.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from distillguard.datasets import data_dir

TRACE_FILES = {"conv": "azure_llm_trace_conv.csv", "code": "azure_llm_trace_code.csv"}


@dataclass(frozen=True, slots=True)
class ServiceFit:
    """One service's fitted arrival and size distributions."""

    name: str
    requests: int
    span_s: float
    gaps: tuple[float, ...]           # inter-arrival gaps / mean gap, mean 1
    context_tokens: tuple[int, ...]
    generated_tokens: tuple[int, ...]

    @property
    def rate_per_s(self) -> float:
        return self.requests / self.span_s if self.span_s else 0.0

    def gap(self, rng: random.Random, mean_s: float) -> float:
        """One inter-arrival gap (seconds) of a renewal process with this burstiness."""
        return self.gaps[int(rng.random() * len(self.gaps))] * mean_s

    def completion_tokens(self, rng: random.Random, low_quantile: float = 0.0) -> int:
        """A generated length; ``low_quantile`` > 0 samples only the upper part (long
        answers such as elicited reasoning)."""
        n = len(self.generated_tokens)
        start = int(low_quantile * n)
        return max(1, self.generated_tokens[start + int(rng.random() * (n - start))])

    def context_size(self, rng: random.Random) -> int:
        return self.context_tokens[int(rng.random() * len(self.context_tokens))]

    def summary(self) -> dict[str, Any]:
        gaps = np.asarray(self.gaps)
        ctx = np.asarray(self.context_tokens)
        gen = np.asarray(self.generated_tokens)
        return {
            "service": self.name, "requests": self.requests,
            "span_s": round(self.span_s, 1), "rate_per_s": round(self.rate_per_s, 3),
            "gap_cv": round(float(gaps.std() / gaps.mean()), 3),
            "gap_p50_over_mean": round(float(np.quantile(gaps, 0.5)), 3),
            "gap_p99_over_mean": round(float(np.quantile(gaps, 0.99)), 3),
            "context_tokens_p50_p90_p99": [int(np.quantile(ctx, q)) for q in (.5, .9, .99)],
            "generated_tokens_p50_p90_p99": [int(np.quantile(gen, q)) for q in (.5, .9, .99)],
        }


def _parse_time(text: str) -> float:
    # "2023-11-16 18:15:46.6805900": seven fractional digits, more than fromisoformat takes
    head, _, frac = text.partition(".")
    return datetime.fromisoformat(head).timestamp() + float("0." + (frac or "0"))


def fit_service(name: str, path: Path) -> ServiceFit:
    times: list[float] = []
    ctx: list[int] = []
    gen: list[int] = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            times.append(_parse_time(row["TIMESTAMP"]))
            ctx.append(int(row["ContextTokens"]))
            gen.append(int(row["GeneratedTokens"]))
    t = np.sort(np.asarray(times))
    gaps = np.diff(t)
    gaps = gaps[gaps >= 0]
    norm = gaps / gaps.mean()
    return ServiceFit(name=name, requests=len(times), span_s=float(t[-1] - t[0]),
                      gaps=tuple(float(g) for g in np.sort(norm)),
                      context_tokens=tuple(sorted(ctx)), generated_tokens=tuple(sorted(gen)))


@dataclass(frozen=True, slots=True)
class TimingModel:
    conv: ServiceFit
    code: ServiceFit

    def summary(self) -> list[dict[str, Any]]:
        return [self.conv.summary(), self.code.summary()]


@lru_cache(maxsize=1)
def timing_model() -> TimingModel:
    folder = data_dir() / "timing"
    return TimingModel(conv=fit_service("conv", folder / TRACE_FILES["conv"]),
                       code=fit_service("code", folder / TRACE_FILES["code"]))
