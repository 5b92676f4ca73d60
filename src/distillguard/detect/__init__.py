"""Distillation campaign detection: per exchange, per account, across accounts.

See docs/detection.md. The modules, one per concern:

* :mod:`.features`: per-exchange features (template skeleton and SimHash, signals,
  capability, depth, harvest parameters, client network);
* :mod:`.sketches`: per-account behaviour in bounded memory;
* :mod:`.linking`: cross-account links (templates, lockstep, payment, /24, sign-up);
* :mod:`.graph`: the account graph and its communities (Louvain);
* :mod:`.scoring`: risk from the account's and its community's evidence;
* :mod:`.calibration`: the fitted model and the threshold from a target FPR;
* :mod:`.evidence`: human-readable reasons;
* :mod:`.engine`: the detector both paths share;
* :mod:`.reader`: the trace in time order on DuckDB, as feature rows (the reader process);
* :mod:`.batch`: the batch path (``distillguard detect``);
* :mod:`.online`: the background pipeline stage and the verdict tables;
* :mod:`.worker`: the online detector's own process.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from distillguard.detect.settings import parse_settings

if TYPE_CHECKING:
    from distillguard.config import Settings
    from distillguard.serve import Extension

__all__ = ["component"]


def component(settings: Settings) -> Extension | None:
    """Factory for :data:`distillguard.components.DEFAULT_COMPONENTS`: the online stage."""
    # Imported here: the detector's modules (datasketch, scipy) cost about a second, which
    # the trace reader process, importing only the feature modules, does not pay.
    from distillguard.detect.calibration import Calibration
    from distillguard.detect.online import DetectionStage
    from distillguard.serve import Extension

    section = parse_settings(settings.extensions.get("detect"))
    if not section.enabled:
        return None
    calibration = Calibration.read(section.calibration)   # fails fast on a bad file
    if settings.server.replica_id and section.runs_in != "follower":
        logging.getLogger("distillguard.detect").warning(
            "server.replica_id is set but detect.runs_in is %s: this replica's detector "
            "sees only the traffic it serves, and the verdict tables keep the latest row "
            "any replica wrote; run one 'distillguard detect follow' for every replica "
            "(detect.runs_in: follower, docs/detection.md)", section.runs_in)
    return Extension(stages=[DetectionStage(settings.state.url, calibration,
                                            tick_seconds=section.tick_seconds,
                                            runs_in=section.runs_in,
                                            stream=section.stream)])
