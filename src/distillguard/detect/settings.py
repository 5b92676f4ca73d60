"""The ``detect`` settings section, validated at start-up.

```yaml
detect:
  enabled: true          # the online detection stage (background, off the request path)
  calibration: null      # calibration file; null: the one shipped with distillguard
  tick_seconds: 300      # evaluate links and risk every this many seconds of traffic
  runs_in: process       # the detector's own process; thread: the gateway's (a worker thread)
```
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from distillguard.config import validate_section

# Where the online detector runs (see detect/online.py).
RunsIn = Literal["process", "thread"]
RUNS_IN: tuple[str, ...] = get_args(RunsIn)


class DetectSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    calibration: str | None = None
    tick_seconds: float = Field(300.0, gt=0.0, le=86_400.0)
    runs_in: RunsIn = "process"


def parse_settings(section: Any) -> DetectSettings:
    return validate_section(DetectSettings, section, "detect")
