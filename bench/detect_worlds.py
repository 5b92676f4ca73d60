"""Detection quality over a set of simulated worlds, for one or more arms side by side.

An *arm* is a source tree and a calibration file: ``NAME=SRC:CAL``, where SRC is a
folder holding the ``distillguard`` package (a copy of another commit's ``src/``), or
``-`` for the installed one, and CAL a calibration file, or ``-`` for the one SRC ships.
Each world is simulated once into ``--work`` (kept there, so a second run or another arm
reuses it), detected by every arm in turn with ``distillguard detect`` run from that arm's
tree, and scored with this tree's ``distillguard.benchdetect`` (so every arm is judged by
the same yardstick). Printed: per world and arm, benign accounts flagged, recall,
precision, ARI, campaigns detected and the median of campaign exchanges before the first
flag; then per campaign type, recall / ARI; then each arm's totals, with the mean ARI
over the attack accounts of every type but one (the type whose absence lifts it most is
where attribution is lost). Everything goes to
``WORK/detect_worlds.json`` as well.

Worlds are ``PRESET:SEED[:SCALE[:DAYS]]`` (days 2 unless given; ``smoke`` worlds take the
preset's own length). ``--set validation`` is the ten worlds detection changes are
chosen on (docs/detection-history.md); fresh ``test`` seeds are for reporting, once.

    python -m bench.detect_worlds --work /tmp/worlds --set validation \\
        --arm before=/tmp/old/src:- --arm now=-:-
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VALIDATION = ("heldout:2", "heldout:7", "heldout:13", "heldout:21", "tune:37", "tune:38",
              "smoke:11:2", "smoke:12:2", "smoke:13:2", "heldout:31:5")
TYPES = ("slow_low", "tool_harvest", "rubric_grading", "reseller", "heavy_single",
         "model_switch", "cot_elicitation", "hydra")


@dataclass(frozen=True, slots=True)
class World:
    preset: str
    seed: int
    scale: float = 1.0
    days: float | None = None

    @classmethod
    def parse(cls, text: str) -> World:
        parts = text.split(":")
        if not 2 <= len(parts) <= 4:
            raise argparse.ArgumentTypeError(f"{text!r}: want PRESET:SEED[:SCALE[:DAYS]]")
        preset, seed = parts[0], int(parts[1])
        scale = float(parts[2]) if len(parts) > 2 else 1.0
        days = float(parts[3]) if len(parts) > 3 else (None if preset == "smoke" else 2.0)
        return cls(preset, seed, scale, days)

    @property
    def name(self) -> str:
        """Unique per simulation: worlds are kept in a folder of this name and reused."""
        default_days = None if self.preset == "smoke" else 2.0
        return (f"{self.preset}-{self.seed}" + (f"-x{self.scale:g}" if self.scale != 1 else "")
                + (f"-d{self.days:g}" if self.days != default_days else ""))


@dataclass(frozen=True, slots=True)
class Arm:
    name: str
    src: Path | None        # None: the installed package
    calibration: Path | None  # None: the file the arm's tree ships

    @classmethod
    def parse(cls, text: str) -> Arm:
        name, sep, rest = text.partition("=")
        src, sep2, cal = rest.partition(":")
        if not (sep and sep2 and name):
            raise argparse.ArgumentTypeError(f"{text!r}: want NAME=SRC:CAL ('-' for either)")
        return cls(name, None if src == "-" else Path(src), None if cal == "-" else Path(cal))

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.src is not None:
            env["PYTHONPATH"] = str(self.src.resolve())
        return env

    def calibration_file(self) -> Path:
        if self.calibration is not None:
            return self.calibration
        if self.src is not None:
            return self.src / "distillguard" / "detect" / "calibration.json"
        return Path(str(importlib.resources.files("distillguard"))) / "detect" / "calibration.json"


def simulate(world: World, work: Path) -> Path:
    """The world's folder, simulated (by this tree's simulator) unless it is there
    already."""
    from distillguard.simulate import simulate as simulate_world

    out = work / "worlds" / world.name
    if not (out / "labels.jsonl").exists():
        simulate_world(out, world.preset, world.seed, scale=world.scale, days=world.days)
    return out


def detect_and_score(world_dir: Path, arm: Arm, work: Path) -> dict[str, Any]:
    """Run the arm's detector over the world, then score the verdicts with this tree."""
    from distillguard.benchdetect import score
    from distillguard.verdicts import Verdicts

    verdicts = work / "verdicts" / arm.name / f"{world_dir.name}.json"
    verdicts.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "distillguard.cli", "detect",
                    "--trace", str(world_dir / "trace.jsonl"),
                    "--accounts", str(world_dir / "accounts.jsonl"), "--out", str(verdicts),
                    "--calibration", str(arm.calibration_file())],
                   check=True, env=arm.env(), stdout=subprocess.DEVNULL)
    return score(world_dir / "trace.jsonl", world_dir / "accounts.jsonl",
                 world_dir / "labels.jsonl", Verdicts.read(verdicts)).to_json()


