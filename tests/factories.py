"""Small factories shared by the tests: settings, exchanges, features, accounts, running
stacks."""

from __future__ import annotations

import dataclasses
import itertools
import re
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from distillguard.config import Settings, load_settings
from distillguard.detect.features import ExchangeFeatures
from distillguard.exchange import Exchange, Usage
from distillguard.serve import Stack, StackThread
from distillguard.store.models import Account

ADMIN_TOKEN = "adm-test-token-0123456789"
_ids = itertools.count()


def make_settings(tmp_path: Path, **sections: dict[str, Any]) -> Settings:
    base: dict[str, dict[str, Any]] = {
        "server": {"port": 0, "admin_port": 0},
        "admin": {"token": ADMIN_TOKEN},
        "upstream": {"base_url": "demo"},
        "state": {"url": f"sqlite:///{tmp_path / 'state.sqlite'}"},
        "ledger": {"path": str(tmp_path / "ledger")},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return load_settings(overrides=base, environ={})


def make_exchange(
    prompt: str = "Explain recursion.",
    *,
    account_id: str = "acct_1",
    key_id: str = "key_000000000001",
    ts: datetime | None = None,
    model: str = "demo-chat-1",
    answer: str = "Recursion is when a function calls itself.",
    client_ip: str = "203.0.113.7",
    user_agent: str = "OpenAI/Python 1.40.0",
    status: int = 200,
    **request_extra: Any,
) -> Exchange:
    n = next(_ids)
    ex = Exchange.start("/v1/chat/completions")
    ex.ts = ts or datetime(2026, 3, 1, 12, 0, tzinfo=UTC) + timedelta(seconds=n)
    ex.account_id, ex.key_id, ex.client_ip, ex.user_agent = account_id, key_id, client_ip, user_agent
    ex.model = model
    ex.request = {"model": model, "messages": [{"role": "user", "content": prompt}],
                  **request_extra}
    ex.response = {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                "finish_reason": "stop"}]}
    ex.usage = Usage(prompt_tokens=len(prompt) // 4 + 1, completion_tokens=len(answer) // 4 + 1)
    ex.status = status
    ex.latency_ms_override = 800.0
    return ex


def make_features(account: str, ts: float, **fields: Any) -> ExchangeFeatures:
    """One exchange's detection features, plain unless ``fields`` say otherwise."""
    base = ExchangeFeatures(
        exchange_id=f"ex-{account}-{ts}", account_id=account, ts=ts, template_keys=(1, 2, 3),
        simhash=0, reasoning=False, rubric=False, tool_use=False, category=0, depth=0,
        max_tokens=0, n=1, logprobs=False, temperature=None, prompt_tokens=10,
        completion_tokens=10, model="m", user_agent="ua", ip_prefix=None, asn=None,
        hosting=False, status=200)
    return dataclasses.replace(base, **fields)


def make_account(account_id: str = "acct_1", **fields: Any) -> Account:
    return Account.from_public({"account_id": account_id, "country": "DE", "tier": "standard",
                                **fields})


def make_ledger(folder: Path, entries: int, *, checkpoint_every: int | None = None) -> Any:
    """A SQLite ledger in ``folder`` of ``entries`` entries: every seventh from the fourth
    a policy event, the others exchanges of five accounts with their bodies kept; signed
    every ``checkpoint_every`` entries, else once at the end."""
    from distillguard.exchange import Retention
    from distillguard.ledger import entry
    from distillguard.ledger.core import Ledger
    from distillguard.ledger.settings import LedgerConfig

    ledger = Ledger(LedgerConfig(url=f"sqlite:///{folder / 'ledger.sqlite'}",
                                 key_path=folder / "ledger.key"))
    for i in range(entries):
        if i % 7 == 3:
            ledger.append([entry.from_event("policy:account:suspend", f"account:a{i}", "ana",
                                            "test", {"i": i})])
        else:
            ledger.append([entry.from_exchange(
                make_exchange(f"prompt {i}", account_id=f"a{i % 5}"), Retention.FULL)])
        if checkpoint_every and (i + 1) % checkpoint_every == 0:
            ledger.checkpoint()
    if not checkpoint_every:
        ledger.checkpoint()
    return ledger


def read_leaf(db: Any, idx: int) -> dict[str, Any]:
    """Ledger entry ``idx``'s leaf, from a sqlite3 connection to a SQLite ledger."""
    import orjson

    (raw,) = db.execute("SELECT leaf FROM ledger_entries WHERE idx = ?", (idx,)).fetchone()
    leaf: dict[str, Any] = orjson.loads(raw)
    return leaf


def forge_leaf(db: Any, idx: int, leaf: dict[str, Any], *, rehash: bool = True) -> None:
    """Overwrite entry ``idx``'s leaf as someone with write access to the database would:
    with its hash recomputed (``rehash``), or leaving the old hash beside it."""
    import orjson

    from distillguard.ledger import merkle

    raw = orjson.dumps(leaf, option=orjson.OPT_SORT_KEYS)
    if rehash:
        db.execute("UPDATE ledger_entries SET leaf = ?, leaf_hash = ? WHERE idx = ?",
                   (raw, merkle.leaf_hash(raw), idx))
    else:
        db.execute("UPDATE ledger_entries SET leaf = ? WHERE idx = ?", (raw, idx))


def start_stack(settings: Settings, **kwargs: Any) -> StackThread:
    return StackThread(Stack(settings, **kwargs)).start()


def new_api_key(stack: StackThread, account_id: str, verify: Any = True) -> str:
    """An account made through the running stack's admin API, and a key of it."""
    import httpx

    with httpx.Client(base_url=stack.stack.admin_url, timeout=10, verify=verify,
                      headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        admin.post("/admin/v1/accounts", json={"account_id": account_id}).raise_for_status()
        reply = admin.post(f"/admin/v1/accounts/{account_id}/keys", json={})
        reply.raise_for_status()
        return str(reply.json()["key"])


class Recorder:
    """A pipeline stage that keeps every exchange it sees, for assertions."""

    name = "recorder"

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    async def on_exchange(self, exchange: Exchange) -> None:
        self.exchanges.append(exchange)


def start_recorded_stack(settings: Settings) -> tuple[StackThread, Recorder]:
    """A running stack with the default components plus a :class:`Recorder` stage."""
    from distillguard.components import load_extensions
    from distillguard.serve import Extension

    recorder = Recorder()
    extensions = [*load_extensions(settings), Extension(stages=[recorder])]
    return StackThread(Stack(settings, extensions=extensions)).start(), recorder


class StderrLines:
    """What a subprocess writes to its stderr (opened as text), read line by line by a
    thread as it comes: a test can wait for a line that announces something (the port a
    server took) and still read everything once the process has ended, and the process
    never stalls on a full pipe."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        self.proc = proc
        self.lines: list[str] = []
        self._ended = False
        self._arrived = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._arrived:
                self.lines.append(line)
                self._arrived.notify_all()
        with self._arrived:
            self._ended = True
            self._arrived.notify_all()

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """The first line's match of ``pattern``; fails when the process ends or the
        time runs out first."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._arrived:
            while True:
                for line in self.lines[seen:]:
                    if (match := re.search(pattern, line)) is not None:
                        return match
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self._ended:
                    raise AssertionError(f"no line matching {pattern!r} within {timeout} s:"
                                         f"\n{''.join(self.lines)}")
                self._arrived.wait(left)

    def text(self, timeout: float = 60.0) -> str:
        """Everything it wrote, once it has ended."""
        self.proc.wait(timeout)
        self._thread.join(timeout)
        return "".join(self.lines)
