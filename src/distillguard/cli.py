"""The ``distillguard`` command line.

Every command reads the same settings as the server (``--config FILE`` or the
``DISTILLGUARD_CONFIG`` variable, then environment overrides). Component commands
(ledger, simulate, detect, ...) are registered as sub-groups in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import getpass
import importlib
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
import orjson

from distillguard.cliparams import PORT, positive, within
from distillguard.components import (
    check_tier,
    create_account,
    import_accounts,
    known_tiers,
    update_account,
)
from distillguard.config import Settings, load_settings
from distillguard.errors import ConfigError, DistillguardError, InvalidRecord
from distillguard.store import StateStore, all_accounts, open_state_store
from distillguard.store.models import Account, AccountImport, key_expiry
from distillguard.traceio import FormatError, read_account_lines, write_accounts

T = TypeVar("T")

# Sub-command groups living in their own modules: (module, attribute). One line each.
SUBCOMMANDS: list[tuple[str, str]] = [
    ("distillguard.gateway.tracecli", "traces"),
    ("distillguard.dashboard.cli", "dashboard"),
    ("distillguard.provenance.cli", "provenance"),
    ("distillguard.countermeasures.cli", "fingerprint"),
    ("distillguard.simulate.cli", "simulate"),
    ("distillguard.benchdetect.cli", "bench"),
    ("distillguard.sharing.cli", "share"),
    ("distillguard.policy.cli", "policy"),
    ("distillguard.policy.cli", "review"),
    ("distillguard.ledger.cli", "ledger"),
    ("distillguard.detect.cli", "detect"),
    ("distillguard.detect_spark.cli", "spark"),
]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


class Context:
    def __init__(self, config: str | None) -> None:
        self.config_path = config
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
        return self._settings

    async def with_store(self, fn: Callable[[StateStore], Coroutine[Any, Any, T]]) -> T:
        store = open_state_store(self.settings.state.url)
        try:
            await store.migrate()
            return await fn(store)
        finally:
            await store.close()


pass_ctx = click.make_pass_decorator(Context)


def actor_name(value: str | None) -> str:
    """Who runs a command that records its actor: ``--actor``, else the login name."""
    if value:
        return value
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


class _Group(click.Group):
    """Turns expected errors into one clear line instead of a traceback, and imports the
    sub-command groups of :data:`SUBCOMMANDS` only when one is called (or for ``--help``),
    so that everyday commands start without loading every component."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *(attr for _, attr in SUBCOMMANDS)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            command = _load_subcommand(self, cmd_name)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, FormatError) as exc:
            fail(str(exc))
        except DistillguardError as exc:
            fail(str(exc))
        except OSError as exc:
            if not _file_error(exc):
                raise
            fail(f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror
                 else str(exc))


def _file_error(exc: OSError) -> bool:
    """Whether ``exc`` is about a file the user named or the disk it is on (a traceback
    says nothing more to them), not a fault of the program or a connection."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return False
    return (isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError
                       | NotADirectoryError | FileExistsError)
            or exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT)
            or exc.filename is not None)


@click.group(cls=_Group)
@click.option("--config", "-c", envvar="DISTILLGUARD_CONFIG", type=click.Path(dir_okay=False),
              help="YAML settings file (see docs/configuration.md).")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
@click.version_option(package_name="distillguard")
@click.pass_context
def main(ctx: click.Context, config: str | None, verbose: bool) -> None:
    """distillguard: access control, metering, audit and distillation defence for
    OpenAI-compatible model APIs."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = Context(config)


# -- serving ------------------------------------------------------------------------------


