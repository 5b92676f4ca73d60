"""The batch path: a trace file through the detector, in time order, on DuckDB.

:mod:`.reader` sorts the trace by timestamp on DuckDB, with memory bounded, and turns it
into feature rows, in this process or (on large traces) in a second one; each exchange's
features then go through :class:`~distillguard.detect.engine.Detector` one at a time,
exactly as the online stage feeds it.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distillguard.detect.calibration import Calibration, file_sha256, fit_model, threshold_for
from distillguard.detect.engine import DUE_GROWTH, Detector
from distillguard.detect.features import ExchangeFeatures
from distillguard.detect.reader import check_memory_limit, receive, trace_feature_rows
from distillguard.detect.scoring import COMMUNITY_FEATURES, AccountFacts
from distillguard.geoip import GeoIP
from distillguard.traceio import FormatError, read_accounts
from distillguard.verdicts import Verdicts

# Evaluate links and risk every this many seconds of trace time (every batch path).
TICK_SECONDS = 300.0
Features = Generator[ExchangeFeatures | None, None, None]
READERS = ("auto", "process", "inline")
# A trace at least this large is read in a second process under reader="auto". Starting
# one costs about a second before the first row (imports, the GeoIP database) and the
# transfer costs a little per row: on a 135 MB trace (66,000 exchanges) the two readers
# were equally fast, on 550 MB the process was 1.2 x faster.
READER_PROCESS_MIN_BYTES = 256 * 2**20


@dataclass
class BatchResult:
    verdicts: Verdicts
    exchanges: int
    accounts: int
    evaluations: int


def facts_from_accounts(path: str | Path) -> Iterator[tuple[str, AccountFacts]]:
    for account in read_accounts(path):
        yield account.account_id, AccountFacts(
            created_at=account.created_at.timestamp() if account.created_at else None,
            payment=account.payment_fingerprint, email_domain=account.email_domain)


@contextmanager
def fewer_gc_passes(young: int = 50_000) -> Iterator[None]:
    """Let the cyclic garbage collector run less often while a batch pass builds its
    state. The detector keeps hundreds of thousands of long-lived objects (sketches,
    link groups, the graph) and makes little cyclic garbage; with the default thresholds
    the collector re-scans that state over and over (about a sixth of the CPU time of
    ``detect`` on the large preset's first 80,000 exchanges). Reference counting still
    frees everything acyclic at once, and the thresholds are restored afterwards."""
    before = gc.get_threshold()
    gc.set_threshold(young, 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*before)


def run_features(features: Iterable[ExchangeFeatures | None], calibration: Calibration, *,
                 accounts: str | Path | None = None, tick_seconds: float = TICK_SECONDS,
                 collect: bool = False, every_tick: bool = False,
                 on_progress: Callable[[int], None] | None = None,
                 progress_every: int = 10_000) -> tuple[BatchResult, Detector]:
    """Feed every exchange's features, in time order, through the detector (``None``: an
    exchange without an account, counted but not observed); returns the verdicts, with
    the detector's summary, and the detector (for calibration). Every batch path (DuckDB,
    Spark) ends here, so they give the same verdicts on the same exchanges.
    ``every_tick``: evaluate every account with new exchanges at every tick, not only
    those due (:meth:`Detector.evaluate`; calibration collects its rows so)."""
    detector = Detector(calibration, tick_seconds=tick_seconds, collect=collect,
                        due_growth=0.0 if every_tick else DUE_GROWTH)
    listed: list[str] = []
    if accounts is not None:
        for account_id, facts in facts_from_accounts(accounts):
            detector.add_account(account_id, facts)
            listed.append(account_id)
    count = 0
    with fewer_gc_passes():
        for f in features:
            count += 1
            if f is not None:
                detector.observe(f)
            if on_progress is not None and not count % progress_every:
                on_progress(count)
        detector.finish()
    if on_progress is not None and (count % progress_every or not count):
        on_progress(count)
    verdicts = detector.verdicts(listed)
    verdicts.extra["detector"] = {"exchanges": count, "evaluations": detector.evaluations,
                                  "tick_seconds": tick_seconds,
                                  "threshold": calibration.threshold,
                                  "community_threshold": calibration.community_threshold,
                                  "target_fpr": calibration.target_fpr}
    return BatchResult(verdicts, count, len(verdicts.accounts), detector.evaluations), detector


def _features(blocks: Generator[list[tuple[Any, ...]], None, None],
              on_block: Callable[[int], None] | None) -> Features:
    """Blocks of feature rows (from this process or the reader process) as features in
    time order (None for exchanges without an account)."""
    count = 0
    with closing(blocks):     # closing this generator ends the source at once
        for rows in blocks:
            count += len(rows)
            for row in rows:
                yield ExchangeFeatures(*row) if row[1] else None
            if on_block is not None:
                on_block(count)


def _trace_features(trace: str | Path, *, memory_limit: str, geoip: GeoIP | None,
                    on_block: Callable[[int], None] | None, temp_dir: str | None = None
                    ) -> Features:
    """The trace's features in time order (None for exchanges without an account),
    read and extracted in this process."""
    return _features(trace_feature_rows(trace, memory_limit=memory_limit, geoip=geoip,
                                        temp_dir=temp_dir), on_block)


_STOPS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def _stops_held() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back until the block ends: meanwhile they are only noted,
    and each noted one is raised again, to the handler it would have met, when the block
    ends. Python runs signal handlers in the main thread only, so elsewhere this holds
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    before: dict[signal.Signals, Any] = {}
    for stop in _STOPS:
        handler = signal.getsignal(stop)
        if handler is not None:      # None: set outside Python; left alone
            before[stop] = signal.signal(stop, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        for stop, handler in before.items():
            signal.signal(stop, handler)
        for signum in noted:
            signal.raise_signal(signum)


def _trace_features_in_reader(trace: str | Path, *, memory_limit: str,
                              on_block: Callable[[int], None] | None
                              ) -> Features:
    """The same features as :func:`_trace_features`, read and extracted in a second
    process (see :func:`_reader_blocks`)."""
    return _features(_reader_blocks(trace, memory_limit=memory_limit), on_block)


def _reader_blocks(trace: str | Path, *, memory_limit: str
                   ) -> Generator[list[tuple[Any, ...]], None, None]:
    """The trace's blocks of feature rows, read and extracted in a second
    process (a fresh interpreter running :func:`reader_main`, so nothing of the caller's
    program is imported or copied there) while this one runs the detector. The spill
    directory belongs to this process, which removes it however the run ends (the reader
    is stopped first)."""
    spill = tempfile.mkdtemp(prefix="distillguard-detect-")
    read_fd, write_fd = os.pipe()
    reader: subprocess.Popen[bytes] | None = None
    try:
        # The reader imports the same distillguard as this process, wherever it came from.
        package_root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        # A stop that landed while the child was being started, or before ``reader``
        # was set, would leave it running unseen (and its DuckDB could make the spill
        # directory again after it was removed), so stops wait until ``reader`` is set.
        with _stops_held():
            reader = subprocess.Popen(
                [sys.executable, "-m", "distillguard.detect.reader", str(trace),
                 memory_limit, spill, str(write_fd)], pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": path})
        os.close(write_fd)    # the reader holds the only writing end now
        write_fd = -1
        with os.fdopen(read_fd, "rb", buffering=1 << 20) as stream:
            read_fd = -1
            while True:
                message = receive(stream)
                if message is None:
                    code = reader.wait(10)
                    raise RuntimeError(f"the trace reader process ended unexpectedly "
                                       f"(exit code {code})")
                kind, payload = message
                if kind == "rows":
                    yield payload
                elif kind == "end":
                    break
                elif kind == "error":
                    raise FormatError(payload)
                else:
                    raise RuntimeError(f"the trace reader process failed:\n{payload}")
    finally:
        for fd in (read_fd, write_fd):
            # A stop (SIGTERM) can land between a call that took the descriptor over
            # (os.fdopen, os.close) and the line that marks it gone: it may be closed.
            if fd >= 0:
                with suppress(OSError):
                    os.close(fd)
        if reader is not None:
            if reader.poll() is None:
                reader.terminate()
            try:
                reader.wait(10)
            except subprocess.TimeoutExpired:
                reader.kill()
                reader.wait()
        shutil.rmtree(spill, ignore_errors=True)


def _use_reader_process(trace: str | Path, reader: str) -> bool:
    if reader not in READERS:
        raise ValueError(f"reader must be one of {', '.join(READERS)}")
    if reader != "auto":
        return reader == "process"
    try:
        size = Path(trace).stat().st_size
    except OSError:
        return False          # the in-process path reports the missing file
    return (os.cpu_count() or 1) >= 2 and size >= READER_PROCESS_MIN_BYTES


def run_batch(trace: str | Path, calibration: Calibration, *,
              accounts: str | Path | None = None, tick_seconds: float = TICK_SECONDS,
              memory_limit: str = "1GB", collect: bool = False, every_tick: bool = False,
              geoip: GeoIP | None = None,
              on_block: Callable[[int], None] | None = None,
              on_progress: Callable[[int], None] | None = None,
              reader: str = "auto") -> tuple[BatchResult, Detector]:
    """Detect over a whole trace; returns the verdicts and the detector (for calibration).

    ``reader``: ``"process"`` reads and extracts features in a second process (see
    :func:`_trace_features_in_reader`), ``"inline"`` in this one; ``"auto"`` (default)
    uses the second process for traces of READER_PROCESS_MIN_BYTES or more on a machine
    with two or more cores, when no custom ``geoip`` is given (the reader loads the
    default database itself). The verdicts are the same either way."""
    check_memory_limit(memory_limit)
    if _use_reader_process(trace, reader) and geoip is None:
        features = _trace_features_in_reader(trace, memory_limit=memory_limit,
                                             on_block=on_block)
    else:
        features = _trace_features(trace, memory_limit=memory_limit, geoip=geoip,
                                   on_block=on_block)
    with closing(features):   # a stopped run ends the reader and its spill files now
        return run_features(features, calibration, accounts=accounts,
                            tick_seconds=tick_seconds, collect=collect,
                            every_tick=every_tick, on_progress=on_progress)


def read_labels(path: str | Path) -> dict[str, bool]:
    """account_id -> True for attack accounts (a non-null campaign_id)."""
    from distillguard.traceio import iter_jsonl

    out: dict[str, bool] = {}
    for _, rec in iter_jsonl(path):
        if isinstance(rec, dict) and isinstance(rec.get("account_id"), str):
            out[rec["account_id"]] = rec.get("campaign_id") is not None
    return out


def _fold(account_id: str, folds: int) -> int:
    """The account's cross-fitting fold (a hash of its id: reproducible in any process)."""
    return zlib.crc32(account_id.encode()) % folds


