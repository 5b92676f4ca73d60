"""``distillguard share``: export, import, push, poll and serve threat intelligence."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import sys
from collections.abc import AsyncIterator, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import orjson

from distillguard.cliparams import PORT, within
from distillguard.errors import DistillguardError
from distillguard.files import output_path, write_atomically
from distillguard.netaddr import authority
from distillguard.sharing.settings import SharingSettings, parse_sharing_settings

if TYPE_CHECKING:
    from distillguard.cli import Context
    from distillguard.sharing.store import SharingStore

T = TypeVar("T")
pass_ctx = click.pass_obj  # the distillguard.cli.Context of the main group


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _options(ctx: Context) -> SharingSettings:
    return parse_sharing_settings(ctx.settings.extensions.get("sharing"))


def _echo(data: Any) -> None:
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


async def _sharing_store(ctx: Context, store: Any) -> SharingStore:
    from distillguard.sharing import taxiistore
    from distillguard.sharing.store import SharingStore, create_schema

    await create_schema(store.engine)
    await taxiistore.create_schema(store.engine)
    return SharingStore(store.engine,
                        ttl=timedelta(days=_options(ctx).indicator_ttl_days))


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DistillguardError(f"cannot read {path}: {exc.strerror}") from None


@click.group("share")
def share() -> None:
    """Share campaign indicators with partners (STIX 2.1 bundles, TAXII 2.1)."""


@share.command("export")
@click.option("--partner", required=True, help="Who the bundle is for (sharing.partners).")
@click.option("--out", default="-", show_default=True, callback=output_path,
              help="Bundle file, - for stdout.")
@click.option("--verdicts", type=click.Path(dir_okay=False),
              help="Verdicts file; without it, campaigns come from the state store.")
@click.option("--trace", type=click.Path(dir_okay=False), help="Trace file (JSON Lines).")
@click.option("--accounts", type=click.Path(dir_okay=False), help="Accounts file.")
@click.option("--campaign", "campaigns", multiple=True, help="Campaign id (repeatable); "
              "default: every confirmed campaign.")
@click.option("--min-risk", default=0.9, show_default=True, type=float, callback=within(0, 1),
              help="Risk that counts as confirmed when detection records no status.")
@click.option("--publish", "collection", help="Also add the objects to this collection of "
              "our TAXII server.")
@pass_ctx
def export_cmd(ctx: Context, partner: str, out: str, verdicts: str | None,
               trace: str | None, accounts: str | None, campaigns: tuple[str, ...],
               min_risk: float, collection: str | None) -> None:
    """Export campaigns as a STIX 2.1 bundle for one partner."""
    from distillguard.geoip import default_geoip
    from distillguard.sharing import inputs
    from distillguard.sharing.export import BundleBuilder

    options = _options(ctx)
    options.partner(partner)
    builder = BundleBuilder(options, partner)  # fails early without a pseudonym key
    wanted = list(campaigns) or None
    if verdicts:
        if not trace:
            raise click.UsageError("--verdicts needs --trace (the exchanges)")
        evidence = inputs.collect_from_files(verdicts, trace, accounts, campaigns=wanted,
                                             min_risk=min_risk, geoip=default_geoip())
    else:
        async def from_state(store: Any) -> Any:
            return await inputs.collect_from_state(store, trace=trace, campaigns=wanted,
                                                   min_risk=min_risk, geoip=default_geoip())
        evidence = run(ctx.with_store(from_state))
    bundle, summary = builder.build(evidence)
    text = bundle.serialize(pretty=True)
    if out == "-":
        click.echo(text)
    else:
        write_atomically(out, (text + "\n").encode())
    if collection:
        objects = orjson.loads(text)["objects"]
        run(ctx.with_store(lambda store: _publish(ctx, store, collection, objects)))
    click.echo(f"exported {len(summary.campaigns)} campaign(s), {summary.objects} objects, "
               f"indicators {summary.indicators} for {partner} ({summary.bundle_id}"
               f"{', pseudonymised' if summary.pseudonymized else ', NOT pseudonymised'})",
               err=True)


async def _publish(ctx: Context, store: Any, ref: str, objects: list[dict[str, Any]]
                   ) -> None:
    from distillguard.sharing import taxiistore

    found = _options(ctx).collection(ref)
    if found is None:
        raise DistillguardError(f"no collection {ref!r} in sharing.taxii.collections")
    await _sharing_store(ctx, store)
    async with store.engine.begin() as conn:
        ok, failed = await taxiistore.add_objects(conn, found.id, objects, "self")
    click.echo(f"published {len(ok)} object version(s) to collection {ref}"
               + (f" ({len(failed)} already there)" if failed else ""), err=True)


@share.command("import")
@click.argument("bundle", type=click.Path(allow_dash=True))
@click.option("--partner", required=True, help="Who sent it (sharing.partners).")
@pass_ctx
def import_cmd(ctx: Context, bundle: str, partner: str) -> None:
    """Validate a partner's STIX 2.1 bundle and import its indicators (all or nothing)."""
    from distillguard.sharing.validate import BundleError, parse_bundle

    options = _options(ctx)
    options.partner(partner)
    try:
        parsed = parse_bundle(_read(bundle), max_bytes=options.max_bundle_bytes)
    except BundleError as exc:
        raise DistillguardError(f"{bundle}: refused, nothing imported: {exc}") from None

    async def go(store: Any) -> Any:
        sharing = await _sharing_store(ctx, store)
        try:
            return await sharing.import_bundle(
                partner=partner, bundle_id=parsed.bundle_id, objects=parsed.objects,
                source=f"file:{bundle}", sha256=parsed.sha256)
        except BundleError as exc:
            raise DistillguardError(f"{bundle}: refused, nothing imported: {exc}") from None

    _echo(run(ctx.with_store(go)).to_json())