@main.command()
@click.option("--host", help="Public API address (server.host).")
@click.option("--port", type=PORT, help="Public API port (server.port).")
@click.option("--admin-port", type=PORT, help="Admin API port (server.admin_port).")
@pass_ctx
def serve(ctx: Context, host: str | None, port: int | None, admin_port: int | None) -> None:
    """Run the gateway (public API and admin API)."""
    from distillguard.serve import Stack

    settings = ctx.settings
    if host:
        settings.server.host = host
    if port is not None:
        settings.server.port = port
    if admin_port is not None:
        settings.server.admin_port = admin_port
    if not settings.admin.token:
        click.echo("warning: no admin token configured; the admin API is disabled", err=True)
    _check_state_store(settings)
    stack = Stack(settings)

    async def run() -> None:
        ready = asyncio.Event()
        serving = asyncio.create_task(stack.serve(ready))
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait({serving, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if not serving.done():        # listening: its ports are known now (even 0)
            click.echo(f"distillguard gateway on {stack.base_url}  admin on "
                       f"{stack.admin_url}"
                       + ("  (demo upstream)" if settings.upstream.is_demo else ""), err=True)
        await serving

    _install_uvloop()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


def _check_state_store(settings: Settings) -> None:
    """One clear line, before any server starts, when the state store cannot be used (a
    database that is down or refuses the credentials): the gateway's start-up failed
    with about 150 lines of traceback in which the cause was hard to find."""

    async def migrate() -> None:
        store = open_state_store(settings.state.url)
        try:
            await store.migrate()
        finally:
            await store.close()

    try:
        asyncio.run(migrate())
    except Exception as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0] if str(exc) else ""
        fail(f"cannot use the state store {masked(settings.state.url)}: "
             f"{type(getattr(exc, 'orig', None) or exc).__name__}"
             + (f": {masked(reason)}" if reason else ""))


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@main.command("demo-upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9000, show_default=True, type=PORT)
@click.option("--chunk-delay-ms", default=0.0, show_default=True, type=float,
              callback=within(0, math.inf, high_open=True, unit="ms"),
              help="Delay between streamed chunks, to look like real generation.")
def demo_upstream(host: str, port: int, chunk_delay_ms: float) -> None:
    """Run only the built-in demo upstream (a deterministic OpenAI-compatible stand-in)."""
    import uvicorn

    from distillguard.demo_upstream import create_demo_upstream
    from distillguard.serve import DEMO_UPSTREAM_KEEPALIVE_S

    uvicorn.run(create_demo_upstream(chunk_delay_ms / 1000), host=host, port=port,
                log_level="warning", access_log=False,
                timeout_keep_alive=DEMO_UPSTREAM_KEEPALIVE_S)


@main.command()
@click.option("--dir", "workdir", default="distillguard-demo", show_default=True,
              type=click.Path(file_okay=False), help="Where the demo keeps its state.")
@click.option("--minutes", default=1.0, show_default=True, type=float,
              callback=positive(unit="minutes"),
              help="Length of simulated traffic to replay through the gateway.")
@click.option("--seed", default=7, show_default=True)
@click.option("--keep-running", is_flag=True, help="Leave the gateway up after the demo.")
def demo(workdir: str, minutes: float, seed: int, keep_running: bool) -> None:
    """Run everything on embedded defaults: SQLite state, demo upstream, simulated traffic
    through the gateway with the official openai client, then a summary."""
    from distillguard.demo import run_demo

    run_demo(workdir, minutes=minutes, seed=seed, keep_running=keep_running)


@main.command()
@pass_ctx
def migrate(ctx: Context) -> None:
    """Create or upgrade the state store schema."""
    async def go(store: StateStore) -> list[int]:
        return await store.migrate()

    store = open_state_store(ctx.settings.state.url)

    async def once() -> list[int]:
        try:
            return await go(store)
        finally:
            await store.close()

    applied = run(once())
    click.echo(f"applied migrations: {applied}" if applied else "schema is up to date")


@main.command("check-config")
@pass_ctx
def check_config(ctx: Context) -> None:
    """Validate the settings, each component's section included, and print them
    (secrets masked)."""
    from distillguard.components import check_sections

    for section in check_sections(ctx.settings):
        click.echo(f"warning: no component reads the section {section!r} (misspelt?)",
                   err=True)
    ctx.settings.server.tls_context()     # the certificate and key, read as serve will
    data = masked(ctx.settings.model_dump(mode="json"))
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


# Options that hold a secret, in any section (a component's too: the fingerprint secret,
# the dashboard's session secret, a sharing partner's token, the sharing pseudonym keys).
SECRET_OPTIONS = ("token", "api_key", "secret", "session_secret", "password",
                  "pseudonym_key")
# The password runs to the first "@", "/" included: SQLAlchemy takes "dg:a/b@db" as written.
_URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^/@:]*):[^@]*@", re.IGNORECASE)


def masked(data: Any) -> Any:
    """Settings as printed: each secret option's value as ``***``, and the password in a
    URL's user part (``postgresql://dg:***@db/dg``, ``redis://:***@cache:6379/0``)."""
    if isinstance(data, dict):
        return {k: "***" if k in SECRET_OPTIONS and v else masked(v) for k, v in data.items()}
    if isinstance(data, list):
        return [masked(v) for v in data]
    if isinstance(data, str):
        return _URL_PASSWORD.sub(r"\1:***@", data)
    return data


