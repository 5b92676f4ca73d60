"""The detector stream's entries (detect/stream.py) and its settings; the replicas and
the follower end to end are in test_detect_online.py; the followers' lease."""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path

import orjson
import pytest

from distillguard.detect.settings import parse_settings
from distillguard.detect.stream import decode, encode
from distillguard.errors import ConfigError
from tests.factories import make_features


def test_an_entry_gives_back_the_features_it_was_made_from() -> None:
    features = make_features("acct_a", 1_772_000_000.125, template_keys=(2**64 - 1, 0, 7),
                             simhash=2**63 + 5, temperature=0.7, ip_prefix="203.0.113.0/24",
                             asn="AS64500", hosting=True, reasoning=True)
    entry = {k.encode(): v for k, v in encode(features).items()}
    assert decode(entry) == features
    assert decode({**entry, b"extra": b"x"}) == features


def _entry(values: list[object]) -> dict[bytes, bytes]:
    return {b"v": b"1", b"f": orjson.dumps(values)}


@pytest.mark.parametrize(("change", "message"), [
    (lambda e: {**e, b"v": b"2"}, "unknown entry version"),
    (lambda e: {b"f": e[b"f"]}, "unknown entry version"),
    (lambda e: {**e, b"f": pickle.dumps(object)}, "not JSON"),
    (lambda e: {**e, b"f": b"{}"}, "expected a list"),
    (lambda e: _entry(orjson.loads(e[b"f"])[:-1]), "expected a list"),
    (lambda e: _entry(["x", "acct_a", "noon", *orjson.loads(e[b"f"])[3:]]), "bad ts"),
    (lambda e: _entry(["x", "acct_a", -1.0, *orjson.loads(e[b"f"])[3:]]), "bad ts"),
    (lambda e: _entry(["x", "acct_a", 1e300, *orjson.loads(e[b"f"])[3:]]), "bad ts"),
    (lambda e: _entry([*orjson.loads(e[b"f"])[:3], [-1], *orjson.loads(e[b"f"])[4:]]),
     "bad template_keys"),
    (lambda e: _entry([*orjson.loads(e[b"f"])[:5], 1, *orjson.loads(e[b"f"])[6:]]),
     "bad reasoning"),
    (lambda e: _entry(["x", "", *orjson.loads(e[b"f"])[2:]]), "empty account_id"),
])
def test_an_entry_that_is_not_ours_is_refused(change: object, message: str) -> None:
    good = {k.encode(): v for k, v in encode(make_features("acct_a", 1.0)).items()}
    with pytest.raises(ValueError, match=message):
        decode(change(good))  # type: ignore[operator]


def test_a_follower_needs_the_stream_url() -> None:
    with pytest.raises(ConfigError, match=r"detect\.stream\.url"):
        parse_settings({"runs_in": "follower"})
    section = parse_settings({"runs_in": "follower",
                              "stream": {"url": "redis://127.0.0.1:6379/0"}})
    assert section.stream.name == "distillguard:detect:features"
    with pytest.raises(ConfigError, match=r"detect\.stream\.max_length"):
        parse_settings({"stream": {"max_length": 10}})


