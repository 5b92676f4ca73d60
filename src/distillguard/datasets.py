"""Locating and reading the real prompt and timing data sets (``shared/data``).

The data folder is found from ``DISTILLGUARD_DATA``, else ``../shared/data`` relative to
the working directory or to the source checkout. See docs/data.md for sources and licenses.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson


def data_dir() -> Path:
    candidates = []
    if os.environ.get("DISTILLGUARD_DATA"):
        candidates.append(Path(os.environ["DISTILLGUARD_DATA"]))
    here = Path(__file__).resolve()
    candidates += [Path.cwd() / "../shared/data", Path.cwd() / "shared/data",
                   here.parents[3] / "shared/data", here.parents[2] / "../shared/data"]
    for candidate in candidates:
        if (candidate / "README.md").exists():
            return candidate.resolve()
    raise FileNotFoundError("prompt data not found; set DISTILLGUARD_DATA to shared/data")


def benign_prompts(limit: int | None = None) -> list[str]:
    folder = data_dir() / "benign"
    out: list[str] = []
    for name in ("arena_hard_v0.1_questions.jsonl", "oasst_prompt_lottery_en_250.jsonl"):
        path = folder / name
        if not path.exists():
            continue
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            rec = orjson.loads(line)
            text = rec if isinstance(rec, str) else rec.get("prompt") or rec.get("text") or ""
            if isinstance(text, str) and text.strip():
                out.append(text)
    return out[:limit] if limit else out