# -- accounts -----------------------------------------------------------------------------


@main.group()
def accounts() -> None:
    """Create, list, change, import and export accounts."""


@accounts.command("create")
@click.argument("account_id")
@click.option("--org")
@click.option("--email-domain")
@click.option("--country", help="ISO 3166-1 alpha-2 code, e.g. DE.")
@click.option("--tier", default="standard", show_default=True,
              help="Verification tier (unverified, standard, verified, trusted, ...).")
@click.option("--payment-fingerprint")
@click.option("--created-at", help="RFC 3339 time; default now.")
@click.option("--status", type=click.Choice(["active", "suspended"]), default="active",
              show_default=True,
              help="With the policy component on, suspended is recorded on its action "
                   "ladder: suspended until set active (or the suspension revoked).")
@click.option("--reason", help="Why the account is created suspended (recorded with it).")
@click.option("--actor", help="Who suspends it (default: the login name).")
@pass_ctx
def accounts_create(ctx: Context, account_id: str, org: str | None, email_domain: str | None,
                    country: str | None, tier: str, payment_fingerprint: str | None,
                    created_at: str | None, status: str, reason: str | None,
                    actor: str | None) -> None:
    """Create one account."""
    if (reason is not None or actor is not None) and status != "suspended":
        fail("--reason and --actor go with --status suspended")
    account = Account.from_public({
        "account_id": account_id, "org": org, "email_domain": email_domain,
        "country": country, "tier": tier, "payment_fingerprint": payment_fingerprint,
        "created_at": created_at, "status": status})
    check_tier(account.tier, known_tiers(ctx.settings), account.account_id)

    async def go(store: StateStore) -> Account:
        return await create_account(ctx.settings, store, account, actor=actor_name(actor),
                                    reason=reason, channel="cli")

    click.echo(orjson.dumps(run(ctx.with_store(go)).to_public()).decode())


