"""One detector for every gateway replica: features over a Redis stream.

Each replica's own detector sees only the exchanges that replica served. Behind a load
balancer that spreads an account's requests over three replicas, each sees a third of
every account, and a campaign's links (its accounts' shared templates, their co-starts)
are split three ways. With ``detect.runs_in: follower`` the replicas' stages extract each
exchange's features as before but add them to a Redis stream (``XADD``, trimmed to about
``detect.stream.max_length`` entries) instead of observing them, and one
``distillguard detect follow`` reads the stream in order, runs the detector and writes
the verdicts to the state store that every replica's policy reads.

Entries are JSON, ``{"v": "1", "f": "[...]"}`` with the fields of
:class:`~distillguard.detect.features.ExchangeFeatures` in order (and ``p``, ``s``: the
replica's publisher id and the entry's number there, by which the follower skips an
entry a replica added again after a lost reply), never pickles: whoever
can write to the stream must not be able to run code in the follower. An entry that does
not decode is skipped, logged and counted, and so is one whose exchange time is more than
``MAX_AHEAD_S`` ahead of the moment Redis added it (its entry id): the detector's clock
is the data's, and one such entry would hold back every evaluation until that time.

The follower starts from the oldest entry the stream keeps (or, with ``--from-now``,
after the newest), so a follower started again rebuilds its sketches from the traffic
the stream kept. Evaluation times come from the data, so the rows it writes again for
the same traffic are the same rows (upserted), and campaign ids are the same
(:func:`~distillguard.detect.engine.new_campaign_id`).

If Redis cannot be reached, a replica logs it once and goes on serving; the features wait
in its memory, in order, up to ``detect.stream.buffer`` entries, and are added when Redis
answers again. Beyond that the oldest are dropped and counted
(``distillguard_detector_dropped_total``). The follower waits for Redis to come back.

Several followers may run on one stream, for a standby that is current when it takes
over: each reads the whole stream and runs the detector, and only the holder of a lease
in Redis (:class:`Leadership`) writes. The others keep their changes (latest per account
and campaign, see :meth:`DetectionStage.write_unwritten`) and write them the moment they
take the lease: when its holder stops (it gives the lease back) or dies (the lease runs
out after ``detect.stream.lease_seconds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import astuple, fields
from typing import Any

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from distillguard.detect.features import ExchangeFeatures
from distillguard.detect.scoring import AccountFacts
from distillguard.detect.settings import DetectSettings, StreamSettings

log = logging.getLogger("distillguard.detect")

ENTRY_VERSION = b"1"
# How long one blocking read waits for new entries (milliseconds), and how many it takes.
READ_BLOCK_MS = 500
READ_COUNT = 1_000
# Socket timeouts towards Redis (seconds): a replica's stage must not hang on it.
REDIS_TIMEOUT_S = 2.0
# How long a replica waits after a failed add before it tries Redis again (seconds).
STREAM_RETRY_S = 1.0
# A leading follower writes for this share of its lease after it sent the renewal that
# was granted, and stops writing after that unless a later renewal was granted: the lease
# runs out in Redis only later, so a follower that can no longer reach Redis stops
# writing before any other can take over, whatever the delays on the way.
LEASE_TRUST = 0.8
# The times an entry's exchange may have: from the epoch to the last second
# datetime (and so the verdict tables' timestamps) can hold. The detector takes nothing
# else (a negative time ended its process).
MAX_TS = 253_402_300_799.0
# How far an exchange's time may be ahead of the moment Redis added its entry (the
# entry id's milliseconds), seconds. The detector's clock is the data's: one entry from
# a replica whose clock runs far ahead, or forged, would move its next evaluation (and
# every later one) that far into the future, and the verdict tables' times with it.
MAX_AHEAD_S = 60.0

_FIELDS = fields(ExchangeFeatures)


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value < 2**64


def _is_int(value: object) -> bool:
    return type(value) is int


def _is_number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]


def _is_ts(value: object) -> bool:
    return _is_number(value) and 0.0 <= value <= MAX_TS  # type: ignore[operator]


def _is_str(value: object) -> bool:
    return type(value) is str


def _is_optional_str(value: object) -> bool:
    return value is None or type(value) is str


def _is_bool(value: object) -> bool:
    return type(value) is bool


def _is_keys(value: object) -> bool:
    return type(value) is list and all(_is_u64(k) for k in value)


# What each field of an entry must be, in the dataclass's order.
_CHECKS: dict[str, Callable[[object], bool]] = {
    "exchange_id": _is_str, "account_id": _is_str, "ts": _is_ts,
    "template_keys": _is_keys, "simhash": _is_u64, "reasoning": _is_bool,
    "rubric": _is_bool, "tool_use": _is_bool, "category": _is_int, "depth": _is_int,
    "max_tokens": _is_int, "n": _is_int, "logprobs": _is_bool,
    "temperature": lambda v: v is None or _is_number(v), "prompt_tokens": _is_int,
    "completion_tokens": _is_int, "model": _is_str, "user_agent": _is_str,
    "ip_prefix": _is_optional_str, "asn": _is_optional_str, "hosting": _is_bool,
    "status": _is_int,
}
assert list(_CHECKS) == [f.name for f in _FIELDS], "a check for every field, in order"


def encode(features: ExchangeFeatures) -> dict[str, bytes]:
    """One stream entry's fields."""
    return {"v": ENTRY_VERSION, "f": orjson.dumps(astuple(features))}


