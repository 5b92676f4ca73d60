"""``distillguard policy ...`` and ``distillguard review ...``.

Both read the same settings as the server (``--config``) and work on the state store
directly, so they need no running gateway (except ``policy reload``, which asks the
running one). Actions and decisions taken here take effect on running gateways within
``refresh_s`` (about a second), and their audit events reach the ledger through the
running gateway.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import orjson

from distillguard.cli import actor_name
from distillguard.errors import ConfigError, message_of

T = TypeVar("T")


def _settings(ctx: click.Context) -> Any:
    return ctx.find_root().obj.settings


def _policy_file(ctx: click.Context) -> str | None:
    from distillguard.policy.component import parse_settings

    return parse_settings(_settings(ctx).extensions.get("policy")).file


def _with_ops(ctx: click.Context, fn: Callable[[Any], Awaitable[T]]) -> T:
    from distillguard.policy.compiled import load_policy
    from distillguard.policy.ops import PolicyOps
    from distillguard.store import open_state_store

    policy = load_policy(_policy_file(ctx))
    settings = _settings(ctx)

    async def go() -> T:
        store = open_state_store(settings.state.url)
        try:
            await store.migrate()
            return await fn(PolicyOps(store.engine, lambda: policy))  # type: ignore[attr-defined]
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except (ValueError, LookupError) as exc:
        click.echo(f"error: {message_of(exc)}", err=True)
        sys.exit(2)


def _echo(data: Any) -> None:
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2, default=str).decode())


actor_option = click.option("--actor", help="Who decides (default: the login name); "
                                            "recorded in the audit trail.")


@click.group("policy")
def policy() -> None:
    """Access policy: check the policy file, apply and lift actions, screen accounts."""


@policy.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.pass_context
def check(ctx: click.Context, file: str | None) -> None:
    """Validate a policy FILE (default: policy.file from the settings) and summarise it."""
    from distillguard.policy.compiled import load_policy

    path = file or _policy_file(ctx)
    compiled = load_policy(path)
    doc = compiled.document
    click.echo(f"{path or 'built-in defaults'}: valid (version {doc.version})")
    click.echo(f"  tiers: {', '.join(doc.tier_order)}; gated: "
               f"{', '.join(compiled.tiers) or 'none'}")
    for rule in compiled.rules:
        target = rule.require_tier if rule.effect == "require_tier" else ""
        click.echo(f"  rule {rule.name}: {rule.effect} {target}".rstrip())
    click.echo(f"  verdict rules: {', '.join(r.name for r in doc.verdicts.rules) or 'none'}")
    click.echo(f"  screening entries: {len(compiled.screening)}")


def _ip_address(_ctx: click.Context, _param: click.Parameter, value: str | None
                ) -> str | None:
    """An address the lookup can place: a typo was looked up as no network at all, and
    the answer read as a request from nowhere in particular being allowed."""
    import ipaddress

    if value is not None:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not an IPv4 or IPv6 address") from None
    return value


def _country(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """As an account's country is stored (check_country): a code of another shape
    matches no jurisdiction rule, so the answer would not be the one an account gets."""
    from distillguard.store.models import check_country

    try:
        return check_country(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@policy.command("explain")
@click.option("--model", required=True)
@click.option("--ip", callback=_ip_address, help="Client IP address.")
@click.option("--tier", default="standard", show_default=True)
@click.option("--country", callback=_country,
              help="The account's declared country (ISO 3166-1 alpha-2).")
@click.pass_context
def explain(ctx: click.Context, model: str, ip: str | None, tier: str,
            country: str | None) -> None:
    """What the rules decide for a request (no account actions are consulted)."""
    from distillguard.policy.compiled import load_policy
    from distillguard.policy.jurisdiction import RequestFacts, deny_message, evaluate

    compiled = load_policy(_policy_file(ctx))
    net = compiled.networks.lookup(ip)
    facts = RequestFacts(model=model, endpoint="/v1/chat/completions", tier=tier,
                         tier_rank=compiled.rank(tier), declared_country=country,
                         network=net)
    out: dict[str, Any] = {"network": net.info.to_json(), "anonymizer": net.anonymizer}
    gate = compiled.tier(tier)
    if gate is not None and gate.models is not None and not gate.models.fullmatch(model):
        out["decision"] = {"denied": f"tier:{tier}", "code": "model_not_permitted"}
    else:
        outcome = evaluate(compiled.rules, facts)
        if outcome.denied_by is not None:
            out["decision"] = {"denied": f"rule:{outcome.denied_by.name}",
                               "message": deny_message(outcome.denied_by, facts,
                                                       compiled.contact,
                                                       compiled.verification_url)}
        else:
            out["decision"] = {"allowed": True,
                               "degrade": [r.name for r in outcome.degrade]}
    _echo(out)


@policy.command("apply")
@click.argument("accounts", nargs=-1, required=True)
@click.option("--action", required=True,
              type=click.Choice(["flag", "throttle", "require_verification", "degrade",
                                 "suspend"]))
@click.option("--reason", required=True)
@click.option("--expires", default="default", show_default=True,
              help="Duration (24h, 7d), 'never', or 'default' (actions.default_expiry).")
@click.option("--rpm", type=click.IntRange(min=0),
              help="throttle: requests per minute (default: the policy's throttle limits).")
@click.option("--tpm", type=click.IntRange(min=0), help="throttle: tokens per minute.")
@click.option("--tpd", type=click.IntRange(min=0), help="throttle: tokens per day.")
@actor_option
@click.pass_context
def apply(ctx: click.Context, accounts: tuple[str, ...], action: str, reason: str,
          expires: str, rpm: int | None, tpm: int | None, tpd: int | None,
          actor: str | None) -> None:
    """Apply an action of the ladder to ACCOUNTS. A throttle takes the policy file's
    throttle limits, or its own with --rpm/--tpm/--tpd (as the admin API's ``limits``)."""
    limits = {name: value for name, value in (("requests_per_minute", rpm),
                                              ("tokens_per_minute", tpm),
                                              ("tokens_per_day", tpd)) if value is not None}
    if limits and action != "throttle":
        raise click.UsageError("--rpm, --tpm and --tpd are limits of a throttle")
    detail = {"limits": limits} if limits else None
    done = _with_ops(ctx, lambda ops: ops.apply(list(accounts), action, reason=reason,
                                                actor=actor_name(actor), channel="cli",
                                                expires_in=expires, detail=detail))
    for made in done:
        a = made.action
        extended = f" (extended from {made.extended_from})" if made.extended else ""
        click.echo(f"{a.action_id} {a.action} {a.account_id} until "
                   f"{a.expires_at or 'revoked'}{extended}")
    unchanged = len(set(accounts)) - len(done)
    if unchanged:
        click.echo(f"{unchanged} account(s) already had it, for as long or longer", err=True)


@policy.command("revoke")
@click.argument("accounts", nargs=-1, required=True)
@click.option("--action", "names", multiple=True, help="Only these actions (default: all, "
                                                        "which reinstates the account).")
@click.option("--reason", required=True)
@actor_option
@click.pass_context
def revoke(ctx: click.Context, accounts: tuple[str, ...], names: tuple[str, ...], reason: str,
           actor: str | None) -> None:
    """Lift actions from ACCOUNTS."""
    done = _with_ops(ctx, lambda ops: ops.lift(list(accounts), actions=list(names) or None,
                                               reason=reason, actor=actor_name(actor),
                                               channel="cli"))
    click.echo(f"lifted {len(done)} action(s)")


@policy.command("actions")
@click.option("--account")
@click.option("--active", is_flag=True, help="Only active actions.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1))
@click.pass_context
def actions_cmd(ctx: click.Context, account: str | None, active: bool, limit: int) -> None:
    """List actions, newest first (JSON)."""
    from distillguard.policy.actions import list_actions

    rows = _with_ops(ctx, lambda ops: list_actions(ops.engine, account, active_only=active,
                                                   limit=limit))
    _echo([a.to_json() for a in rows])


@policy.command("apply-verdicts")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.pass_context
def apply_verdicts(ctx: click.Context, file: str) -> None:
    """Apply the policy's verdict rules to a verdicts document (docs/formats.md)."""
    from distillguard.policy.verdictfeed import VerdictActions
    from distillguard.verdicts import Verdicts

    try:
        doc = Verdicts.read(file)
    except ValueError as exc:
        raise ConfigError(f"{file}: {exc}") from None

    async def go(ops: Any) -> VerdictActions:
        applier = VerdictActions(ops.engine, ops.policy)
        await applier.apply_document(doc)
        return applier

    applier = _with_ops(ctx, go)
    click.echo(f"{len(doc.accounts)} account verdict(s), {len(doc.campaigns)} campaign(s): "
               f"{applier.applied} action(s) applied, "
               + (f"{applier.extended} extended, " if applier.extended else "")
               + f"{applier.reviews} review item(s)")


@policy.command("screen")
@click.option("--force", is_flag=True, help="Screen every account again.")
@click.pass_context
def screen(ctx: click.Context, force: bool) -> None:
    """Screen accounts against the screening lists; matches open review items."""
    stats = _with_ops(ctx, lambda ops: ops.screen_accounts(force=force))
    click.echo(f"screened {stats['screened']} account(s): {stats['matches']} match(es), "
               f"{stats['items']} review item(s)")


@policy.command("screen-name")
@click.argument("name")
@click.pass_context
def screen_name(ctx: click.Context, name: str) -> None:
    """Show what NAME matches on the screening lists (nothing is recorded)."""
    from distillguard.policy.compiled import load_policy

    compiled = load_policy(_policy_file(ctx))
    matches = compiled.screening.match(name, threshold=compiled.document.screening.threshold)
    for m in matches:
        click.echo(m.evidence())
    if not matches:
        click.echo("no match")


@policy.command("audit")
@click.option("--subject", help="For example account:acct_17.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.pass_context
def audit_cmd(ctx: click.Context, subject: str | None, limit: int) -> None:
    """Audit events, newest first (JSON)."""
    from distillguard.policy import audit

    _echo(_with_ops(ctx, lambda ops: audit.query(ops.engine, subject, limit=limit)))


@policy.command("reload")
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Ask the running gateway to reload its policy file (or send it SIGHUP)."""
    import httpx

    settings = _settings(ctx)
    if not settings.admin.token:
        raise ConfigError("admin.token is not set: cannot reach the admin API")
    server = settings.server
    url = server.admin_url
    try:
        r = httpx.post(url + "/admin/v1/policy/reload", timeout=30,
                       headers={"authorization": f"Bearer {settings.admin.token}"},
                       verify=server.admin_verify())
    except httpx.HTTPError as exc:
        raise ConfigError(f"cannot reach the admin API at {url}: {exc}") from None
    if r.status_code != 200:
        message = r.json().get("error", {}).get("message", r.text)
        click.echo(f"error: {message}", err=True)
        sys.exit(2)
    click.echo(f"reloaded: generation {r.json()['generation']}")


@click.group("review")
def review() -> None:
    """The review queue: list items, confirm, dismiss (with a reason) or escalate."""


@review.command("list")
@click.option("--status", default="open", show_default=True,
              type=click.Choice(["open", "escalated", "confirmed", "dismissed", "all"]))
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def review_list(ctx: click.Context, status: str, limit: int, as_json: bool) -> None:
    """Items in the queue, oldest first."""
    from distillguard.policy.review import list_items

    items = _with_ops(ctx, lambda ops: list_items(ops.engine, status=status, limit=limit))
    if as_json:
        _echo([i.to_json() for i in items])
        return
    for i in items:
        risk = f"{i.risk:.2f}" if i.risk is not None else "-"
        click.echo(f"{i.item_id}  {i.status:<9} {i.kind}:{i.subject}  risk {risk}  "
                   f"from {i.source}  proposes {i.action or '-'}")
        for line in i.evidence[:3]:
            click.echo(f"    {line}")


@review.command("show")
@click.argument("item_id")
@click.pass_context
def review_show(ctx: click.Context, item_id: str) -> None:
    """ITEM_ID in full, as JSON: its subject, risk, evidence, proposed action, status and
    the decision taken on it."""
    item = _with_ops(ctx, lambda ops: ops.get_item(item_id))
    if item is None:
        click.echo(f"error: no review item {item_id!r}", err=True)
        sys.exit(2)
    _echo(item.to_json())


def _decide(decision: str) -> Any:
    @click.argument("item_id")
    @click.option("--reason", required=decision != "confirm", default="",
                  help="Why (required to dismiss or escalate); recorded in the audit trail.")
    @actor_option
    @click.pass_context
    def command(ctx: click.Context, item_id: str, reason: str, actor: str | None) -> None:
        item, applied = _with_ops(ctx, lambda ops: ops.decide(
            item_id, decision, reason, actor_name(actor), channel="cli"))
        click.echo(f"{item.item_id}: {item.status}")
        for made in applied:
            a = made.action
            done = f"extended on {a.account_id} to {a.expires_at or 'no expiry'}" \
                if made.extended else f"applied to {a.account_id}"
            click.echo(f"  {a.action} {done} ({a.action_id})")

    command.__doc__ = {"confirm": "Confirm ITEM_ID; its proposed action is applied.",
                       "dismiss": "Dismiss ITEM_ID (a reason is required).",
                       "escalate": "Escalate ITEM_ID to a senior analyst."}[decision]
    return review.command(decision)(command)


for _decision in ("confirm", "dismiss", "escalate"):
    _decide(_decision)


__all__ = ["policy", "review"]
