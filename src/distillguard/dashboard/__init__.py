"""The analyst dashboard: server-rendered pages on the admin port, under ``/dashboard``.

Registered in :data:`distillguard.components.DEFAULT_COMPONENTS` as ``dashboard``; its
factory :func:`dashboard_extension` validates the ``dashboard`` settings section and
returns the routes. Pages (documented in ``docs/dashboard.md``):

    /dashboard/                 overview: traffic, denials, rate limits, review, campaigns
    /dashboard/campaigns        campaigns; /dashboard/campaigns/{id} one campaign
    /dashboard/accounts         account search; /dashboard/accounts/{id} one account
    /dashboard/review           review queue (confirm / dismiss / escalate)
    /dashboard/ledger           latest checkpoint, verification, inclusion proofs
    /dashboard/exchanges/{id}   one exchange (bodies where retention kept them)

Everything is rendered on the server (Jinja2 templates and inline SVG shipped in this
package); the only script is a small keyboard helper. Log-in takes the admin token and
sets a signed session cookie (:mod:`distillguard.dashboard.security`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distillguard.dashboard.settings import DashboardSettings, parse_dashboard_settings

if TYPE_CHECKING:
    from distillguard.config import Settings
    from distillguard.serve import Extension

__all__ = ["DashboardSettings", "dashboard_extension"]


def dashboard_extension(settings: Settings) -> Extension | None:
    from distillguard.dashboard.app import Dashboard
    from distillguard.serve import Extension

    options = parse_dashboard_settings(settings.extensions.get("dashboard"))
    if not options.enabled:
        return None
    dashboard = Dashboard(settings, options)
    return Extension(stages=[dashboard.sources.index, dashboard.lifecycle],
                     admin_routes=dashboard.routes())
