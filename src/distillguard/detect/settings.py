"""The ``detect`` settings section, validated at start-up.

```yaml
detect:
  enabled: true          # the online detection stage (background, off the request path)
  calibration: null      # calibration file; null: the one shipped with distillguard
  tick_seconds: 300      # evaluate links and risk every this many seconds of traffic
  runs_in: process       # the detector's own process; thread: the gateway's (a worker
                         # thread); follower: `distillguard detect follow`, one for every
                         # replica, fed through a Redis stream (detect.stream)
  stream:                # used by runs_in: follower
    url: redis://127.0.0.1:6379/0
    name: distillguard:detect:features
    max_length: 1000000  # entries kept (trimmed approximately)
    buffer: 100000       # entries a replica holds while Redis cannot be reached
    lease_seconds: 10    # of several followers, the lease holder writes; a standby
                         # takes over within 4/3 of this after the holder dies
```
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from distillguard.config import validate_section
from distillguard.errors import ConfigError

# Where the online detector runs (see detect/online.py and detect/stream.py).
RunsIn = Literal["process", "thread", "follower"]
RUNS_IN: tuple[str, ...] = get_args(RunsIn)
# The longest evaluation tick (a day), in the settings file and on the command line.
MAX_TICK_SECONDS = 86_400.0


class StreamSettings(BaseModel):
    """The Redis stream that carries every replica's features to the follower."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = None
    name: str = Field("distillguard:detect:features", min_length=1)
    max_length: int = Field(1_000_000, ge=1_000)
    # Entries a replica holds, in order, while Redis cannot be reached.
    buffer: int = Field(100_000, ge=1)
    # Of several followers, only the holder of a lease this long writes (stream.py).
    lease_seconds: float = Field(10.0, ge=1.0, le=600.0)


class DetectSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    calibration: str | None = None
    tick_seconds: float = Field(300.0, gt=0.0, le=MAX_TICK_SECONDS)
    runs_in: RunsIn = "process"
    stream: StreamSettings = Field(default_factory=StreamSettings)


def parse_settings(section: Any) -> DetectSettings:
    settings = validate_section(DetectSettings, section, "detect")
    if settings.runs_in == "follower" and not settings.stream.url:
        raise ConfigError("invalid configuration:\n  detect.stream.url: a Redis URL is "
                          "needed for detect.runs_in: follower")
    return settings
