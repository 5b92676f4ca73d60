"""``bench detect``: metrics on verdicts constructed against known ground truth."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from distillguard.benchdetect import adjusted_rand_index, read_labels, run_baseline, score
from distillguard.cli import main
from distillguard.simulate import simulate
from distillguard.traceio import read_trace
from distillguard.verdicts import AccountVerdict, CampaignVerdict, Verdicts


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return simulate(tmp_path_factory.mktemp("bench"), preset="smoke", seed=11, days=0.5)


def _first_seen(trace: Path) -> dict[str, list]:
    seen: dict[str, list] = defaultdict(list)
    for ex in read_trace(trace):
        seen[str(ex.account_id)].append(ex.ts)
    return seen


def _perfect(labels: Path, trace: Path, after: int = 3) -> Verdicts:
    """Every attack account flagged (at its ``after``-th exchange, or its last when it sent
    fewer), campaigns exactly as in the truth."""
    truth = read_labels(labels)
    seen = _first_seen(trace)
    accounts, members = [], defaultdict(list)
    for acct, t in truth.items():
        times = sorted(seen.get(acct, []))
        accounts.append(AccountVerdict(
            account_id=acct, flagged=t.attack, risk=1.0 if t.attack else 0.0,
            campaign_id=t.campaign_id,
            first_flagged_at=times[min(after, len(times) - 1)] if t.attack and times else None))
        if t.attack:
            members[str(t.campaign_id)].append(acct)
    return Verdicts(accounts=accounts,
                    campaigns=[CampaignVerdict(campaign_id=c, accounts=m)
                               for c, m in members.items()],
                    extra={"elapsed_seconds": 2.0})


def test_ari_known_values() -> None:
    assert adjusted_rand_index(["a", "a", "b", "b"], ["x", "x", "y", "y"]) == 1.0
    assert adjusted_rand_index(["a", "a", "b", "b"], ["y", "y", "x", "x"]) == 1.0
    assert adjusted_rand_index(["a", "a", "a", "a"], ["1", "2", "3", "4"]) == 0.0
    # merging two true groups: cells 3, rows 3, columns 7 of 15 pairs -> (3-1.4)/(5-1.4)
    value = adjusted_rand_index(["a", "a", "b", "b", "c", "c"], ["x", "x", "x", "x", "y", "y"])
    assert value == pytest.approx(4 / 9)


def test_perfect_verdicts_score_perfectly(world: tuple[Path, Path, Path]) -> None:
    trace, accounts, labels = world
    s = score(trace, accounts, labels, _perfect(labels, trace))
    o = s.overall
    truth = read_labels(labels)
    seen = _first_seen(trace)
    assert o["precision"] == 1.0 and o["recall"] == 1.0 and o["f1"] == 1.0
    assert o["benign_fpr"] == 0.0 and o["hard_negative_fpr"] == 0.0
    assert o["ari"] == 1.0
    assert o["campaigns_detected"] == o["campaigns"] == len(
        {t.campaign_id for t in truth.values() if t.attack and t.account_id in seen})
    # flagged at the 4th exchange (or the last): exactly that many came before
    before = sorted(min(3, len(seen[a]) - 1) for a, t in truth.items()
                    if t.attack and a in seen)
    assert o["exchanges_before_flag_median"] == pytest.approx(
        (before[(len(before) - 1) // 2] + before[len(before) // 2]) / 2)
    assert s.detector["elapsed_seconds"] == 2.0
    assert s.detector["exchanges_per_second"] == pytest.approx(o["trace_exchanges"] / 2.0)
    for kind, row in s.rows.items():
        assert row["precision"] == 1.0 and row["recall"] == 1.0, kind
        assert row["ari"] in (1.0, None), kind


def test_ari_without_a_type_points_at_the_type_that_loses_attribution(
        world: tuple[Path, Path, Path]) -> None:
    """One type's operators split into one campaign per account, every other campaign
    right: the ARI over every type but that one is 1, and over every type but another it
    is below 1."""
    trace, accounts, labels = world
    truth = read_labels(labels)
    seen = _first_seen(trace)
    sizes: dict[str, int] = defaultdict(int)
    for t in truth.values():
        if t.attack and t.account_id in seen:
            sizes[str(t.campaign_type)] += 1
    split = max(sorted(sizes), key=sizes.__getitem__)
    perfect = _perfect(labels, trace)
    for v in perfect.accounts:
        if truth[v.account_id].campaign_type == split:
            v.campaign_id = f"alone-{v.account_id}"
    o = score(trace, accounts, labels, perfect).overall
    assert o["ari"] < 1.0
    assert o["ari_without_type"][split] == 1.0
    assert all(ari < 1.0 for kind, ari in o["ari_without_type"].items() if kind != split)


def test_empty_verdicts(world: tuple[Path, Path, Path]) -> None:
    trace, accounts, labels = world
    s = score(trace, accounts, labels, Verdicts())
    o = s.overall
    assert o["recall"] == 0.0 and o["precision"] is None and o["f1"] == 0.0
    assert o["benign_fpr"] == 0.0 and o["campaigns_detected"] == 0
    assert o["verdicts_missing"] == len(read_labels(labels))
    assert o["inactive_accounts"] == len(set(read_labels(labels)) - set(_first_seen(trace)))
    assert all(not h for h in s.hours_to_flag.values())


def test_half_right_verdicts(world: tuple[Path, Path, Path]) -> None:
    """Every other attack account caught (all in one predicted campaign) and every benign
    hard negative flagged: precision, recall, FPR and campaign counts follow exactly."""
    trace, accounts, labels = world
    truth = read_labels(labels)
    seen = _first_seen(trace)
    attack = sorted(a for a, t in truth.items() if t.attack and a in seen)
    caught = set(attack[::2])
    hard = {a for a, t in truth.items() if t.hard_negative}
    verdicts = []
    for acct in truth:
        flag = acct in caught or acct in hard
        first = min(seen[acct]) + timedelta(hours=1) if flag and acct in seen else None
        verdicts.append(AccountVerdict(account_id=acct, flagged=flag,
                                       campaign_id="one" if flag else None,
                                       first_flagged_at=first))
    s = score(trace, accounts, labels, Verdicts(accounts=verdicts), elapsed_s=1.0)
    o = s.overall
    assert o["recall"] == pytest.approx(len(caught) / len(attack))
    assert o["precision"] == pytest.approx(len(caught) / (len(caught) + len(hard & set(seen))))
    assert o["hard_negative_fpr"] == 1.0
    benign = [t for t in truth.values() if not t.attack and t.account_id in seen]
    assert o["benign_fpr"] == pytest.approx(len(hard & set(seen)) / len(benign))
    assert s.benign["casual"]["fpr"] == 0.0
    campaigns = defaultdict(list)
    for a in attack:
        campaigns[truth[a].campaign_id].append(a)
    expected = sum(1 for ms in campaigns.values()
                   if 2 * sum(m in caught for m in ms) >= len(ms))
    assert o["campaigns_detected"] == expected
    hours = [h for hs in s.hours_to_flag.values() for h in hs]
    assert hours and all(h == pytest.approx(1.0, abs=1e-3) for h in hours)


def test_cli_bench_detect_and_baseline(world: tuple[Path, Path, Path], tmp_path: Path) -> None:
    trace, accounts, labels = world
    runner = CliRunner()
    out = tmp_path / "verdicts.json"
    res = runner.invoke(main, ["bench", "baseline", "--trace", str(trace), "--accounts",
                               str(accounts), "--out", str(out), "--per-day", "50"])
    assert res.exit_code == 0, res.output
    verdicts = Verdicts.read(out)
    assert len(verdicts.accounts) == len(read_labels(labels))
    assert any(v.flagged for v in verdicts.accounts)
    png, js = tmp_path / "report.png", tmp_path / "scores.json"
    res = runner.invoke(main, ["bench", "detect", "--trace", str(trace), "--accounts",
                               str(accounts), "--labels", str(labels), "--verdicts", str(out),
                               "--report", str(png), "--json", str(js)])
    assert res.exit_code == 0, res.output
    for kind in ("hydra", "slow_low", "overall", "hard negatives", "casual"):
        assert kind in res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b'"campaign_types"' in js.read_bytes()
    for elapsed in ("-3", "0", "nan"):     # a negative rate was printed for these
        res = runner.invoke(main, ["bench", "detect", "--trace", str(trace), "--accounts",
                                   str(accounts), "--labels", str(labels), "--verdicts",
                                   str(out), "--elapsed", elapsed])
        assert res.exit_code == 2 and "not a positive number of seconds" in res.output


def test_baseline_flags_only_above_threshold(world: tuple[Path, Path, Path]) -> None:
    trace, accounts, _ = world
    counts: dict[str, int] = defaultdict(int)
    for ex in read_trace(trace):
        counts[str(ex.account_id)] += 1
    verdicts = run_baseline(trace, accounts, per_day=40)
    for v in verdicts.accounts:
        # half a day of trace: flagged exactly when more than 40 exchanges were sent
        assert v.flagged == (counts.get(v.account_id, 0) > 40), v.account_id
        if v.flagged:
            assert v.exchanges_before_flag == 40


def test_baseline_orders_mixed_timestamp_forms(tmp_path: Path) -> None:
    """Lines out of order and with UTC offsets are processed in true time order."""
    trace, accounts = tmp_path / "t.jsonl", tmp_path / "a.jsonl"
    times = ["2026-03-02T10:00:00.000Z", "2026-03-02T12:30:00+02:00",   # 10:30 UTC
             "2026-03-02T11:00:00.000Z", "2026-03-02T13:30:00+02:00",   # 11:30 UTC
             "2026-03-02T09:00:00.000Z"]
    trace.write_text("".join(f'{{"ts": "{t}", "account_id": "a1"}}\n' for t in times))
    accounts.write_text('{"account_id": "a1"}\n{"account_id": "a2"}\n')
    verdicts = {v.account_id: v for v in run_baseline(trace, accounts, per_day=3).accounts}
    flagged = verdicts["a1"]
    assert flagged.flagged and flagged.exchanges_before_flag == 3
    assert flagged.first_flagged_at is not None
    assert flagged.first_flagged_at.isoformat() == "2026-03-02T11:00:00+00:00"
    assert not verdicts["a2"].flagged


def test_missed_by_volume_counts_each_missed_account_by_its_exchanges(tmp_path: Path) -> None:
    from bench.missed_by_volume import missed_by_volume

    trace = tmp_path / "t.jsonl"
    sent = {"a1": 1, "a2": 2, "a3": 2, "a4": 5, "b1": 3}
    trace.write_text("".join(f'{{"ts": "2026-03-01T00:00:0{i}Z", "account_id": "{a}"}}\n'
                             for a, n in sent.items() for i in range(n)))
    labels = tmp_path / "l.jsonl"
    labels.write_text(
        "".join(f'{{"account_id": "{a}", "campaign_id": "c1", "campaign_type": "slow_low"}}\n'
                for a in ("a1", "a2", "a3", "a4"))
        + '{"account_id": "b1", "campaign_id": null}\n')
    verdicts = tmp_path / "v.json"
    Verdicts(accounts=[AccountVerdict(account_id=a, risk=1.0 if a in ("a2", "b1") else 0.0,
                                      flagged=a in ("a2", "b1"))
                       for a in sent], campaigns=[]).write(verdicts)
    (row,) = missed_by_volume(trace, labels, verdicts).values()
    assert (row.flagged, row.missed) == (1, 3)
    assert dict(row.missed_by_exchanges) == {1: 1, 2: 1, 5: 1}
    assert (row.at_most_2, row.at_most_2_flagged) == (3, 1)


def test_detect_worlds_scores_each_arm_with_its_own_calibration(tmp_path: Path) -> None:
    """bench.detect_worlds simulates a world once, runs every arm's detector over it and
    scores them alike: the installed tree with its shipped file catches the campaigns,
    the same tree with a calibration that flags nothing catches none."""
    import json
    import subprocess
    import sys

    from distillguard.detect.calibration import Calibration

    neutral = tmp_path / "neutral.json"
    Calibration.neutral().write(neutral)
    work = tmp_path / "work"
    out = subprocess.run([sys.executable, "-m", "bench.detect_worlds", "--work", str(work),
                          "--world", "smoke:5:1:0.5", "--arm", "shipped=-:-",
                          "--arm", f"blind=-:{neutral}"],
                         check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert "| smoke-5-d0.5 | shipped |" in out and "| smoke-5-d0.5 | blind |" in out
    report = json.loads((work / "detect_worlds.json").read_text())
    assert report["worlds"] == ["smoke-5-d0.5"]
    shipped, blind = report["arms"]["shipped"], report["arms"]["blind"]
    assert shipped["totals"]["recall_min"] > 0.8 and shipped["totals"]["benign_accounts"] > 5
    assert blind["totals"]["recall_max"] == 0.0
    assert blind["calibration"] == str(neutral)
    assert (work / "worlds" / "smoke-5-d0.5" / "labels.jsonl").exists()
