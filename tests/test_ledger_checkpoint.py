"""The checkpoint signing key on disk: created once, read whole."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from distillguard.ledger.checkpoint import (
    SignerKey,
    VerifierKey,
    load_or_create_key,
    public_path,
)

ORIGIN = "distillguard/ledger"


def _open_keys_at_once(paths: list[str], barrier: object, results: object) -> None:
    for path in paths:
        barrier.wait()  # type: ignore[attr-defined]
        try:
            key = load_or_create_key(Path(path), ORIGIN)
            results.put((path, key.verifier.encode()))  # type: ignore[attr-defined]
        except Exception as exc:  # reported to the test, which shows it
            results.put((path, f"{type(exc).__name__}: {exc}"))  # type: ignore[attr-defined]


def test_processes_opening_a_new_ledger_at_once_share_one_key(tmp_path: Path) -> None:
    """Two gateway replicas (or serve beside a ledger command) opening a new ledger at
    once raced to create its signing key: the second failed to start, with "File exists"
    or on the still-empty key file, in 29 of 30 pairs."""
    context = multiprocessing.get_context("spawn")
    paths = [str(tmp_path / str(n) / "ledger.key") for n in range(50)]
    barrier, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_open_keys_at_once, args=(paths, barrier, results))
               for _ in range(4)]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=60) for _ in range(len(paths) * len(workers))]
    for w in workers:
        w.join(timeout=60)
    problems = [o for o in outcomes if not o[1].startswith(ORIGIN + "+")]
    assert problems == []
    assert len(set(outcomes)) == len(paths)  # one key a ledger, the same in every process
    umask = os.umask(0)
    os.umask(umask)
    for path, verifier in set(outcomes):
        key_path = Path(path)
        assert SignerKey.parse(key_path.read_text()).verifier.encode() == verifier
        assert VerifierKey.parse(public_path(key_path).read_text()).encode() == verifier
        assert key_path.stat().st_mode & 0o777 == 0o600 & ~umask
        assert sorted(p.name for p in key_path.parent.iterdir()) == ["ledger.key",
                                                                       "ledger.key.pub"]