def _num(value: float | None, digits: int = 3) -> str:
    """A figure, or '-' where there is none (precision with nothing flagged, say)."""
    return "-" if value is None else f"{value:.{digits}f}"


def _row(world: str, arm: str, o: dict[str, Any]) -> str:
    median = o["campaign_exchanges_before_first_flag_median"]
    return (f"| {world} | {arm} | {o['benign_flagged']} of {o['benign_accounts']:,} | "
            f"{_num(o['recall'])} | {_num(o['precision'])} | {_num(o['ari'])} | "
            f"{o['campaigns_detected']}/{o['campaigns']} | "
            f"{'-' if median is None else median} |")


def _types(world: str, arm: str, types: dict[str, Any]) -> str:
    cells = []
    for t in TYPES:
        m = types.get(t)
        if m is None:
            cells.append("-")
            continue
        cells.append(f"{_num(m['recall'], 2)} / {_num(m['ari'], 2)}")
    return f"| {world} | {arm} | " + " | ".join(cells) + " |"


def totals(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One arm's figures over every world: benign flagged of all benign accounts, the
    range of recall and of ARI, and the mean ARI (None where no world has the figure: a
    world without attack accounts has no recall)."""
    overall = [r["overall"] for r in results.values()]
    aris = [o["ari"] for o in overall if o["ari"] is not None]
    recalls = [o["recall"] for o in overall if o["recall"] is not None]
    without: dict[str, list[float]] = {}
    for o in overall:
        for kind, ari in o.get("ari_without_type", {}).items():
            without.setdefault(kind, []).append(ari)
    return {"benign_flagged": sum(o["benign_flagged"] for o in overall),
            "benign_accounts": sum(o["benign_accounts"] for o in overall),
            "recall_min": min(recalls, default=None), "recall_max": max(recalls, default=None),
            "ari_min": min(aris, default=None), "ari_max": max(aris, default=None),
            "ari_mean": statistics.fmean(aris) if aris else None,
            # mean over the worlds of the ARI over every campaign type but one
            "ari_mean_without_type": {k: statistics.fmean(v) for k, v in sorted(without.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--world", action="append", type=World.parse, default=[],
                    help="PRESET:SEED[:SCALE[:DAYS]], repeated")
    ap.add_argument("--set", choices=["validation"], help="add the ten validation worlds")
    ap.add_argument("--arm", action="append", type=Arm.parse, default=[],
                    help="NAME=SRC:CAL, repeated ('-' for the installed tree, its file)")
    args = ap.parse_args()
    worlds: list[World] = list(args.world)
    if args.set == "validation":
        worlds += [World.parse(w) for w in VALIDATION]
    arms: list[Arm] = args.arm or [Arm("installed", None, None)]
    if not worlds:
        ap.error("no worlds: give --world or --set")
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, Any]]] = {arm.name: {} for arm in arms}
    for n, world in enumerate(worlds, 1):
        folder = simulate(world, args.work)
        for arm in arms:
            print(f"[{n}/{len(worlds)}] {world.name}: {arm.name}", file=sys.stderr, flush=True)
            results[arm.name][world.name] = detect_and_score(folder, arm, args.work)
    print("| world | arm | benign flagged | recall | precision | ARI | campaigns detected |"
          " median campaign exchanges before first flag |")
    print("|---|---|---|---|---|---|---|---|")
    for world in worlds:
        for arm in arms:
            print(_row(world.name, arm.name, results[arm.name][world.name]["overall"]))
    print()
    print("| world | arm | " + " | ".join(f"`{t}`" for t in TYPES) + " |")
    print("|---|---|" + "---|" * len(TYPES))
    for world in worlds:
        for arm in arms:
            print(_types(world.name, arm.name,
                         results[arm.name][world.name]["campaign_types"]))
    print()
    summary = {arm.name: totals(results[arm.name]) for arm in arms}
    for name, t in summary.items():
        print(f"{name}: benign {t['benign_flagged']} of {t['benign_accounts']:,}; recall "
              f"{_num(t['recall_min'])}-{_num(t['recall_max'])}; ARI {_num(t['ari_min'])}-"
              f"{_num(t['ari_max'])}, mean {_num(t['ari_mean'])}")
        print(f"{name}: mean ARI leaving out one type: " + ", ".join(
            f"{kind} {ari:.3f}" for kind, ari in t["ari_mean_without_type"].items()))
    (args.work / "detect_worlds.json").write_text(json.dumps(
        {"worlds": [w.name for w in worlds], "arms": {a.name: {
            "src": str(a.src) if a.src else None, "calibration": str(a.calibration_file()),
            "totals": summary[a.name], "worlds": results[a.name]} for a in arms}}, indent=1))


if __name__ == "__main__":
    main()