def decode(entry: dict[bytes, bytes]) -> ExchangeFeatures:
    """The features of one stream entry; ValueError (saying what is wrong) for anything
    that is not an entry this version wrote."""
    version = entry.get(b"v")
    if version != ENTRY_VERSION:
        raise ValueError(f"unknown entry version {version!r}")
    try:
        values = orjson.loads(entry.get(b"f", b""))
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg}") from None
    if type(values) is not list or len(values) != len(_FIELDS):
        raise ValueError(f"expected a list of {len(_FIELDS)} fields")
    for (name, check), value in zip(_CHECKS.items(), values, strict=True):
        if not check(value):
            raise ValueError(f"bad {name}: {value!r:.60}")
    values[3] = tuple(values[3])
    if not values[1]:
        raise ValueError("empty account_id")
    return ExchangeFeatures(*values)


def _client(url: str) -> Any:
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S,
                                   socket_connect_timeout=REDIS_TIMEOUT_S)


class StreamPublisher:
    """A replica's side (``runs_in: follower``): each exchange's features go to the
    stream. The same calls as the stage's other runners; the detector is elsewhere, so
    it reports no counts of its own, and account records are read by the follower.

    While Redis cannot be reached, entries wait in memory, in order, up to
    ``detect.stream.buffer`` of them (the oldest beyond that are dropped and counted), and
    are added as soon as it answers again; it is tried again at most once a second, so
    an unreachable host does not hold up every exchange for its connect timeout."""

    restarts = 0
    needs_accounts = False

    def __init__(self, settings: StreamSettings) -> None:
        assert settings.url, "parse_settings makes sure of it"
        self.settings = settings
        self.redis = _client(settings.url)
        # Each entry says which publisher added it and its number there, so the follower
        # skips the second copy of an entry this publisher sent again (see _send).
        self.publisher_id = os.urandom(8).hex().encode()
        self.sequence = 0
        self.published = 0
        self.dropped = 0
        self.waiting: deque[dict[str, bytes]] = deque()
        self._retry_at = 0.0

    @property
    def stats(self) -> dict[str, int]:
        return {}

    @property
    def queued_bytes(self) -> int:
        """Bytes of the entries waiting for Redis (0 while it answers)."""
        return sum(len(v) for fields in self.waiting for v in fields.values())

    async def add_account(self, account_id: str, facts: AccountFacts) -> None:
        """Not sent: the follower reads account records from the state store."""

    async def observe(self, features: ExchangeFeatures) -> None:
        self.sequence += 1
        self.waiting.append({**encode(features), "p": self.publisher_id,
                             "s": str(self.sequence).encode()})
        if len(self.waiting) > self.settings.buffer:
            self.waiting.popleft()
            self.dropped += 1
        if self._retry_at and time.monotonic() < self._retry_at:
            return
        await self._send()

    async def _send(self) -> None:
        """Add every waiting entry, in order, in one round trip. A failure may come after
        Redis added some or all of them (a reply lost or too late): they are sent again,
        and the follower skips the copies by their publisher and number."""
        from redis.exceptions import RedisError

        entries = list(self.waiting)
        name, most = self.settings.name, self.settings.max_length
        try:
            if len(entries) == 1:       # the usual case: a pipeline costs more for one
                await self.redis.xadd(name, entries[0],  # type: ignore[arg-type]
                                      maxlen=most, approximate=True)
            else:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for fields in entries:
                        pipe.xadd(name, fields,  # type: ignore[arg-type]
                                  maxlen=most, approximate=True)
                    await pipe.execute()
        except (RedisError, OSError) as exc:
            if not self._retry_at:
                log.error("cannot add features to the detector stream %s (%s): they wait "
                          "here (at most %d) until it is back", self.settings.name,
                          type(exc).__name__, self.settings.buffer)
            self._retry_at = time.monotonic() + STREAM_RETRY_S
            return
        for _ in entries:
            self.waiting.popleft()
        self.published += len(entries)
        if self._retry_at:
            log.warning("the detector stream %s is back: %d waiting entries added, %d "
                        "dropped", self.settings.name, len(entries), self.dropped)
            self._retry_at = 0.0

    async def finish(self) -> None:
        """Add what is waiting, if Redis answers."""
        if self.waiting:
            await self._send()

    async def close(self) -> None:
        await self.finish()
        if self.waiting:
            self.dropped += len(self.waiting)
            log.error("%d features never reached the detector stream %s",
                      len(self.waiting), self.settings.name)
            self.waiting.clear()
        await self.redis.aclose()


