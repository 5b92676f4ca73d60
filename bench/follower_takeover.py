"""How soon a standby follower takes over, as a share of the lease, in one run.

    python3 -m bench.follower_takeover [--redis redis://127.0.0.1:6379/0] [--lease 3]
        [--rounds 3]

Two ``distillguard detect follow`` processes on one (empty) stream, each serving its
metrics. In each round the one holding the lease (``distillguard_detector_follower_leading``
1) is ended, alternately with SIGTERM (it gives the lease back) and SIGKILL (it cannot),
and the time until the other reports that it leads is measured from the signal; a new
standby is then started for the next round. Times are printed as a share of the lease:
by design a standby takes over within 1/3 of it after a stop and within 4/3 after a
death (docs/detection.md). The stream and lease keys are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from distillguard.serve import free_port


def _leading(port: int) -> bool | None:
    """Whether the follower serving metrics on ``port`` leads (None: not answering)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1.0).text
    except httpx.HTTPError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "distillguard_detector_follower_leading":
                return sample.value == 1
    return None


def _start(config: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "distillguard.cli", "-c", str(config), "detect", "follow",
         "--metrics-port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port


def _wait(check: Callable[[], object], timeout: float) -> float:
    """Seconds until ``check()`` is true (polled every 20 ms)."""
    began = time.perf_counter()
    while time.perf_counter() - began < timeout:
        if check():
            return time.perf_counter() - began
        time.sleep(0.02)
    raise TimeoutError("no follower took over")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--lease", type=float, default=3.0, help="lease_seconds")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per signal")
    args = parser.parse_args()
    name = f"distillguard:bench:takeover:{uuid.uuid4().hex[:8]}"
    times: dict[str, list[float]] = {"SIGTERM": [], "SIGKILL": []}
    client = redis.Redis.from_url(args.redis)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "follower.yaml"
        config.write_text(json.dumps({
            "state": {"url": f"sqlite:///{tmp}/state.sqlite"},
            "detect": {"runs_in": "follower", "stream": {
                "url": args.redis, "name": name, "lease_seconds": args.lease}}}))
        followers = [_start(config)]
        _wait(lambda: _leading(followers[0][1]), 60)
        try:
            for n in range(2 * args.rounds):
                followers.append(_start(config))
                _wait(lambda: _leading(followers[-1][1]) is False, 60)
                time.sleep(args.lease)                      # a few renewals in
                how = signal.SIGTERM if n % 2 == 0 else signal.SIGKILL
                leader, standby = followers[0], followers[-1]
                leader[0].send_signal(how)
                port = standby[1]
                took = _wait(lambda: _leading(port), 10 * args.lease)  # noqa: B023
                leader[0].wait(timeout=60)
                followers.remove(leader)
                times[how.name].append(took / args.lease)
                print(f"round {n + 1}: {how.name}, taken over after {took / args.lease:.2f}"
                      " of the lease", file=sys.stderr)
        finally:
            for proc, _ in followers:
                proc.kill()
                proc.wait()
            client.delete(name, f"{name}:leader")
            client.close()
    print("| leader ended with | rounds | takeover, share of the lease (median, max) | "
          "by design at most |\n|---|---|---|---|")
    for ended, bound in (("SIGTERM", "1/3"), ("SIGKILL", "4/3")):
        got = times[ended]
        print(f"| {ended} | {len(got)} | {statistics.median(got):.2f}, {max(got):.2f} | "
              f"{bound} |")


if __name__ == "__main__":
    main()