@accounts.command("list")
@click.option("--query", "-q", help="Substring of id, org, email domain or payment fingerprint.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1))
@pass_ctx
def accounts_list(ctx: Context, query: str | None, limit: int) -> None:
    """List accounts as JSON Lines."""
    async def go(store: StateStore) -> list[Account]:
        return await store.list_accounts(query=query, limit=limit)

    for account in run(ctx.with_store(go)):
        click.echo(orjson.dumps(account.to_public()).decode())


@accounts.command("show")
@click.argument("account_id")
@pass_ctx
def accounts_show(ctx: Context, account_id: str) -> None:
    """Show one account and its keys."""
    async def go(store: StateStore) -> dict[str, Any]:
        account = await store.get_account(account_id)
        keys = await store.list_keys(account_id)
        return {**account.to_public(), "keys": [k.to_public() for k in keys]}

    click.echo(orjson.dumps(run(ctx.with_store(go)), option=orjson.OPT_INDENT_2).decode())


@accounts.command("update")
@click.argument("account_id")
@click.option("--tier")
@click.option("--status", type=click.Choice(["active", "suspended"]),
              help="With the policy component on, recorded on its action ladder: "
                   "suspended until set active (or the suspension revoked).")
@click.option("--reason", help="Why the status changes (recorded with it).")
@click.option("--actor", help="Who changes the status (default: the login name).")
@click.option("--country")
@click.option("--org")
@click.option("--payment-fingerprint")
@click.option("--rpm", type=int, help="Requests per minute (overrides the tier).")
@click.option("--tpm", type=int, help="Tokens per minute (overrides the tier).")
@click.option("--tpd", type=int, help="Tokens per day (overrides the tier).")
@pass_ctx
def accounts_update(ctx: Context, account_id: str, rpm: int | None, tpm: int | None,
                    tpd: int | None, reason: str | None, actor: str | None,
                    **fields: Any) -> None:
    """Change an account's fields or limits."""
    changes = {k: v for k, v in fields.items() if v is not None}
    if (reason is not None or actor is not None) and "status" not in changes:
        fail("--reason and --actor go with --status")
    if "tier" in changes:
        check_tier(changes["tier"], known_tiers(ctx.settings), account_id)

    limits = {option: value for option, value in (
        ("requests_per_minute", rpm), ("tokens_per_minute", tpm), ("tokens_per_day", tpd))
        if value is not None}
    if not changes and not limits:
        fail("nothing to change")

    async def go(store: StateStore) -> Account:
        account = None
        if limits:
            account = await store.merge_limits(account_id, limits)
        if changes or account is None:
            account = await update_account(ctx.settings, store, account_id, changes,
                                           actor=actor_name(actor), reason=reason,
                                           channel="cli")
        return account

    click.echo(orjson.dumps(run(ctx.with_store(go)).to_public()).decode())


@accounts.command("import")
@click.argument("path", type=click.Path(allow_dash=True))
@click.option("--reason", help="Why statuses change (recorded with them).")
@click.option("--actor", help="Who imports (default: the login name).")
@pass_ctx
def accounts_import(ctx: Context, path: str, reason: str | None, actor: str | None) -> None:
    """Import accounts (accounts format, JSON Lines); all or nothing.

    An existing account keeps its status unless its line gives one. With the policy
    component on, a status given is set as by hand on its action ladder: suspended until
    set active, and active lifting suspensions."""
    batch = AccountImport.of(read_account_lines(path))
    known = known_tiers(ctx.settings)
    for record in batch.accounts:
        check_tier(record.tier, known, record.account_id)

    async def go(store: StateStore) -> dict[str, int]:
        return await import_accounts(ctx.settings, store, batch, actor=actor_name(actor),
                                     reason=reason)

    done = run(ctx.with_store(go))
    ladder = f" ({done['suspended']} suspended, {done['reinstated']} reinstated)" \
        if "suspended" in done else ""
    click.echo(f"imported {done['imported']} accounts{ladder}", err=True)


@accounts.command("export")
@click.argument("path", type=click.Path(allow_dash=True), default="-")
@pass_ctx
def accounts_export(ctx: Context, path: str) -> None:
    """Export all accounts in the accounts format (JSON Lines)."""
    count = write_accounts(run(ctx.with_store(all_accounts)), path)
    if path != "-":
        click.echo(f"exported {count} accounts to {path}", err=True)


# -- keys ---------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Create, list and revoke API keys."""


@keys.command("create")
@click.argument("account_id")
@click.option("--name")
@click.option("--expires-in-days", type=float)
@click.option("--expires-at", help="RFC 3339 time.")
@click.option("--rpm", type=int, help="Requests per minute for this key.")
@click.option("--tpm", type=int, help="Tokens per minute for this key.")
@click.option("--tpd", type=int, help="Tokens per day for this key.")
@pass_ctx
def keys_create(ctx: Context, account_id: str, name: str | None,
                expires_in_days: float | None, expires_at: str | None, rpm: int | None,
                tpm: int | None, tpd: int | None) -> None:
    """Create a key. The secret is printed once, here, and never stored."""
    try:
        expiry = key_expiry(expires_at, expires_in_days, now=datetime.now(UTC))
    except InvalidRecord as exc:
        hint = "--" + (exc.field or "expires_at").replace("_", "-")
        raise click.BadParameter(str(exc), param_hint=hint) from None
    limits: dict[str, int | None] = {
        k: v for k, v in (("requests_per_minute", rpm), ("tokens_per_minute", tpm),
                          ("tokens_per_day", tpd)) if v is not None}

    async def go(store: StateStore) -> tuple[Any, str]:
        return await store.create_key(account_id, name=name, expires_at=expiry, limits=limits)

    key, secret = run(ctx.with_store(go))
    click.echo(orjson.dumps({**key.to_public(), "key": secret}).decode())
    click.echo("store this key now: it cannot be shown again", err=True)


@keys.command("list")
@click.option("--account", "account_id")
@pass_ctx
def keys_list(ctx: Context, account_id: str | None) -> None:
    """List keys (ids and state only, never secrets)."""
    async def go(store: StateStore) -> list[Any]:
        return await store.list_keys(account_id)

    for key in run(ctx.with_store(go)):
        click.echo(orjson.dumps(key.to_public()).decode())


@keys.command("revoke")
@click.argument("key_id")
@pass_ctx
def keys_revoke(ctx: Context, key_id: str) -> None:
    """Revoke a key; every replica refuses it within one second."""
    async def go(store: StateStore) -> Any:
        return await store.revoke_key(key_id)

    click.echo(orjson.dumps(run(ctx.with_store(go)).to_public()).decode())


def _load_subcommand(group: click.Group, name: str) -> click.Command | None:
    for module, attr in SUBCOMMANDS:
        if attr != name:
            continue
        try:
            command: click.Command = getattr(importlib.import_module(module), attr)
        except ImportError as exc:  # pragma: no cover - a broken install
            click.echo(f"warning: {module} unavailable: {exc}", err=True)
            return None
        group.add_command(command, name)
        return command
    return None

if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