class Leadership:
    """Which of the followers of one stream writes verdicts: the holder of a lease in
    Redis, a key set only if absent and with an expiry, renewed by its holder only while
    it still holds the token it set (redis-py's :class:`~redis.asyncio.lock.Lock`, whose
    scripts do these checks in Redis).

    :meth:`current` says whether this follower may write now: until LEASE_TRUST of the
    lease after the last renewal it sent that was granted. A follower cut off from Redis
    so stops writing before its lease runs out in Redis and another takes it."""

    def __init__(self, redis: Any, key: str, lease_s: float) -> None:
        from redis.asyncio.lock import Lock

        self.key = key
        self.lease_s = lease_s
        self.lock = Lock(redis, key, timeout=lease_s, blocking=False, thread_local=False,
                         raise_on_release_error=False)
        self.held = False
        self._valid_until = 0.0

    def current(self) -> bool:
        return time.monotonic() < self._valid_until

    async def renew(self) -> bool:
        """Take the lease if it is free, or renew it if this follower holds it. Returns
        whether this call took it (it was not held before)."""
        from redis.exceptions import LockError, RedisError

        sent = time.monotonic()
        try:
            if self.held:
                await self.lock.reacquire()
                taken = False
            else:
                if not await self.lock.acquire():
                    return False
                taken = True
        except LockError:
            # Run out in Redis (a renewal came too late) and maybe taken by another.
            self.held = False
            self._valid_until = 0.0
            log.warning("this follower's lease %s ran out: standing by", self.key)
            return False
        except (RedisError, OSError):
            return False            # current() runs out on its own if this goes on
        self.held = True
        self._valid_until = sent + self.lease_s * LEASE_TRUST
        return taken

    async def release(self) -> None:
        """Give the lease back (a follower that stops), so a standby takes it at once."""
        from redis.exceptions import RedisError

        self._valid_until = 0.0
        if self.held:
            self.held = False
            with contextlib.suppress(RedisError, OSError):
                await self.lock.release()


def _id_ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])


class FollowerMetrics(Collector):
    """The follower's metrics: the detector's (as the gateway serves them with a detector
    of its own) and the stream's (``detect follow --metrics-port``)."""

    def __init__(self, follower: Follower) -> None:
        self.follower = follower

    def collect(self) -> Iterator[Metric]:
        f = self.follower
        yield from f.stage.metrics.collect()
        yield CounterMetricFamily("distillguard_detector_stream_read",
                                  "Stream entries the follower has read", value=f.read + f.bad)
        yield CounterMetricFamily("distillguard_detector_stream_bad_entries",
                                  "Stream entries skipped because they did not decode "
                                  "or their time was ahead of when Redis added them",
                                  value=f.bad)
        yield CounterMetricFamily("distillguard_detector_stream_duplicates",
                                  "Copies of stream entries skipped (a replica added again "
                                  "what Redis had taken, its reply lost)",
                                  value=f.duplicates)
        yield CounterMetricFamily("distillguard_detector_stream_missed",
                                  "Stream entries trimmed away before the follower read "
                                  "them (its verdicts miss those exchanges)",
                                  value=f.missed)
        yield GaugeMetricFamily("distillguard_detector_stream_lag_seconds",
                                "How far the stream's newest entry is ahead of the last "
                                "one read (0: caught up)", value=f.lag_s)
        yield GaugeMetricFamily("distillguard_detector_follower_leading",
                                "1 while this follower holds the lease and writes "
                                "verdicts, 0 while it stands by",
                                value=int(f.leading))