@share.command("indicators")
@pass_ctx
def indicators_cmd(ctx: Context) -> None:
    """List the active (unexpired) partner indicators, as JSON Lines."""
    async def go(store: Any) -> Any:
        return await (await _sharing_store(ctx, store)).active_indicators()

    for row in run(ctx.with_store(go)):
        click.echo(orjson.dumps(row).decode())


@share.command("bundles")
@click.option("--partner")
@pass_ctx
def bundles_cmd(ctx: Context, partner: str | None) -> None:
    """Imported bundles with their provenance (who, when, from where), as JSON Lines."""
    async def go(store: Any) -> Any:
        return await (await _sharing_store(ctx, store)).bundles(partner)

    for row in run(ctx.with_store(go)):
        click.echo(orjson.dumps(row).decode())


@share.command("matches")
@click.option("--account", "account_id")
@pass_ctx
def matches_cmd(ctx: Context, account_id: str | None) -> None:
    """Accounts that matched partner indicators, as JSON Lines."""
    async def go(store: Any) -> Any:
        return await (await _sharing_store(ctx, store)).matches(account_id)

    for row in run(ctx.with_store(go)):
        click.echo(orjson.dumps(row).decode())


@share.command("purge")
@pass_ctx
def purge_cmd(ctx: Context) -> None:
    """Delete expired indicators."""
    async def go(store: Any) -> int:
        return await (await _sharing_store(ctx, store)).purge_expired()

    click.echo(f"deleted {run(ctx.with_store(go))} expired indicator input(s)", err=True)


def _remote(ctx: Context, server: str, collection: str, user: str | None,
            password: str | None, token: str | None) -> Any:
    from distillguard.sharing.client import Remote

    return Remote(url=server, collection=collection, user=user, password=password,
                  token=token, max_bytes=_options(ctx).max_bundle_bytes)


_remote_options = [
    click.option("--server", required=True, help="Discovery (…/taxii2/) or API root URL."),
    click.option("--collection", required=True, help="Remote collection id."),
    click.option("--user", envvar="DISTILLGUARD_TAXII_USER"),
    click.option("--password", envvar="DISTILLGUARD_TAXII_PASSWORD"),
    click.option("--token", envvar="DISTILLGUARD_TAXII_TOKEN"),
]


def remote_options(fn: Any) -> Any:
    for option in reversed(_remote_options):
        fn = option(fn)
    return fn


@share.command("push")
@click.argument("bundle", type=click.Path(allow_dash=True))
@remote_options
@pass_ctx
def push_cmd(ctx: Context, bundle: str, server: str, collection: str, user: str | None,
             password: str | None, token: str | None) -> None:
    """Add a bundle's objects to a partner's TAXII 2.1 collection."""
    from distillguard.sharing.client import push_objects
    from distillguard.sharing.validate import parse_bundle

    parsed = parse_bundle(_read(bundle), max_bytes=_options(ctx).max_bundle_bytes)
    _echo(push_objects(_remote(ctx, server, collection, user, password, token), parsed.objects))


@share.command("poll")
@remote_options
@click.option("--partner", required=True, help="Whose indicators these are.")
@click.option("--reset", is_flag=True, help="Read the whole collection again.")
@pass_ctx
def poll_cmd(ctx: Context, server: str, collection: str, user: str | None,
             password: str | None, token: str | None, partner: str, reset: bool) -> None:
    """Import what a partner's TAXII 2.1 collection gained since the last poll."""
    from distillguard.sharing.client import poll

    _options(ctx).partner(partner)
    remote = _remote(ctx, server, collection, user, password, token)

    async def go(store: Any) -> Any:
        sharing = await _sharing_store(ctx, store)
        return await poll(remote, sharing, partner=partner, reset=reset)

    _echo(run(ctx.with_store(go)).to_json())


@share.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8443, show_default=True, type=PORT)
@pass_ctx
def serve_cmd(ctx: Context, host: str, port: int) -> None:
    """Run only the TAXII 2.1 server (under /taxii2/) on its own port."""
    import uvicorn
    from starlette.applications import Starlette

    from distillguard.sharing import taxiistore
    from distillguard.sharing.store import create_schema
    from distillguard.sharing.taxii import TaxiiServer
    from distillguard.store import open_state_store

    options = _options(ctx)
    state = open_state_store(ctx.settings.state.url)
    engine = state.engine  # type: ignore[attr-defined]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.migrate()
        await create_schema(engine)
        await taxiistore.create_schema(engine)
        yield
        await state.close()

    app = TaxiiServer(options, lambda: engine).app(
        lifespan, failed_auth_per_minute=ctx.settings.admin.failed_auth_per_minute,
        trusted_proxies=ctx.settings.server.trusted_proxies)
    click.echo(f"TAXII 2.1 server on http://{authority(host, port)}/taxii2/", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


@share.command("partner-secret")
def partner_secret() -> None:
    """Make a partner credential: the secret (give it to the partner) and its SHA-256
    (put it in sharing.partners.NAME.token_sha256)."""
    secret = "dgp-" + secrets.token_urlsafe(24)
    _echo({"secret": secret, "token_sha256": hashlib.sha256(secret.encode()).hexdigest()})
