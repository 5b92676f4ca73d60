"""Page handlers; :data:`ROUTES` lists them (path, handler, methods), all behind log-in.

An id in a path takes the ``path`` converter: the server decodes an id's ``%2F`` to
``/`` before routing (:mod:`distillguard.dashboard.urls`)."""

from __future__ import annotations

from distillguard.dashboard.views import accounts, actions, campaigns, ledger, overview, review

ROUTES = [
    ("/", overview.page, ["GET"]),
    ("/api/traffic", overview.traffic_json, ["GET"]),
    ("/campaigns", campaigns.list_page, ["GET"]),
    ("/campaigns/{campaign_id:path}", campaigns.detail_page, ["GET"]),
    ("/accounts", accounts.search_page, ["GET"]),
    ("/accounts/{account_id:path}", accounts.detail_page, ["GET"]),
    ("/exchanges/{exchange_id:path}", accounts.exchange_page, ["GET"]),
    ("/review", review.page, ["GET"]),
    ("/review/{item_id:path}", review.decide, ["POST"]),
    ("/ledger", ledger.page, ["GET"]),
    ("/ledger/verify", ledger.verify, ["POST"]),
    ("/actions", actions.apply, ["POST"]),
    ("/audit", actions.audit_page, ["GET"]),
]
