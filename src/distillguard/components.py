"""The default components of a running gateway, in pipeline order: one explicit list.

Each entry names a factory ``module:function`` that takes the
:class:`~distillguard.config.Settings` and returns an
:class:`~distillguard.serve.Extension` (request checks, stages, admin routes) or ``None``
when the component is switched off in the settings. Factories validate their own settings
section and raise :class:`~distillguard.errors.ConfigError` at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

from distillguard.errors import InvalidRecord

if TYPE_CHECKING:
    from distillguard.config import Settings
    from distillguard.serve import Extension
    from distillguard.store import Account, StateStore
    from distillguard.store.models import AccountImport

DEFAULT_COMPONENTS: list[tuple[str, str]] = [
    ("ledger", "distillguard.ledger.stage:component"),
    ("policy", "distillguard.policy.component:component"),
    ("detect", "distillguard.detect:component"),
    ("countermeasures", "distillguard.countermeasures:component"),
    ("dashboard", "distillguard.dashboard:dashboard_extension"),
    ("sharing", "distillguard.sharing:component"),
]


# Each component's settings check (``module:function``), pure validation (no file,
# connection or process), for ``distillguard check-config``: the function takes the
# component's section, except the ledger's, which also reads the state settings.
SETTINGS_CHECKS: list[tuple[str, str]] = [
    ("ledger", "distillguard.ledger.settings:parse_settings"),
    ("policy", "distillguard.policy.component:parse_settings"),
    ("detect", "distillguard.detect.settings:parse_settings"),
    ("countermeasures", "distillguard.countermeasures.settings:parse_settings"),
    ("dashboard", "distillguard.dashboard.settings:parse_dashboard_settings"),
    ("sharing", "distillguard.sharing.settings:parse_sharing_settings"),
]
WHOLE_SETTINGS = frozenset({"ledger"})


def check_sections(settings: Settings) -> list[str]:
    """Validate every component's section as its component would at start-up (raises
    :class:`~distillguard.errors.ConfigError`, naming the option). Returns the sections
    of the file that no component reads (a misspelt section name is otherwise silently
    ignored)."""
    for section, target in SETTINGS_CHECKS:
        module, _, attr = target.partition(":")
        check = getattr(importlib.import_module(module), attr)
        check(settings if section in WHOLE_SETTINGS else settings.extensions.get(section))
    known = {section for section, _ in SETTINGS_CHECKS}
    return sorted(k for k in settings.extensions if k not in known)


# Components whose settings name verification tiers besides limits.tiers
# (``module:function`` taking the Settings, returning tier names).
TIER_SOURCES: list[tuple[str, str]] = [
    ("policy", "distillguard.policy.component:policy_tiers"),
]


def known_tiers(settings: Settings) -> frozenset[str]:
    """The tiers an account may have: those of ``limits.tiers`` and those a component
    names (the policy file's ``tier_order``)."""
    tiers = set(settings.limits.tiers)
    for _section, target in TIER_SOURCES:
        module, _, attr = target.partition(":")
        tiers.update(getattr(importlib.import_module(module), attr)(settings))
    return frozenset(tiers)


def check_tier(tier: object, known: frozenset[str], account_id: str | None = None) -> str:
    """``tier`` if it is one of ``known`` (:func:`known_tiers`); otherwise InvalidRecord.
    An account of a tier named nowhere was served the default tier's limits, and policy
    rules written for the tier it was meant to have never matched it."""
    if isinstance(tier, str) and tier in known:
        return tier
    whose = f"account {account_id!r}" if account_id else "account"
    raise InvalidRecord(f"{whose}: unknown tier {tier!r} (tiers of limits.tiers and the "
                        f"policy file: {', '.join(sorted(known))})")


# Components that keep a record of an account's status changes besides the status itself
# (``module:function`` taking the Settings, returning a :class:`StatusKeeper`, or None
# when the component is off or leaves the status alone): the policy component's action
# ladder, which sets an account's status when it suspends and lifts, and so must know
# of a suspension by hand not to lift it.
STATUS_KEEPERS: list[tuple[str, str]] = [
    ("policy", "distillguard.policy.component:status_keeper"),
]


class StatusKeeper(Protocol):
    """Sets accounts' status as an operator asks, recording who (``actor``), why
    (``reason``, None for a default) and where (``channel``: ``admin``, ``cli``,
    ``import``)."""

    async def create_account(self, store: StateStore, account: Account, *, actor: str,
                             reason: str | None, channel: str) -> None:
        """Create ``account`` with the status it gives, as :meth:`update_account` would
        set it. Raises as :meth:`~distillguard.store.StateStore.put_account` does for an
        account that exists, with nothing changed."""
        ...

    async def update_account(self, store: StateStore, account_id: str,
                             changes: dict[str, Any], *, actor: str, reason: str | None,
                             channel: str) -> None:
        """Apply an account update ``changes`` that holds ``status`` (and maybe other
        fields). Raises as :meth:`~distillguard.store.StateStore.update_account` does for
        an unknown account or field, or a value the account cannot take, with nothing
        changed."""
        ...

    async def import_accounts(self, store: StateStore, batch: AccountImport, *, actor: str,
                              reason: str | None, channel: str) -> dict[str, int]:
        """Insert or replace the accounts of ``batch``, all or nothing, setting the status
        of each whose line gives one as :meth:`update_account` would; returns counts of
        what it did besides (``suspended``, ``reinstated``)."""
        ...


def status_keeper(settings: Settings) -> StatusKeeper | None:
    """The :data:`STATUS_KEEPERS` entry that keeps the status under these settings."""
    for _section, target in STATUS_KEEPERS:
        module, _, attr = target.partition(":")
        keeper: StatusKeeper | None = getattr(importlib.import_module(module), attr)(settings)
        if keeper is not None:
            return keeper
    return None


async def create_account(settings: Settings, store: StateStore, account: Account, *,
                         actor: str, reason: str | None, channel: str) -> Account:
    """A new account from an operator (admin API, command line): created ``suspended``, it
    goes through the :func:`status_keeper` when there is one, as a status set by hand
    would; otherwise (and ``active``) straight to the store."""
    keeper = status_keeper(settings) if account.status == "suspended" else None
    if keeper is None:
        return await store.put_account(account)
    await keeper.create_account(store, account, actor=actor, reason=reason,
                                channel=channel)
    return account


async def update_account(settings: Settings, store: StateStore, account_id: str,
                         changes: dict[str, Any], *, actor: str, reason: str | None,
                         channel: str) -> Account:
    """An account update from an operator (admin API, command line): a change of
    ``status`` goes through the :func:`status_keeper` when there is one, the rest (and
    everything when there is none) straight to the store."""
    keeper = status_keeper(settings) if "status" in changes else None
    if keeper is None:
        return await store.update_account(account_id, **changes)
    await keeper.update_account(store, account_id, changes, actor=actor, reason=reason,
                                channel=channel)
    return await store.get_account(account_id)


async def import_accounts(settings: Settings, store: StateStore, batch: AccountImport, *,
                          actor: str, reason: str | None) -> dict[str, int]:
    """An import from an operator (admin API, command line), all or nothing: an account
    whose line gives a status has it set through the :func:`status_keeper` when there is
    one, as by hand (channel ``import``); an existing account whose line gives none keeps
    its status. Returns ``{"imported": n}`` and the keeper's counts."""
    keeper = status_keeper(settings)
    if keeper is not None and \
            len(batch.keep_status) < len({a.account_id for a in batch.accounts}):
        return await keeper.import_accounts(store, batch, actor=actor, reason=reason,
                                            channel="import")
    imported = await store.import_accounts(batch.accounts, keep_status=batch.keep_status)
    return {"imported": imported} if keeper is None else \
        {"imported": imported, "suspended": 0, "reinstated": 0}


def load_extensions(settings: Settings) -> list[Extension]:
    out = []
    for _name, target in DEFAULT_COMPONENTS:
        module, _, attr = target.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        extension = factory(settings)
        if extension is not None:
            out.append(extension)
    return out
