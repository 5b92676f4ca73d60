"""``distillguard fingerprint``: trace leaked text to accounts, test a suspect model."""

from __future__ import annotations

import click
import orjson

from distillguard.cliparams import within
from distillguard.countermeasures.fingerprint import Fingerprinter
from distillguard.files import output_path, write_atomically


def _fingerprinter(ctx: click.Context) -> Fingerprinter:
    from distillguard.countermeasures import fingerprinter_from
    from distillguard.countermeasures.settings import parse_settings

    settings = ctx.find_root().obj.settings
    fp = fingerprinter_from(parse_settings(settings.extensions.get("countermeasures")))
    if fp is None:
        raise click.UsageError("no fingerprint secret: set countermeasures.fingerprint.secret "
                               "or DISTILLGUARD_FINGERPRINT_SECRET")
    return fp


def _texts(path: str) -> tuple[list[str], list[int]]:
    """The responses of a suspect file, and the numbers of its lines that had none (the
    result counts them, as the provenance report does)."""
    from distillguard.provenance.suspect import read_suspect

    skipped: list[int] = []
    return [item.response for item in read_suspect(path, skipped)], skipped


@click.group("fingerprint")
def fingerprint() -> None:
    """Per-account response fingerprints (see docs/countermeasures.md)."""


@fingerprint.command("trace")
@click.argument("texts", type=click.Path(exists=True, dir_okay=False))
@click.option("--account", "accounts", multiple=True, help="Candidate account (repeatable).")
@click.option("--accounts-file", type=click.Path(exists=True, dir_okay=False),
              help="Accounts JSON Lines: every account in it is a candidate.")
@click.option("--alpha", default=0.01, show_default=True, type=float,
              callback=within(0, 1, low_open=True, high_open=True),
              help="Significance level of the test.")
@click.pass_context
def trace(ctx: click.Context, texts: str, accounts: tuple[str, ...],
          accounts_file: str | None, alpha: float) -> None:
    """Score leaked TEXTS (JSON Lines, any suspect format) against candidate accounts."""
    candidates = list(accounts)
    if accounts_file:
        from distillguard.traceio import read_accounts

        candidates += [a.account_id for a in read_accounts(accounts_file)]
    if not candidates:
        raise click.UsageError("give --account or --accounts-file")
    fp = _fingerprinter(ctx)
    leaked, skipped = _texts(texts)
    scores = fp.trace(leaked, candidates)
    cut = alpha / len(candidates)
    result = {"alpha": alpha, "bonferroni_cut": cut, "candidates": len(candidates),
              "texts": len(leaked), "skipped_lines": len(skipped),
              "named": [s.subject for s in scores if s.p_value < cut],
              "scores": [s.to_dict() for s in scores[:20]]}
    click.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


@fingerprint.command("model-test")
@click.option("--outputs", type=click.Path(exists=True, dir_okay=False),
              help="The suspect model's answers, already collected (JSON Lines).")
@click.option("--base-url", help="OpenAI-compatible API of the suspect model.")
@click.option("--model", help="Model name at --base-url.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False),
              help="Prompts to send (JSON Lines: strings or objects with a prompt field).")
@click.option("--api-key", envvar="SUSPECT_API_KEY", default="none")
@click.option("--alpha", default=0.01, show_default=True, type=float,
              callback=within(0, 1, low_open=True, high_open=True),
              help="Significance level of the test.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), callback=output_path)
@click.pass_context
def model_test_cmd(ctx: click.Context, outputs: str | None, base_url: str | None,
                   model: str | None, prompts: str | None, api_key: str, alpha: float,
                   out_path: str | None) -> None:
    """Test whether a model was trained on outputs carrying this gateway's global mark."""
    from distillguard.countermeasures.modeltest import model_test, query_model

    fp = _fingerprinter(ctx)
    skipped: list[int] = []
    if outputs:
        texts, skipped = _texts(outputs)
    elif base_url and model and prompts:
        from distillguard.traceio import iter_jsonl

        asked = [o if isinstance(o, str) else str(o.get("prompt") or o.get("question") or "")
                 for _, o in iter_jsonl(prompts)]
        if not any(asked):
            # no prompt, no slot: the test answered "not trained" as if it had tested
            raise click.UsageError(f"{prompts} holds no prompt (lines that are strings, or "
                                   "objects with a 'prompt' or 'question' field)")
        texts = query_model(base_url, api_key, model, [p for p in asked if p])
    else:
        raise click.UsageError("give --outputs, or --base-url, --model and --prompts")
    result = {**model_test(fp, texts, alpha), "skipped_lines": len(skipped)}
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if out_path:
        write_atomically(out_path, text.encode())
    click.echo(text)
