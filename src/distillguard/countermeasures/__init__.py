"""Output countermeasures: reasoning protection, leak handling, per-account fingerprints.

See docs/countermeasures.md. The gateway hook is :class:`distillguard.pipeline.ResponseFilter`;
:func:`component` is the factory listed in :mod:`distillguard.components`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from distillguard.countermeasures.filter import CountermeasureFilter
from distillguard.countermeasures.fingerprint import Fingerprinter
from distillguard.countermeasures.settings import CountermeasuresSettings, parse_settings

if TYPE_CHECKING:
    from distillguard.config import Settings
    from distillguard.serve import Extension

log = logging.getLogger("distillguard.countermeasures")

__all__ = ["CountermeasureFilter", "CountermeasuresSettings", "Fingerprinter", "component",
           "fingerprinter_from"]


def fingerprinter_from(cm: CountermeasuresSettings) -> Fingerprinter | None:
    fs = cm.fingerprint
    if not fs.enabled:
        return None
    secret = fs.resolved_secret()
    if secret is None:
        return None
    return Fingerprinter(secret, global_share=fs.global_share)


def component(settings: Settings) -> Extension | None:
    """Factory for :data:`distillguard.components.DEFAULT_COMPONENTS`."""
    from distillguard.serve import Extension

    cm = parse_settings(settings.extensions.get("countermeasures"))
    if not cm.enabled:
        return None
    fingerprinter = fingerprinter_from(cm)
    if fingerprinter is None and cm.fingerprint.enabled:
        log.info("response fingerprinting is off: set countermeasures.fingerprint.secret "
                 "or %s", cm.fingerprint.secret_env)
    return Extension(response_filters=[CountermeasureFilter(cm, fingerprinter)])
