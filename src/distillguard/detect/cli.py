"""``distillguard detect``: batch campaign detection over a trace, and its calibration.

::

    distillguard detect --trace TRACE.jsonl [--accounts ACCOUNTS.jsonl] --out VERDICTS.json
    distillguard detect calibrate --trace T --accounts A --labels L --out calibration.json

The first writes the verdicts format (docs/formats.md); the second fits the risk model
and sets the flag threshold from a target false-positive rate on the labelled benign
accounts (docs/detection.md).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import click
import orjson
from tqdm import tqdm

from distillguard.cliparams import PORT, positive
from distillguard.detect.batch import (
    READER_PROCESS_MIN_BYTES,
    READERS,
    TICK_SECONDS,
    BatchResult,
    run_batch,
)
from distillguard.detect.batch import calibrate as run_calibration
from distillguard.detect.calibration import Calibration
from distillguard.detect.reader import check_memory_limit
from distillguard.detect.settings import MAX_TICK_SECONDS
from distillguard.files import output_path
from distillguard.netaddr import authority


def exit_on_sigterm() -> None:
    """A stopped run (``kill``, a job scheduler's time limit) exits through Python, so the
    sort's spill directory and open files are cleaned up as on an error."""
    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


# What the settings file's detect.tick_seconds allows (detect/settings.py).
tick_seconds_of = positive(MAX_TICK_SECONDS)


def memory_limit_of(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return check_memory_limit(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group("detect", invoke_without_command=True)
@click.option("--trace", type=click.Path(exists=True, dir_okay=False),
              help="Trace file (JSON Lines, any order; .gz accepted), or a ledger's "
                   "Parquet export (.parquet).")
@click.option("--ledger", "from_ledger", is_flag=True,
              help="Detect over every exchange in the ledger of the settings instead of a "
                   "trace file (account records from the state store unless --accounts).")
@click.option("--accounts", type=click.Path(exists=True, dir_okay=False),
              help="Accounts file (JSON Lines): sign-up time, payment fingerprint, org.")
@click.option("--key", "key_path", type=click.Path(exists=True, dir_okay=False),
              help="With a ledger export as --trace: the ledger's public key. The export "
                   "is verified first (its signed checkpoint, every row, no gap), and "
                   "nothing is detected if it does not verify.")
@click.option("--out", type=click.Path(dir_okay=False), callback=output_path,
              help="Verdicts file to write.")
@click.option("--calibration", "calibration_path", type=click.Path(exists=True, dir_okay=False),
              help="Calibration file (default: the one shipped with distillguard).")
@click.option("--tick-seconds", default=TICK_SECONDS, show_default=True, type=float,
              callback=tick_seconds_of,
              help="Evaluate links and risk every this many seconds of trace time.")
@click.option("--memory-limit", default="1GB", show_default=True, callback=memory_limit_of,
              help="DuckDB memory limit for sorting the trace (spills to disk beyond it): "
                   "a size such as 1GB or 500MB, or a share of RAM such as 50%.")
@click.option("--progress-log", type=click.Path(dir_okay=False),
              help="Also write progress as JSON Lines (exchanges, seconds, resident MB).")
@click.option("--reader", type=click.Choice(READERS), default="auto", show_default=True,
              help="Read the trace and extract features in a second process ('process') "
                   "or in this one ('inline'); 'auto': a second process for traces of "
                   f"{READER_PROCESS_MIN_BYTES // 2**20} MiB or more on two or more cores. "
                   "Verdicts are the same.")
@click.pass_context
def detect(ctx: click.Context, trace: str | None, from_ledger: bool, accounts: str | None,
           key_path: str | None, out: str | None, calibration_path: str | None,
           tick_seconds: float, memory_limit: str, progress_log: str | None,
           reader: str) -> None:
    """Find distillation campaigns in a trace (or the ledger) and write verdicts with
    evidence."""
    if ctx.invoked_subcommand is not None:
        return
    if not out or bool(trace) == from_ledger:
        raise click.UsageError("--out and one of --trace or --ledger are required (or use "
                               "a sub-command)")
    is_export = bool(trace) and str(trace).endswith(".parquet")
    if key_path is not None and not is_export:
        raise click.UsageError("--key verifies a ledger export: give it with "
                               "--trace FILE.parquet")
    calibration = Calibration.read(calibration_path)
    if key_path is not None:
        check_export(str(trace), key_path)
    elif is_export:
        click.echo(f"note: {trace} was not verified (its signatures and whether rows are "
                   "missing); pass --key LEDGER_PUBLIC_KEY to verify it first", err=True)
    began = time.perf_counter()
    exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="distillguard-detect-") as spill:
        if from_ledger:
            trace, accounts = ledger_trace(ctx, Path(spill), accounts)
        assert trace is not None
        with Progress(progress_log) as progress:
            result, _ = run_batch(trace, calibration, accounts=accounts,
                                  tick_seconds=tick_seconds, memory_limit=memory_limit,
                                  on_progress=progress, reader=reader)
    write_verdicts(result, out, time.perf_counter() - began)


def check_export(export: str, key_path: str) -> None:
    """Verify a ledger's Parquet export with its public key (``ledger verify-proof``'s
    check: the signed checkpoint, every row against it, the declared range whole) before
    detection reads it; ClickException when it does not verify. Detection itself checks
    only that bodies have the hashes their leaves commit to."""
    from distillguard.ledger.cli import read_public_key
    from distillguard.ledger.verifier import VerificationFailed, verify_export

    try:
        checked = verify_export(Path(export), read_public_key(key_path))
    except VerificationFailed as exc:
        raise click.ClickException(f"{export} does not verify with {key_path}: {exc}; "
                                   "nothing was detected") from None
    click.echo(f"{export}: verified, {checked['rows']} entries (indexes {checked['start']} "
               f"up to {checked['end']}) of a signed tree of {checked['tree_size']}", err=True)


def ledger_trace(ctx: click.Context, into: Path, accounts: str | None
                 ) -> tuple[str, str | None]:
    """The ledger's exchanges as a trace file in ``into`` (then read as any trace, sorted
    by time with memory bounded), and, unless ``accounts`` names a file, the state
    store's account records beside it."""
    import asyncio

    from distillguard.ledger.core import Ledger
    from distillguard.ledger.settings import parse_settings as ledger_settings
    from distillguard.ledger.source import write_trace
    from distillguard.store import all_accounts
    from distillguard.traceio import write_accounts

    root = ctx.find_root().obj
    config = ledger_settings(root.settings)
    if not config.enabled:
        raise click.UsageError("the ledger is disabled in the settings (ledger.enabled)")
    ledger = Ledger(config, create_key=False)
    trace = into / "trace.jsonl"
    try:
        with tqdm(total=ledger.size, unit=" entries", unit_scale=True, disable=None,
                  mininterval=1.0, file=sys.stderr, desc="ledger") as bar:
            written = write_trace(ledger, trace, on_progress=lambda n: bar.update(n - bar.n))
    finally:
        ledger.close()
    if written.without_bodies:
        click.echo(f"warning: {written.without_bodies:,} of {written.exchanges:,} exchanges "
                   "have no bodies in the ledger (ledger.retention: hash, or redacted); "
                   "their prompts cannot be read, so template and prompt signals are "
                   "missing for them", err=True)
    if accounts is None:
        path = into / "accounts.jsonl"
        write_accounts(asyncio.run(root.with_store(all_accounts)), path)
        accounts = str(path)
    return str(trace), accounts


def resident_mb() -> float | None:
    """This process's resident memory now (Linux), not its peak."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


class Progress:
    """Exchanges through the detector so far: a bar on a terminal's stderr and, when
    asked, a JSON Lines log of (exchanges, seconds since the start, resident MB) that
    benchmarks read to draw how time and memory grow with the trace."""

    def __init__(self, log: str | None = None) -> None:
        self.began = time.perf_counter()
        self.bar = tqdm(unit=" ex", unit_scale=True, disable=None, mininterval=1.0,
                        file=sys.stderr, desc="detect")
        self.log: IO[bytes] | None = open(log, "wb") if log else None  # noqa: SIM115
        self.done = 0

    def __call__(self, count: int) -> None:
        self.bar.update(count - self.done)
        self.done = count
        if self.log is not None:
            self.log.write(orjson.dumps({
                "exchanges": count, "seconds": round(time.perf_counter() - self.began, 3),
                "rss_mb": resident_mb()}) + b"\n")
            self.log.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.bar.close()
        if self.log is not None:
            self.log.close()


def write_verdicts(result: BatchResult, out: str, elapsed: float) -> None:
    """Write the verdicts file and say on stderr what was found (every batch command)."""
    result.verdicts.write(out)
    flagged = sum(1 for a in result.verdicts.accounts if a.flagged)
    click.echo(f"{result.exchanges} exchanges, {result.accounts} accounts: {flagged} flagged "
               f"in {len(result.verdicts.campaigns)} campaigns; {elapsed:.1f} s "
               f"({result.exchanges / max(elapsed, 1e-9):,.0f} exchanges/s) -> {out}",
               err=True)


@detect.command("follow")
@click.option("--from-now", is_flag=True,
              help="Start after the stream's newest entry (default: from the oldest it "
                   "keeps, rebuilding the detector's state from them).")
@click.option("--idle-exit", type=float, callback=positive(),
              help="Stop once the stream has had nothing new for this many seconds "
                   "(default: follow until stopped).")
@click.option("--metrics-port", type=PORT,
              help="Serve Prometheus metrics (the detector's and the stream's) on this "
                   "port (0: one the system picks; the address is printed).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@click.pass_context
def follow(ctx: click.Context, from_now: bool, idle_exit: float | None,
           metrics_port: int | None, metrics_host: str) -> None:
    """Run the one detector of every gateway replica (detect.runs_in: follower): read the
    features the replicas add to the Redis stream (detect.stream), in order, and write
    verdicts to the state store that their policy reads. Several may run: the holder of
    a lease in Redis writes, the others stand by, current, and take over when it stops
    or dies."""
    import asyncio

    from distillguard.detect.settings import parse_settings
    from distillguard.detect.stream import Follower

    settings = ctx.find_root().obj.settings
    section = parse_settings(settings.extensions.get("detect"))
    if not section.stream.url:
        raise click.UsageError("set detect.stream.url (the Redis URL the replicas add "
                               "features to) in the settings")

    def progress(f: Follower) -> None:
        stats = f.stage.runner.stats
        missed = f", {f.missed:,} trimmed before it read them" if f.missed else ""
        click.echo(f"followed {f.read:,} exchanges ({f.bad} bad entries skipped{missed}); "
                   f"{stats.get('evaluations', 0):,} evaluations, {stats.get('accounts', 0):,} "
                   f"accounts; {f.stage.written:,} verdict rows written"
                   f"{'' if f.leading else ' (not writing: it does not hold the lease)'}",
                   err=True)

    def leading(f: Follower) -> None:
        click.echo(f"holds the lease {f.stream.name}:leader: this follower writes the "
                   "verdicts" if f.leading else
                   f"does not hold the lease {f.stream.name}:leader (another follower "
                   "does, or Redis cannot be reached): following without writing",
                   err=True)

    follower = Follower(settings.state.url, section, from_start=not from_now,
                        on_progress=progress, on_leading=leading)
    server = None
    if metrics_port is not None:
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        registry.register(follower.metrics)
        try:
            server, _ = start_http_server(metrics_port, addr=metrics_host, registry=registry)
        except OSError as exc:
            raise click.UsageError(f"cannot serve metrics on {authority(metrics_host, metrics_port)}: "
                                   f"{exc.strerror}") from None
        click.echo(f"metrics on http://{authority(metrics_host, server.server_port)}/metrics",
                   err=True)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for stop in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(stop, follower.stop.set)
        await follower.run(idle_exit_s=idle_exit)

    try:
        asyncio.run(run())
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


@detect.command("calibrate")
@click.option("--trace", required=True, multiple=True,
              type=click.Path(exists=True, dir_okay=False),
              help="A labelled trace; give it again for each further trace to fit on "
                   "together.")
@click.option("--accounts", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Its accounts file (one for each --trace, in order, or none).")
@click.option("--labels", required=True, multiple=True,
              type=click.Path(exists=True, dir_okay=False),
              help="labels.jsonl: account_id and campaign_id (null for benign accounts); "
                   "one for each --trace, in order.")
@click.option("--target-fpr", default=0.001, show_default=True, type=float,
              help="Share of benign accounts allowed to be flagged.")
@click.option("--tick-seconds", default=TICK_SECONDS, show_default=True, type=float,
              callback=tick_seconds_of)
@click.option("--community/--no-community", default=False, show_default=True,
              help="Also fit the community model (flags linked groups as a whole).")
@click.option("--folds", default=3, show_default=True, type=int,
              help="Set the thresholds from benign peaks scored by models fitted without "
                   "them (cross-fitting in this many folds); 1: in-sample.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), callback=output_path)
def calibrate(trace: tuple[str, ...], accounts: tuple[str, ...], labels: tuple[str, ...],
              target_fpr: float, tick_seconds: float, community: bool, folds: int,
              out: str) -> None:
    """Fit the risk model and set the threshold for a target false-positive rate, on one
    labelled trace or on several together."""
    if not 0.0 <= target_fpr < 1.0:
        raise click.BadParameter("must be in [0, 1)", param_hint="--target-fpr")
    if folds < 1:
        raise click.BadParameter("must be at least 1", param_hint="--folds")
    began = time.perf_counter()
    try:
        calibration = run_calibration(list(trace), list(labels),
                                      accounts=list(accounts) or None, target_fpr=target_fpr,
                                      tick_seconds=tick_seconds, with_community=community,
                                      folds=folds,
                                      on_step=lambda msg: click.echo(msg, err=True))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    calibration.write(out)
    info = calibration.fitted_on
    click.echo(orjson.dumps({"threshold": calibration.threshold, "benign": info["benign"],
                             "attack": info["attack"], "snapshots": info["snapshots"],
                             "benign_flagged": info["benign_flagged_at_threshold"],
                             "seconds": round(time.perf_counter() - began, 1)}).decode(),
               err=True)
