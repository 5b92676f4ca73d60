"""kill -9 of a writer process, repeatedly, mid-stream: no acknowledged entry is lost and
the ledger still verifies (default durability, group commit)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from distillguard.ledger.checkpoint import VerifierKey, public_path
from distillguard.ledger.store import SQLiteStore
from distillguard.ledger.verify import verify_ledger

ROOT = Path(__file__).resolve().parents[1]


def _run_and_kill(directory: Path, seconds: float) -> list[tuple[int, str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.ledger_writer_proc", str(directory),
                             "32"], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    acked: list[tuple[int, str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.endswith("\n"):
                idx, _, ref = line.strip().partition(" ")
                acked.append((int(idx), ref))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    reader.join(10)
    proc.stdout.close()
    return acked


def test_kill_9_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    rng = random.Random(9)
    total_acked = 0
    for _ in range(5):
        acked = _run_and_kill(tmp_path, rng.uniform(0.4, 1.2))
        assert acked, "the writer acknowledged nothing before it was killed"
        total_acked += len(acked)
        store = SQLiteStore(tmp_path / "ledger.sqlite")
        try:
            stored = {r.idx: (r.kind, r.entry_id) for r in store.iter_rows(bodies=False)}
            for idx, ref in acked:
                assert idx in stored, f"acknowledged entry {idx} was lost"
                kind, entry_id = stored[idx]
                assert (kind == "event") if ref == "event" else (entry_id == ref)
            assert sorted(stored) == list(range(len(stored)))
            key = VerifierKey.parse(public_path(tmp_path / "ledger.key").read_text())
            report = verify_ledger(store, key)
            assert report.ok, report.to_json()
            assert report.checkpoints > 0
        finally:
            store.close()
    assert total_acked > 1000
