"""Simulator parts: the timing fit, prompt splits, template variation, addresses, presets."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from distillguard.geoip import default_geoip
from distillguard.simulate import simulate
from distillguard.simulate.engine import make_world
from distillguard.simulate.network import NetworkAllocator
from distillguard.simulate.presets import PRESETS, build_actors
from distillguard.simulate.prompts import POOLS, half_of, pool
from distillguard.simulate.timing import timing_model
from distillguard.simulate.variation import Variation
from distillguard.simulate.world import DAY, renewal
from distillguard.traceio import iter_jsonl, read_trace


def test_timing_fit_reflects_the_azure_traces() -> None:
    model = timing_model()
    conv, code = model.conv, model.code
    assert conv.requests > 15_000 and code.requests > 8_000
    assert 4.5 < conv.rate_per_s < 6.5          # ~19k requests in one hour
    assert sum(conv.gaps) / len(conv.gaps) == pytest.approx(1.0)
    summary = {s["service"]: s for s in model.summary()}
    assert 0.9 < summary["conv"]["gap_cv"] < 1.4   # near-Poisson conversation arrivals
    assert summary["code"]["gap_cv"] > 3           # code completions come in bursts
    assert summary["conv"]["generated_tokens_p50_p90_p99"][0] > \
        summary["code"]["generated_tokens_p50_p90_p99"][0]
    rng = random.Random(5)
    arrivals = list(renewal(rng, conv, 0.0, 5 * DAY, 2000))
    assert 0.9 * 10_000 < len(arrivals) < 1.1 * 10_000
    assert arrivals == sorted(arrivals)
    long = [conv.completion_tokens(rng, 0.6) for _ in range(500)]
    anyl = [conv.completion_tokens(rng) for _ in range(500)]
    assert sorted(long)[250] > sorted(anyl)[250]


@pytest.mark.parametrize("name", POOLS)
def test_pools_split_into_disjoint_halves(name: str) -> None:
    dev, held, every = pool(name, "dev"), pool(name, "heldout"), pool(name)
    assert dev and held
    assert len(dev) + len(held) == len(every)
    assert not {i.text for i in dev} & {i.text for i in held}
    assert all(half_of(i.text) == "heldout" for i in held)


def test_variation_changes_surface_not_content() -> None:
    rng = random.Random(3)
    item = next(i for i in pool("code") if i.input and "Write" in i.text)
    variants = {Variation(0.9, 0.5, 0.9).apply(rng, item.text, item.input) for _ in range(40)}
    assert len(variants) > 20
    key = item.input.strip()[:20]
    assert sum(key in v for v in variants) >= 30
    again = Variation(0.9, 0.5, 0.9).apply(random.Random(8), item.text, item.input)
    assert again == Variation(0.9, 0.5, 0.9).apply(random.Random(8), item.text, item.input)


def test_allocated_networks_match_the_geoip_lookup() -> None:
    geo = default_geoip()
    alloc = NetworkAllocator(random.Random(2))
    for _ in range(10):
        info = geo.lookup(alloc.datacenter().address(random.Random(1)))
        assert info.hosting and not info.private
    for country in NetworkAllocator.countries():
        block = alloc.residential(country)
        info = geo.lookup(block.address(random.Random(1)))
        assert not info.hosting and info.country == country and info.asn_name


def test_heldout_adds_a_variant_that_tune_lacks() -> None:
    assert "tool_harvest" in PRESETS["heldout"].campaigns
    assert "tool_harvest" not in PRESETS["tune"].campaigns
    assert PRESETS["tune"].split == "dev" and PRESETS["heldout"].split == "heldout"
    world, preset = make_world("heldout", 0, 0.5)
    build_actors(world, preset, 0.05)
    assert "tool_harvest" in {lab.campaign_type for lab in world.labels}


def test_heldout_trace_draws_only_from_the_heldout_halves(tmp_path: Path) -> None:
    trace, _, labels = simulate(tmp_path, preset="heldout", seed=3, scale=0.02, days=0.3)
    pop = {rec["account_id"]: rec["population"] for _, rec in iter_jsonl(labels)}
    chat_dev = {i.text for i in pool("chat", "dev")}
    chat_held = {i.text for i in pool("chat", "heldout")}
    seen = 0
    for ex in read_trace(trace):
        if pop[str(ex.account_id)] == "casual" and len(ex.request["messages"]) == 1:
            text = ex.request["messages"][0]["content"]
            assert text in chat_held and text not in chat_dev
            seen += 1
    assert seen > 0
