"""Proxy overhead, side by side: the upstream called directly, distillguard, and LiteLLM.

One run starts a fast mock upstream (``bench/mock_upstream.py``) and, in front of it,
each system under test as its own single process:

- ``direct``: no proxy, the mock upstream itself (the baseline);
- ``distillguard``: the gateway with keys, per-key rate limits and the exchange pipeline,
  components off (SQLite state, in-process counters);
- ``distillguard-full``: the same with every default component on (ledger, policy,
  online detection, countermeasures, dashboard index, sharing);
- ``litellm``: the LiteLLM proxy (one worker) in its best case: master-key authentication,
  no database and so no virtual keys or per-key limits. LiteLLM's virtual keys need its
  Prisma database client, whose ``prisma generate`` downloads query-engine binaries at
  install time; where that is impossible (as on an offline machine) this is the closest
  comparable configuration, and it does less work per request than distillguard does.

For every target it measures, non-streaming and streaming:

- throughput at saturation with ``wrk`` (a Lua script for the POST body);
- latency at a fixed rate (default 500 requests/s) with an asyncio client that schedules
  each send on a clock and measures from the scheduled time (no coordinated omission).

Targets are measured in turn, the order rotating every run, ``--runs`` times; the report
gives medians, added latency against ``direct`` from the same run, and throughput ratios.
The load generator is pinned to CPU 0 and upstream + proxy to CPU 1 with ``taskset``.
LiteLLM is installed into its own virtualenv (``bench/.venv-litellm``) on first use.

    python bench/proxy_bench.py --runs 3 --out bench/results/proxy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillguard.serve import free_port

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "bench" / ".venv-litellm"
LITELLM = "litellm[proxy]==1.100.5"
MODEL = "bench-model"
MESSAGES = [{"role": "user", "content": "Write one sentence about foxes."}]
ADMIN_TOKEN = "adm-bench-0123456789abcdef"
LITELLM_MASTER = "sk-master-bench-0123456789"


def pinned(cpu: str | None, argv: list[str]) -> list[str]:
    if cpu is None or shutil.which("taskset") is None:
        return argv
    return ["taskset", "-c", cpu, *argv]


def wait_http(url: str, timeout: float = 180, headers: dict[str, str] | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as r:  # noqa: S310 - loopback only
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f}s")


@dataclass
class Target:
    name: str
    base_url: str  # ends in /v1
    key: str
    process: subprocess.Popen[bytes] | None = None
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)


# -- starting the systems under test ----------------------------------------------------


class Fleet:
    def __init__(self, workdir: Path, server_cpu: str | None) -> None:
        self.workdir = workdir
        self.cpu = server_cpu
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
        proc = subprocess.Popen(pinned(self.cpu, argv), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, cwd=cwd or self.workdir)
        self.procs.append(proc)
        return proc

    def quiesce(self, limit_s: float = 30.0) -> None:
        """Wait until the started processes are idle (below 5% of a CPU together over one
        second): an earlier measurement's backlog must not run into the next one."""
        import psutil

        procs = []
        for p in self.procs:
            try:
                procs.append(psutil.Process(p.pid))
            except psutil.Error:
                continue
        deadline = time.time() + limit_s
        while time.time() < deadline:
            before = sum(process_cpu_s_of(p) for p in procs)
            time.sleep(1.0)
            if sum(process_cpu_s_of(p) for p in procs) - before < 0.05:
                return

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()

    def upstream(self) -> Target:
        port = free_port()
        proc = self.spawn("upstream", [sys.executable, str(ROOT / "bench" / "mock_upstream.py"),
                                       "--port", str(port)])
        url = f"http://127.0.0.1:{port}/v1"
        wait_http(url + "/models")
        return Target("direct", url, "sk-none", proc)

    def distillguard(self, name: str, upstream: str, full: bool) -> Target:
        import yaml

        port, admin_port = free_port(), free_port()
        folder = self.workdir / name
        folder.mkdir()
        cfg: dict[str, Any] = {
            "server": {"port": port, "admin_port": admin_port},
            "admin": {"token": ADMIN_TOKEN},
            "upstream": {"base_url": upstream, "models": [MODEL]},
            "state": {"url": f"sqlite:///{folder / 'state.sqlite'}"},
            "limits": {"tiers": {"standard": {"requests_per_minute": 100_000_000,
                                              "tokens_per_minute": 10_000_000_000,
                                              "tokens_per_day": None}}},
            "ledger": {"path": str(folder / "ledger")},
        }
        if not full:
            from distillguard.components import DEFAULT_COMPONENTS

            for component, _ in DEFAULT_COMPONENTS:
                cfg.setdefault(component, {})["enabled"] = False
        path = folder / "distillguard.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cli = [sys.executable, "-m", "distillguard.cli", "-c", str(path)]
        subprocess.run([*cli, "accounts", "create", "bench"], check=True,
                       capture_output=True)
        created = subprocess.run([*cli, "keys", "create", "bench", "--rpm", "100000000",
                                  "--tpm", "10000000000"],
                                 check=True, capture_output=True, text=True)
        key = json.loads(created.stdout.splitlines()[0])["key"]
        proc = self.spawn(name, [*cli, "serve"])
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/ready")
        return Target(name, base + "/v1", key, proc)

    def litellm(self, name: str, upstream: str) -> Target:
        import yaml

        ensure_litellm()
        port = free_port()
        folder = self.workdir / name
        folder.mkdir()
        env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": LITELLM_MASTER,
               "LITELLM_LOG": "ERROR"}
        cfg = {
            "model_list": [{"model_name": MODEL,
                            "litellm_params": {"model": f"openai/{MODEL}", "api_base": upstream,
                                               "api_key": "sk-upstream"}}],
            "general_settings": {"master_key": LITELLM_MASTER},
            "litellm_settings": {"set_verbose": False, "telemetry": False},
        }
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = self.spawn(name, [str(VENV / "bin" / "litellm"), "--config", str(path),
                                 "--host", "127.0.0.1", "--port", str(port),
                                 "--num_workers", "1"], env=env, cwd=folder)
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health/liveliness", timeout=600)
        return Target(name, base + "/v1", LITELLM_MASTER, proc)


