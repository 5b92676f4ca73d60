"""Threat-intelligence sharing: STIX 2.1 bundles and a TAXII 2.1 server and client.

* Export (:mod:`.export`): confirmed campaigns as STIX 2.1 bundles, account identifiers
  pseudonymised per partner (:mod:`.pseudonym`), from files or the running system
  (:mod:`.inputs`, :mod:`.evidence`).
* Import (:mod:`.validate`, :mod:`.store`): partner bundles validated, kept with their
  provenance, indicators stored with expiry (:mod:`.indicators`).
* Policy inputs (:mod:`.matcher`): the ``sharing`` request check flags or blocks traffic
  matching partner indicators, raises the risk of matching accounts and opens review items.
* TAXII 2.1 (:mod:`.taxii`, :mod:`.taxiistore`, :mod:`.client`): a server on the admin
  port with per-partner credentials and collection permissions, and push / poll of a
  partner's server.

Registered in :data:`distillguard.components.DEFAULT_COMPONENTS` as ``sharing``; the
``sharing`` settings section is described in :mod:`.settings` and ``docs/sharing.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distillguard.sharing.settings import SharingSettings, parse_sharing_settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from distillguard.config import Settings
    from distillguard.serve import Extension
    from distillguard.store import StateStore

__all__ = ["SharingRuntime", "SharingSettings", "component", "parse_sharing_settings"]


class SharingRuntime:
    """The state store connection the check, the stage and the TAXII routes share."""

    def __init__(self, settings: Settings, options: SharingSettings) -> None:
        from distillguard.sharing.matcher import IndicatorMatcher, MatchStage, SharingCheck

        self.settings = settings
        self.options = options
        self.state: StateStore | None = None
        self.matcher = IndicatorMatcher(options, self.engine)
        self.stage = MatchStage(self.matcher)
        self.check = SharingCheck(self.matcher, lifecycle=self)

    def engine(self) -> AsyncEngine:
        if self.state is None:
            raise RuntimeError("the sharing component is not started")
        return self.state.engine  # type: ignore[attr-defined,no-any-return]

    async def start(self) -> None:
        from distillguard.sharing import store, taxiistore
        from distillguard.sharing.matcher import Refresher
        from distillguard.store import open_state_store

        self.state = open_state_store(self.settings.state.url)
        await self.state.migrate()
        await store.create_schema(self.engine())
        await taxiistore.create_schema(self.engine())
        self.refresher = Refresher(self.matcher, self.stage)
        await self.refresher.start()

    async def close(self) -> None:
        refresher = getattr(self, "refresher", None)
        if refresher is not None:
            await refresher.close()
        if self.state is not None:
            await self.state.close()
            self.state = None


def component(settings: Settings) -> Extension | None:
    from starlette.routing import BaseRoute

    from distillguard.serve import Extension
    from distillguard.sharing.taxii import TaxiiServer

    options = parse_sharing_settings(settings.extensions.get("sharing"))
    if not options.enabled:
        return None
    runtime = SharingRuntime(settings, options)
    routes: list[BaseRoute] = []
    if options.taxii.enabled and options.partners:
        routes = list(TaxiiServer(options, runtime.engine).routes())
    return Extension(checks=[runtime.check], stages=[runtime.stage], admin_routes=routes)