class Follower:
    """``distillguard detect follow``: the stream, in order, through the online stage's
    own detector path (:meth:`DetectionStage.on_features`), verdicts to the state store.

    The detector runs in a process of its own (``runs_in="process"``), so reading and
    decoding the next entries goes on while it evaluates: side by side with the detector
    in a thread, 10,300-10,400 against 8,500-9,100 exchanges/s (bench/follower_bench.py)."""

    def __init__(self, state_url: str, settings: DetectSettings, *, from_start: bool = True,
                 on_progress: Callable[[Follower], None] | None = None,
                 progress_every_s: float = 10.0,
                 on_leading: Callable[[Follower], None] | None = None) -> None:
        from distillguard.detect.calibration import Calibration
        from distillguard.detect.online import DetectionStage

        stream = settings.stream
        if not stream.url:
            raise ValueError("detect.stream.url is not set")
        self.stream = stream
        self.stage = DetectionStage(state_url, Calibration.read(settings.calibration),
                                    tick_seconds=settings.tick_seconds, runs_in="process")
        self.from_start = from_start
        self.on_progress = on_progress
        self.progress_every_s = progress_every_s
        # Called when this follower starts or stops writing (``leading`` says which).
        self.on_leading = on_leading
        self._was_leading: bool | None = None
        self.read = 0
        self.bad = 0
        # Copies of entries skipped (a replica sent again what Redis had added, its reply
        # lost), and each publisher's last entry number read.
        self.duplicates = 0
        self._sequences: dict[bytes, int] = {}
        # Entries trimmed before this follower read them (see _count_missed), and how
        # many of the stream's entries were never this follower's to read (None: this
        # Redis does not say how many entries it was ever given, before 7.0).
        self.missed = 0
        self._not_ours: int | None = None
        self.last_id = b"0-0"
        self.lag_s = 0.0
        self.stop = asyncio.Event()
        self.metrics = FollowerMetrics(self)
        self.leadership: Leadership | None = None

    @property
    def leading(self) -> bool:
        """Whether this follower holds the lease and writes (see :class:`Leadership`)."""
        return self.leadership is not None and self.leadership.current()

    async def _renew(self) -> None:
        """Take or renew the lease; while it is held, write what waits: all a standby
        held when it takes over, and whatever a failed write or a late renewal left
        (without waiting for the next evaluation)."""
        assert self.leadership is not None
        await self.leadership.renew()
        leading = self.leading
        if leading != self._was_leading:
            self._was_leading = leading
            if leading:
                log.info("this follower holds the lease %s: it writes the verdicts (%d "
                         "waiting)", self.leadership.key, self.stage.unwritten_rows)
            else:
                log.info("this follower does not hold the lease %s (another does, or "
                         "Redis cannot be reached): it follows without writing",
                         self.leadership.key)
            if self.on_leading is not None:
                self.on_leading(self)
        if leading and self.stage.unwritten_rows:
            await self.stage.write_unwritten()

    async def _keep_lease(self) -> None:
        """Renew the lease (or wait for it) three times per lease. Nothing ends this but
        the follower's end: a follower whose renewals stopped would stop writing, and with
        no standby nobody would write."""
        while True:
            await asyncio.sleep(self.stream.lease_seconds / 3)
            try:
                await self._renew()
            except Exception:
                log.exception("renewing the follower's lease failed; trying again")

    async def _newest_id(self, redis: Any) -> bytes | None:
        """The id of the stream's newest entry (None: the stream is empty)."""
        newest = await redis.xrevrange(self.stream.name, count=1)
        return newest[0][0] if newest else None

    async def _start_id(self, redis: Any) -> bytes:
        if self.from_start:
            return b"0-0"
        return await self._newest_id(redis) or b"0-0"

    async def run(self, *, idle_exit_s: float | None = None) -> None:
        """Follow until stopped (:attr:`stop`), or until the stream has had nothing new
        for ``idle_exit_s``; then evaluate what is left and write it."""
        from redis.exceptions import RedisError

        redis = _client(self.stream.url or "")
        leadership = self.leadership = Leadership(redis, f"{self.stream.name}:leader",
                                                  self.stream.lease_seconds)
        self.stage.may_write = leadership.current
        await self.stage.start()
        await self._renew()
        lease = asyncio.create_task(self._keep_lease())
        last_progress = time.monotonic()
        idle_since = time.monotonic()
        failing = False
        started = False
        try:
            while not self.stop.is_set():
                try:
                    if not started:
                        self.last_id = await self._start_id(redis)
                        self._not_ours = await self._entries_not_ours(redis)
                        started = True
                    consumed = self.read + self.bad
                    reply = await redis.xread({self.stream.name: self.last_id},
                                              count=READ_COUNT, block=READ_BLOCK_MS)
                    if reply:
                        await self._count_missed(redis, consumed)
                except (RedisError, OSError) as exc:
                    if not failing:
                        log.error("cannot read the detector stream %s (%s); waiting for it",
                                  self.stream.name, type(exc).__name__)
                    failing = True
                    await asyncio.sleep(1.0)
                    continue
                failing = False
                now = time.monotonic()
                if not reply:
                    if idle_exit_s is not None and now - idle_since >= idle_exit_s:
                        break
                    continue
                idle_since = now
                taken = 0
                for _name, entries in reply:
                    taken += len(entries)
                    for entry_id, entry in entries:
                        self.last_id = entry_id
                        await self._take(entry_id, entry)
                self.lag_s = await self._lag(redis) if taken >= READ_COUNT else 0.0
                if self.on_progress is not None and now - last_progress >= self.progress_every_s:
                    last_progress = now
                    self.on_progress(self)
            await self.stage.flush()
        finally:
            # The lease is kept while the last evaluation is written: a long one must
            # not outlast it.
            await self.stage.close()
            if self.on_progress is not None:
                self.on_progress(self)      # the last word, while it still says who wrote
            lease.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lease
            await leadership.release()
            await redis.aclose()

    async def _added_and_kept(self, redis: Any) -> tuple[int, int] | None:
        """How many entries the stream was ever given, and how many it keeps (None:
        Redis before 7.0 does not count the first)."""
        from redis.exceptions import ResponseError

        try:
            info = await redis.xinfo_stream(self.stream.name)
        except ResponseError as exc:   # no stream yet; a failed connection is raised
            if "no such key" in str(exc).lower():
                return (0, 0)
            return None
        added = info.get("entries-added")
        return None if added is None else (int(added), int(info["length"]))

    async def _entries_not_ours(self, redis: Any) -> int | None:
        """At the start: the entries this follower will never read, and must not count
        as missed (trimmed before it started; with ``--from-now``, all there are)."""
        counts = await self._added_and_kept(redis)
        if counts is None:
            log.info("this Redis does not count the entries a stream was given (7.0 "
                     "does): entries trimmed before this follower reads them will not "
                     "be counted")
            return None
        added, kept = counts
        return added if not self.from_start else added - kept

    async def _count_missed(self, redis: Any, consumed: int) -> None:
        """After a read that returned entries: were entries trimmed away between the
        last one read before it and the first one it returned? Trimming removes the
        oldest first, so when any unread entry is gone, every one read before is gone
        too, and the unread ones gone are all the stream lost but those read before and
        those that were never this follower's. A follower more than
        ``detect.stream.max_length`` entries behind (stopped, or slower than the
        replicas) loses traffic its verdicts will not see; said once per loss."""
        if self._not_ours is None:
            return
        counts = await self._added_and_kept(redis)
        if counts is None:
            return
        added, kept = counts
        gone_unread = (added - kept) - self._not_ours - consumed
        if gone_unread > self.missed:
            log.warning("the detector stream %s was trimmed past this follower: %d "
                        "entries it had not read are gone (%d in all), and its verdicts "
                        "miss those exchanges; it fell more than detect.stream.max_length "
                        "(%d) entries behind", self.stream.name, gone_unread - self.missed,
                        gone_unread, self.stream.max_length)
            self.missed = gone_unread

    async def _lag(self, redis: Any) -> float:
        """How far the newest entry is ahead of the last one read, in seconds (stream ids
        begin with the millisecond Redis added the entry)."""
        from redis.exceptions import RedisError

        try:
            newest = await self._newest_id(redis)
        except (RedisError, OSError):
            return self.lag_s           # the next read says what is wrong
        if newest is None:
            return 0.0
        return max(0.0, (_id_ms(newest) - _id_ms(self.last_id)) / 1000.0)

    async def _take(self, entry_id: bytes, entry: dict[bytes, bytes]) -> None:
        try:
            features = decode(entry)
        except ValueError as exc:
            self.bad += 1
            log.warning("skipped detector stream entry %s: %s", entry_id.decode(), exc)
            return
        ahead = features.ts - _id_ms(entry_id) / 1000.0
        if ahead > MAX_AHEAD_S:
            self.bad += 1
            log.warning("skipped detector stream entry %s: its exchange's time is %.0f s "
                        "ahead of when Redis added it (a replica's clock, or a forged "
                        "entry)", entry_id.decode(), ahead)
            return
        publisher, number = entry.get(b"p"), entry.get(b"s")
        if publisher is not None and number is not None and number.isdigit():
            if int(number) <= self._sequences.get(publisher, 0):
                self.duplicates += 1
                return
            self._sequences[publisher] = int(number)
        self.read += 1
        await self.stage.on_features(features)