def ensure_litellm() -> None:
    if (VENV / "bin" / "litellm").exists():
        return
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", LITELLM], check=True)


# -- load ---------------------------------------------------------------------------------


def body(stream: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 32}
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def wrk(target: Target, stream: bool, seconds: float, connections: int,
        cpu: str | None, workdir: Path) -> dict[str, float]:
    script = workdir / f"wrk-{'stream' if stream else 'plain'}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(body(stream)))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {target.key}"\n')
    url = target.base_url + "/chat/completions"
    cpu_before = process_cpu_s(target.process)
    out = subprocess.run(pinned(cpu, ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s",
                                      "--latency", "-s", str(script), url]),
                         capture_output=True, text=True, check=True).stdout
    cpu_used = process_cpu_s(target.process) - cpu_before
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(map(int, errs.groups())) if errs else 0)
    return {"rps": rps, "requests": total, "errors": errors,
            "cpu_ms_per_request": 1000 * cpu_used / max(1, total)}


def process_cpu_s_of(proc: Any) -> float:
    try:
        times = proc.cpu_times()
    except Exception:  # the process is gone
        return 0.0
    return float(times.user + times.system)


def process_cpu_s(process: subprocess.Popen[bytes] | None) -> float:
    """CPU seconds (user + system) used so far by a process and its children."""
    import psutil

    if process is None:
        return 0.0
    root = psutil.Process(process.pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


async def _fixed_rate(url: str, key: str, rate: float, seconds: float, stream: bool,
                      warmup_s: float) -> dict[str, float]:
    import aiohttp

    payload = json.dumps(body(stream)).encode()
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    latencies: list[float] = []
    errors = 0
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=1000, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(scheduled: float, record: bool) -> None:
            nonlocal errors
            try:
                async with session.post(url, data=payload, headers=headers) as r:
                    data = await r.read()
                    ok = r.status == 200 and (not stream or b"[DONE]" in data)
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if not record:
                return
            if ok:
                latencies.append((time.perf_counter() - scheduled) * 1000)
            else:
                errors += 1

        tasks = []
        total = int(rate * (seconds + warmup_s))
        warm = int(rate * warmup_s)
        t0 = time.perf_counter() + 0.05
        for i in range(total):
            scheduled = t0 + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled, i >= warm)))
        elapsed = time.perf_counter() - t0
        await asyncio.gather(*tasks)
    lat = sorted(latencies) or [float("nan")]
    return {"p50_ms": statistics.median(lat),
            "p90_ms": lat[int(0.90 * (len(lat) - 1))],
            "p99_ms": lat[int(0.99 * (len(lat) - 1))],
            "ok": len(latencies), "errors": errors, "send_rate": total / elapsed}