FileArg = str | Path


def _worlds(trace: FileArg | Sequence[FileArg], labels: FileArg | Sequence[FileArg],
            accounts: FileArg | Sequence[FileArg] | None
            ) -> list[tuple[FileArg, FileArg, FileArg | None]]:
    """The labelled traces to calibrate on, each with its labels and accounts files."""
    def listed(x: FileArg | Sequence[FileArg]) -> list[FileArg]:
        return [x] if isinstance(x, str | Path) else list(x)

    traces, label_files = listed(trace), listed(labels)
    account_files: list[FileArg | None] = (
        [None] * len(traces) if accounts is None else list(listed(accounts)))
    if not traces or len(label_files) != len(traces) or len(account_files) != len(traces):
        raise ValueError(f"{len(traces)} trace(s), {len(label_files)} labels file(s) and "
                         f"{len(account_files) if accounts is not None else 0} accounts "
                         f"file(s): give one labels file for each trace, and one accounts "
                         f"file for each or none")
    return list(zip(traces, label_files, account_files, strict=True))


def calibrate(trace: FileArg | Sequence[FileArg], labels: FileArg | Sequence[FileArg], *,
              accounts: FileArg | Sequence[FileArg] | None = None,
              target_fpr: float = 0.001, tick_seconds: float = TICK_SECONDS,
              with_community: bool = False, folds: int = 3,
              on_step: Callable[[str], None] | None = None) -> Calibration:
    """Replays of one or several labelled traces. The first collects feature snapshots
    and fits the account model and the community model (a community is an attack one
    when most of its members are attack accounts) on all of them; it evaluates every
    account with new exchanges at every tick, so the models see each account at more
    points of its growth than detection's schedule would show them (on the tune preset,
    seed 1: 3,226 rows against 2,983, and on the development traces one benign account
    fewer flagged by the models fitted so). The thresholds are then set from every
    benign account's peak risks as detection would see them, in replays with the models,
    first the account threshold, then the community threshold among the benign accounts
    the first leaves unflagged, within the same false-positive budget.

    With ``folds`` > 1 the peaks are *out of sample*: the benign accounts are split into
    that many folds by a hash of their id, and each fold's peaks come from a replay with
    models fitted without that fold's benign snapshots (attack snapshots are kept in
    every fit). A model scores the benign accounts it was fitted on lower than new ones,
    so a threshold at their in-sample peaks flags more benign accounts on other traffic
    than the target allows. ``folds=1`` is the in-sample replay.

    Several traces (each with its labels and, if any, accounts file) are one calibration
    world: each is replayed by a detector of its own, their snapshots are fitted
    together, and their benign accounts' peaks set the thresholds together."""
    if folds < 1:
        raise ValueError("folds must be at least 1")
    step = on_step or (lambda _msg: None)
    worlds = _worlds(trace, labels, accounts)

    def of(i: int) -> str:
        return f" (trace {i + 1} of {len(worlds)})" if len(worlds) > 1 else ""

    # Accounts are told apart by their trace too: two traces may hold one id.
    attack = {(i, aid): is_attack for i, (_, lab, _) in enumerate(worlds)
              for aid, is_attack in read_labels(lab).items()}
    snaps: list[tuple[tuple[int, str], np.ndarray]] = []
    groups: list[tuple[frozenset[tuple[int, str]], np.ndarray, bool]] = []
    for i, (tr, _, acc) in enumerate(worlds):
        step(f"replay 1: collecting feature snapshots{of(i)}")
        _, first = run_batch(tr, Calibration.neutral(), accounts=acc,
                             tick_seconds=tick_seconds, collect=True, every_tick=True)
        snaps += [((i, a), row) for a, row in first.snapshots if (i, a) in attack]
        for members, row in first.group_snapshots:
            keys = frozenset((i, m) for m in members)
            groups.append((keys, row, sum(attack.get(k, False) for k in keys) * 2 > len(keys)))
    if not snaps:
        raise ValueError("no labelled account in the trace")
    fit_community = with_community and len({y for _, _, y in groups}) == 2

    fold_of = {key: _fold(key[1], folds) for key, is_attack in attack.items()
               if not is_attack}

    def fit(held: int | None) -> Calibration:
        """The models fitted without fold ``held``'s benign accounts (None: on all)."""
        def kept(key: tuple[int, str]) -> bool:
            return held is None or attack[key] or fold_of[key] != held
        rows = [(row, attack[k]) for k, row in snaps if kept(k)]
        model = fit_model(np.vstack([r for r, _ in rows]),
                          np.array([y for _, y in rows], dtype=int))
        community = None
        if fit_community:
            kept_groups = [(row, y) for members, row, y in groups
                           if held is None or y or all(kept(m) for m in members
                                                       if m in attack)]
            if len({y for _, y in kept_groups}) == 2:
                community = fit_model(np.vstack([r for r, _ in kept_groups]),
                                      np.array([y for _, y in kept_groups], dtype=int),
                                      COMMUNITY_FEATURES)
        return Calibration(model=model, threshold=1.01, target_fpr=target_fpr,
                           community=community)

    benign = list(fold_of)
    peaks = np.zeros(len(benign))
    group_peaks = np.zeros(len(benign))
    final: Calibration | None = None
    for held in ([None] if folds == 1 else range(folds)):
        name = "all accounts" if held is None else f"fold {held + 1} of {folds} held out"
        models = fit(held)
        if held is None:
            final = models
        for w, (tr, _, acc) in enumerate(worlds):
            step(f"replay {2 + (held or 0)}: peaks with the models fitted on {name}{of(w)}")
            _, replayed = run_batch(tr, models, accounts=acc, tick_seconds=tick_seconds)
            for i, key in enumerate(benign):
                if key[0] == w and (held is None or fold_of[key] == held):
                    status = replayed.status.get(key[1])
                    if status is not None:
                        peaks[i] = status.peak
                        group_peaks[i] = status.peak_group
    if final is None:
        final = fit(None)
    threshold, over = threshold_for(peaks, target_fpr)
    group_threshold, group_over = 1.01, 0
    if final.community is not None:
        left = np.array([g for p, g in zip(peaks, group_peaks, strict=True) if p < threshold])
        budget = max(0.0, target_fpr * len(benign) - over) / max(1, left.size)
        group_threshold, group_over = threshold_for(left, budget)
    # One trace: its files' digests; several: lists of them, in the order given.
    digests: dict[str, Any] = {
        "trace_sha256": [file_sha256(tr) for tr, _, _ in worlds],
        "labels_sha256": [file_sha256(lab) for _, lab, _ in worlds]}
    if len(worlds) == 1:
        digests = {k: v[0] for k, v in digests.items()}
    return Calibration(model=final.model, threshold=threshold, target_fpr=target_fpr,
                       community=final.community, community_threshold=group_threshold,
                       fitted_on={
        **digests, "tick_seconds": tick_seconds, "snapshots": len(snaps), "folds": folds,
        "community_snapshots": len(groups), "benign": len(benign),
        "attack": len(attack) - len(benign),
        "benign_flagged_at_threshold": over + group_over})
