"""The default components of a running gateway, in pipeline order: one explicit list.

Each entry names a factory ``module:function`` that takes the
:class:`~distillguard.config.Settings` and returns an
:class:`~distillguard.serve.Extension` (request checks, stages, admin routes) or ``None``
when the component is switched off in the settings. Factories validate their own settings
section and raise :class:`~distillguard.errors.ConfigError` at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distillguard.config import Settings
    from distillguard.serve import Extension

DEFAULT_COMPONENTS: list[tuple[str, str]] = [
    ("ledger", "distillguard.ledger.stage:component"),
    ("policy", "distillguard.policy.component:component"),
    ("detect", "distillguard.detect:component"),
    ("countermeasures", "distillguard.countermeasures:component"),
    ("dashboard", "distillguard.dashboard:dashboard_extension"),
    ("sharing", "distillguard.sharing:component"),
]


def load_extensions(settings: Settings) -> list[Extension]:
    out = []
    for _name, target in DEFAULT_COMPONENTS:
        module, _, attr = target.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        extension = factory(settings)
        if extension is not None:
            out.append(extension)
    return out