def fixed_rate(target: Target, stream: bool, rate: float, seconds: float,
               cpu: str | None) -> dict[str, float]:
    """Run the fixed-rate client in its own (pinned) process and return its figures."""
    argv = [sys.executable, str(Path(__file__).resolve()), "fixed-rate",
            "--url", target.base_url + "/chat/completions", "--key", target.key,
            "--rate", str(rate), "--seconds", str(seconds)] + (["--stream"] if stream else [])
    out = subprocess.run(pinned(cpu, argv), capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# -- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="dgbench-"))
    fleet = Fleet(workdir, args.server_cpu)
    results: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()
                                        if k not in ("func", "out")}, "runs": [],
                               "loadavg_before": os.getloadavg()}
    try:
        direct = fleet.upstream()
        upstream = direct.base_url
        targets = [direct]
        for name in args.targets:
            if name == "distillguard":
                targets.append(fleet.distillguard(name, upstream, full=False))
            elif name == "distillguard-full":
                targets.append(fleet.distillguard(name, upstream, full=True))
            elif name == "litellm":
                targets.append(fleet.litellm(name, upstream))
        print("targets up: " + ", ".join(t.name for t in targets), flush=True)
        for r in range(args.runs):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            run_out: dict[str, Any] = {}
            for target in order:
                row: dict[str, Any] = {}
                for stream in (False, True):
                    kind = "stream" if stream else "plain"
                    wrk(target, stream, 1, 4, args.client_cpu, workdir)  # warm-up
                    fleet.quiesce()
                    sat = row[f"wrk_{kind}"] = wrk(target, stream, args.wrk_seconds,
                                                   args.connections, args.client_cpu, workdir)
                    report = (f"run {r + 1} {target.name:>17} {kind:>6}: {sat['rps']:6.0f} "
                              f"req/s saturated ({sat['cpu_ms_per_request']:.3f} ms CPU/req)")
                    for rate in args.rates:
                        fleet.quiesce()
                        if rate > 0.9 * sat["rps"]:
                            # Beyond what it can serve: latency grows without bound and the
                            # abandoned backlog would disturb every later measurement.
                            row[f"fixed_{kind}_{rate:g}"] = None
                            report += f"; {rate:g}/s over capacity, not measured"
                            continue
                        fixed = row[f"fixed_{kind}_{rate:g}"] = fixed_rate(
                            target, stream, rate, args.seconds, args.client_cpu)
                        report += (f"; {rate:g}/s p50 {fixed['p50_ms']:.2f} "
                                   f"p99 {fixed['p99_ms']:.2f} ms err {fixed['errors']:.0f}")
                    print(report, flush=True)
                run_out[target.name] = row
            results["runs"].append(run_out)
        results["loadavg_after"] = os.getloadavg()
    finally:
        fleet.stop()
        if args.keep:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def summarise(results: dict[str, Any]) -> str:
    runs = results["runs"]
    names = list(runs[0])
    order = ["direct"] + [n for n in names if n != "direct"]
    rates = results["args"]["rates"]
    head = "| target | mode | CPU per request (ms) | saturated req/s |"
    rule = "|---|---|---|---|"
    for rate in rates:
        head += f" p50 / p99 at {rate:g}/s (ms) | added p50 / p99 (ms) | errors |"
        rule += "---|---|---|"
    lines = [head, rule]

    def med(values: Any) -> float:
        return float(statistics.median(values))

    for name in order:
        for kind in ("plain", "stream"):
            cpu = med(run[name][f"wrk_{kind}"]["cpu_ms_per_request"] for run in runs)
            rps = med(run[name][f"wrk_{kind}"]["rps"] for run in runs)
            line = f"| {name} | {kind} | {cpu:.3f} | {rps:.0f} |"
            for rate in rates:
                key = f"fixed_{kind}_{rate:g}"
                if any(run[name][key] is None for run in runs):
                    line += " over capacity | | |"
                    continue
                p50 = med(run[name][key]["p50_ms"] for run in runs)
                p99 = med(run[name][key]["p99_ms"] for run in runs)
                errors = sum(run[name][key]["errors"] for run in runs)
                added = ""
                if name != "direct" and all(run["direct"][key] for run in runs):
                    a50 = med(run[name][key]["p50_ms"] - run["direct"][key]["p50_ms"]
                              for run in runs)
                    a99 = med(run[name][key]["p99_ms"] - run["direct"][key]["p99_ms"]
                              for run in runs)
                    added = f"{a50:.2f} / {a99:.2f}"
                line += f" {p50:.2f} / {p99:.2f} | {added} | {errors:.0f} |"
            lines.append(line)
    lines.append("")
    for dg in ("distillguard", "distillguard-full"):
        if dg not in names or "litellm" not in names:
            continue
        for kind in ("plain", "stream"):
            tput = [run[dg][f"wrk_{kind}"]["rps"] / run["litellm"][f"wrk_{kind}"]["rps"]
                    for run in runs]
            cpu_ratio = [run["litellm"][f"wrk_{kind}"]["cpu_ms_per_request"]
                         / run[dg][f"wrk_{kind}"]["cpu_ms_per_request"] for run in runs]
            lines.append(f"- {dg} vs litellm ({kind}): throughput x{med(tput):.2f} "
                         f"(runs {', '.join(f'{x:.2f}' for x in tput)}), "
                         f"CPU per request x{med(cpu_ratio):.2f} less "
                         f"(runs {', '.join(f'{x:.2f}' for x in cpu_ratio)})")
    before, after = results.get("loadavg_before"), results.get("loadavg_after")
    if before and after:
        lines.append(f"- machine load average (1 min) before / after: {before[0]:.1f} / "
                     f"{after[0]:.1f} on {os.cpu_count()} CPUs")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    fr = sub.add_parser("fixed-rate", help="(internal) one fixed-rate measurement")
    fr.add_argument("--url", required=True)
    fr.add_argument("--key", required=True)
    fr.add_argument("--rate", type=float, default=500)
    fr.add_argument("--seconds", type=float, default=10)
    fr.add_argument("--stream", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rates", type=float, nargs="+", default=[200, 500],
                        help="fixed request rates to measure latency at")
    parser.add_argument("--seconds", type=float, default=10, help="per fixed-rate measurement")
    parser.add_argument("--wrk-seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--targets", nargs="+",
                        default=["distillguard", "distillguard-full", "litellm"],
                        choices=["distillguard", "distillguard-full", "litellm"])
    parser.add_argument("--client-cpu", default="0", help="CPU list for the load generator")
    parser.add_argument("--server-cpu", default="1", help="CPU list for upstream and proxies")
    parser.add_argument("--keep", action="store_true", help="keep logs and state")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "proxy")
    args = parser.parse_args()
    if args.command == "fixed-rate":
        try:
            import uvloop
        except ImportError:  # pragma: no cover
            loop_run = asyncio.run
        else:
            loop_run = uvloop.run
        print(json.dumps(loop_run(_fixed_rate(args.url, args.key, args.rate, args.seconds,
                                               args.stream, warmup_s=0.5))))
        return
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = summarise(results)
    (args.out / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