@pytest.mark.redis
def test_one_follower_holds_the_lease_and_stops_writing_before_it_runs_out(
        redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """Of two followers, the first to ask holds the lease. Left unrenewed, its holder
    stops counting itself the writer (at LEASE_TRUST of the lease) before Redis lets it
    go; the other then takes it, and the first, renewing late, learns it lost it."""
    from distillguard.detect.stream import LEASE_TRUST, Leadership, _client

    key = f"{redis_prefix}:leader"

    async def go() -> None:
        redis = _client(redis_url)
        # Three seconds: each step below has half a second of margin on a loaded machine.
        first, second = Leadership(redis, key, 3.0), Leadership(redis, key, 3.0)
        try:
            assert await first.renew() is True
            assert first.current() and await second.renew() is False
            assert not second.current()
            await asyncio.sleep(LEASE_TRUST * 3.0 + 0.05)
            assert not first.current()          # it no longer writes...
            assert await second.renew() is False   # ...before the lease is free
            await asyncio.sleep(1.0)
            assert await second.renew() is True and second.current()
            assert await first.renew() is False and not first.held
            await second.release()
            assert not second.current() and await first.renew() is True
            await first.release()
        finally:
            await redis.delete(key)
            await redis.aclose()

    with caplog.at_level("WARNING", logger="distillguard.detect"):
        asyncio.run(go())
    assert any("ran out: standing by" in r.getMessage() for r in caplog.records)


@pytest.mark.redis
def test_a_failed_renewal_does_not_end_the_follower_s_renewals(
        tmp_path: Path, redis_url: str, redis_prefix: str,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected error in one renewal is logged, and the next renewals go on: a
    follower whose renewals stopped would stop writing with no one to take over."""
    from distillguard.detect.settings import DetectSettings, StreamSettings
    from distillguard.detect.stream import Follower, Leadership

    calls = 0
    renew = Leadership.renew

    async def failing_once(self: Leadership) -> bool:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("boom")
        return await renew(self)

    monkeypatch.setattr(Leadership, "renew", failing_once)
    stream = StreamSettings(url=redis_url, name=f"{redis_prefix}:features", lease_seconds=1.5)
    follower = Follower(f"sqlite:///{tmp_path}/state.sqlite",
                        DetectSettings(runs_in="follower", stream=stream))

    async def go() -> bool:
        following = asyncio.create_task(follower.run())
        await asyncio.sleep(3.0)        # six renewals, the second one failing
        leading = follower.leading
        follower.stop.set()
        await following
        return leading

    with caplog.at_level("ERROR", logger="distillguard.detect"):
        assert asyncio.run(go()) and calls >= 4
    assert any("renewing the follower's lease failed" in r.getMessage()
               for r in caplog.records)


@pytest.mark.redis
def test_a_follower_says_what_the_stream_trimmed_before_it_read_it(
        tmp_path: Path, redis_url: str, redis_prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A follower more than ``max_length`` entries behind lost the entries trimmed
    before it read them without a word: its verdicts missed that traffic and nothing
    said so. It now counts them (exactly) and says it once per loss."""
    from distillguard.detect.settings import DetectSettings, StreamSettings
    from distillguard.detect.stream import Follower, _client

    name = f"{redis_prefix}:features"
    stream = StreamSettings(url=redis_url, name=name, max_length=1_000)
    follower = Follower(f"sqlite:///{tmp_path}/state.sqlite",
                        DetectSettings(runs_in="follower", stream=stream))
    taking = follower._take
    first_taken, resume = asyncio.Event(), asyncio.Event()

    async def slow_take(entry_id: bytes, entry: dict[bytes, bytes]) -> None:
        await taking(entry_id, entry)
        if not first_taken.is_set():
            first_taken.set()
            await resume.wait()     # stalls here while the replicas go on adding

    follower._take = slow_take  # type: ignore[method-assign]

    async def add(redis: object, start: int, n: int) -> None:
        for i in range(start, start + n):
            await redis.xadd(name, encode(make_features(f"acct_{i % 7}", 1.0 + i)),  # type: ignore[attr-defined]
                             maxlen=1_000, approximate=True)

    async def go() -> tuple[int, int]:
        redis = _client(redis_url)
        try:
            await add(redis, 0, 50)      # the stream kept all of these before it started
            following = asyncio.create_task(follower.run(idle_exit_s=1.0))
            await first_taken.wait()
            await add(redis, 50, 5_000)
            kept = await redis.xlen(name)
            resume.set()
            await following
            return kept, follower.read
        finally:
            await redis.delete(name, f"{name}:leader")
            await redis.aclose()

    with caplog.at_level("WARNING", logger="distillguard.detect"):
        kept, read = asyncio.run(go())
    # it read the 50 it had taken and the `kept` newest; all between are gone
    assert follower.missed == 5_050 - 50 - kept > 3_000
    assert read == 50 + kept and follower.bad == 0
    warned = [r.getMessage() for r in caplog.records if "trimmed past" in r.getMessage()]
    assert len(warned) == 1 and f"{follower.missed} entries it had not read" in warned[0]


@pytest.mark.redis
def test_an_entry_added_again_after_a_lost_reply_is_taken_once(
        tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    """Redis adds a replica's entry but its reply does not come back in time: the
    replica keeps the entry and adds it again with the next one. The follower takes
    each exchange once and counts the copy."""
    from redis.exceptions import TimeoutError as RedisTimeout

    from distillguard.detect.calibration import Calibration
    from distillguard.detect.online import DetectionStage
    from distillguard.detect.settings import DetectSettings, StreamSettings
    from distillguard.detect.stream import Follower

    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    stream = StreamSettings(url=redis_url, name=f"{redis_prefix}:features")

    async def go() -> Follower:
        replica = DetectionStage(url, Calibration.read(), runs_in="follower", stream=stream)
        redis = replica.runner.redis      # type: ignore[attr-defined]
        xadd = redis.xadd

        async def added_but_no_reply(*args: object, **kwargs: object) -> object:
            await xadd(*args, **kwargs)
            redis.xadd = xadd
            raise RedisTimeout("Timeout reading from socket")

        redis.xadd = added_but_no_reply
        await replica.on_features(make_features("acct_a", 1_772_000_000.0))
        assert len(replica.runner.waiting) == 1      # type: ignore[attr-defined]
        replica.runner._retry_at = 0.0                # type: ignore[attr-defined]
        await replica.on_features(make_features("acct_a", 1_772_000_001.0))
        await replica.close()
        follower = Follower(url, DetectSettings(runs_in="follower", stream=stream))
        await follower.run(idle_exit_s=0.5)
        return follower

    import redis as redis_sync

    client = redis_sync.Redis.from_url(redis_url)
    try:
        follower = asyncio.run(go())
        assert client.xlen(stream.name) == 3
    finally:
        client.delete(stream.name, f"{stream.name}:leader")
        client.close()
    assert follower.stage.fed == 2 and follower.bad == 0
    assert (follower.read, follower.duplicates) == (2, 1)
