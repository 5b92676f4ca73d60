"""Attack campaigns modelled on the public record of distillation operations.

Each campaign registers its accounts (labels carry ``campaign_id`` and ``campaign_type``)
and yields its exchanges in time order. See docs/simulator.md for what each type models
and which signals link its accounts.

What the account records say is the operator's choice, so it varies by campaign: about
half the operators buy some or all of their accounts aged (opened months or years
before), and some type an organisation in at sign-up, one invented company for all
their accounts or one per account. About half the operators send one set of wrappers
from every account; the rest write two to six variants and give each account one.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from typing import Any

from distillguard.simulate.harness import Harness
from distillguard.simulate.network import Block, NetworkAllocator
from distillguard.simulate.populations import (
    FOLLOW_UPS,
    chat_sessions,
    company_name,
    pick_country,
)
from distillguard.simulate.prompts import Item, pool, selfinstruct_prompt
from distillguard.simulate.variation import Variation, add_noise, shuffle_sentences
from distillguard.simulate.world import (
    CONSUMER_DOMAINS,
    DAY,
    HOUR,
    NEW_MODEL,
    OLD_MODEL,
    REASONER,
    SCRIPT_AGENTS,
    SDK_AGENTS,
    UTC_OFFSET,
    Client,
    World,
    exchange,
    renewal,
)

Event = tuple[float, dict[str, Any]]
# Share of operators that buy aged accounts (each then buys 20-100 % of its accounts
# aged), and how old those are, in days before the trace starts.
AGED_OPERATOR_SHARE = 0.5
AGED_DAYS = (30.0, 900.0)
# How operators fill in the organisation: not at all, one invented company for every
# account, or a different one per account.
ORG_MODE_WEIGHTS = (0.4, 0.3, 0.3)
# Share of operators whose script gives each account one of a few variants of its
# wrappers, and how many variants such a script has.
HARNESS_PER_ACCOUNT_SHARE = 0.5
HARNESS_VARIANTS = (2, 6)
# The slowest a scheduler may spread the accounts it wakes at one tick, in seconds.
SCHEDULER_SPREAD_S = (20.0, 300.0)


class Campaign:
    """Common parts: the id, the accounts, the operator's harness and the harvest
    prompt."""

    kind = ""

    def __init__(self, world: World, rng: random.Random, start_frac: float = 0.0) -> None:
        self.world, self.rng = world, rng
        self.campaign_id = world.new_id("c-", 6)
        self.clients: list[Client] = []
        self.start = world.start + start_frac * world.days * DAY
        self.variation = Variation(paraphrase=rng.uniform(0.3, 0.7),
                                   reorder=rng.uniform(0.1, 0.4), noise=rng.uniform(0.2, 0.5))
        self.harness = Harness.draw(rng)
        self.harnesses: dict[str, Harness] = {}
        self.harness_per_account = rng.random() < HARNESS_PER_ACCOUNT_SHARE
        self.variants = [Harness.draw(rng) for _ in range(rng.randint(*HARNESS_VARIANTS))]
        self.aged_share = rng.uniform(0.2, 1.0) if rng.random() < AGED_OPERATOR_SHARE else 0.0
        self.org_mode = rng.choices(("none", "shared", "each"), weights=ORG_MODE_WEIGHTS)[0]
        self.org = company_name(rng, world)[0] if self.org_mode == "shared" else None

    def account(self, **kw: Any) -> Client:
        rng = self.rng
        kw.setdefault("created_days_before", (self.world.start - self.start) / DAY
                      + rng.uniform(0.5, 10))
        if rng.random() < self.aged_share:
            kw["created_days_before"] = rng.uniform(*AGED_DAYS)
        if self.org_mode != "none":
            kw.setdefault("org", self.org or company_name(rng, self.world)[0])
        client = self.world.add_account("attack", campaign_id=self.campaign_id,
                                        campaign_type=self.kind, **kw)
        self.clients.append(client)
        if self.harness_per_account:
            self.harnesses[client.account_id] = rng.choice(self.variants)
        return client

    def harness_of(self, client: Client) -> Harness:
        return self.harnesses.get(client.account_id, self.harness)

    def harvest_messages(self, item: Item, client: Client) -> list[dict[str, str]]:
        harness = self.harness_of(client)
        text = harness.frame(self.variation.apply(self.rng, item.text, item.input))
        # One request in ten goes through a code path that sets no system prompt.
        system = harness.system if self.rng.random() < 0.9 else ""
        if not system:
            return [{"role": "user", "content": text}]
        return [{"role": "system", "content": system}, {"role": "user", "content": text}]

    def selfinstruct_messages(self) -> list[dict[str, str]]:
        seeds = self.rng.sample(pool("seed", self.world.split), 3)
        lines = [selfinstruct_prompt()]
        for n, s in enumerate(seeds, 1):
            lines.append(f"{n}. Instruction: {s.text}\n{n}. Input:\n{s.input or '<noinput>'}"
                         f"\n{n}. Output:\n{s.reference}")
        lines.append(f"{len(seeds) + 1}. Instruction:")
        text = "\n\n".join(lines)
        if self.rng.random() < self.variation.noise:
            text = add_noise(self.rng, text)
        return [{"role": "user", "content": text}]

    def harvest(self, t: float, client: Client, items: tuple[Item, ...], model: str,
                ip: str | None = None, self_instruct: float = 0.0) -> Event:
        rng = self.rng
        if rng.random() < self_instruct:
            messages, reference = self.selfinstruct_messages(), ""
        else:
            item = rng.choice(items)
            messages, reference = self.harvest_messages(item, client), item.reference
        return exchange(self.world, rng, t, client, model, messages,
                        completion_tokens=self.world.timing.conv.completion_tokens(rng, 0.3),
                        reference=reference, max_tokens=rng.choice((2048, 4096)),
                        temperature=rng.choice((0.7, 1.0)), ip=ip)

    def events(self) -> Iterator[Event]:
        raise NotImplementedError


def residential_exits(world: World) -> list[Block]:
    """A residential proxy network's exits: consumers' devices, in its own /24s and in the
    carrier NAT ranges every phone of a country shares, in every country it sells."""
    return [block for c in NetworkAllocator.countries()
            for block in (world.net.residential(c), world.net.residential(c),
                          *world.net.carrier(c))]


class Hydra(Campaign):
    """Many accounts, a few shared payment fingerprints and throwaway domains, opened in
    batches, load-balanced round the clock. A ``proxied`` operator buys its exits from a
    residential proxy network and sends every request through a different one; the
    others send from a few datacenter ranges of their own."""

    kind = "hydra"

    def __init__(self, world: World, rng: random.Random, accounts: int,
                 per_account_day: float, start_frac: float = 0.0,
                 proxied: bool = False) -> None:
        super().__init__(world, rng, start_frac)
        self.proxied = proxied
        self.blocks = residential_exits(world) if proxied else [
            world.net.datacenter() for _ in range(rng.randint(2, 4))]
        payments = [world.new_id("pf_", 8) for _ in range(rng.randint(2, 3))]
        domains = [f"mail{world.new_id('', 4)}.{rng.choice(('net', 'xyz', 'top'))}"
                   for _ in range(2)]
        batch = rng.uniform(1, 5)
        self.agent = rng.choice(SCRIPT_AGENTS)
        for _ in range(accounts):
            c = self.account(payment=rng.choice(payments), email_domain=rng.choice(domains),
                             country=rng.choice(("US", "GB", "DE")), tier="unverified",
                             created_days_before=batch + rng.choice((0.0, 1.0))
                             + rng.uniform(0, 0.1))
            c.user_agent = self.agent
            c.ip = rng.choice(self.blocks).address(rng)
        self.per_day = accounts * per_account_day

    def events(self) -> Iterator[Event]:
        items = pool("code", self.world.split)
        for t in renewal(self.rng, self.world.timing.conv, self.start, self.world.end,
                         self.per_day):
            client = self.rng.choice(self.clients)
            ip = client.ip if not self.proxied and self.rng.random() < 0.7 else \
                self.rng.choice(self.blocks).address(self.rng)
            yield self.harvest(t, client, items, OLD_MODEL, ip=ip, self_instruct=0.3)


class Reseller(Campaign):
    """A proxy reseller: a few accounts whose traffic mixes real customers' chats with
    harvesting jobs, all from the reseller's servers."""

    kind = "reseller"

    def __init__(self, world: World, rng: random.Random, accounts: int, customers: int,
                 harvest_per_day: float, start_frac: float = 0.0) -> None:
        super().__init__(world, rng, start_frac)
        block = world.net.datacenter()
        for _ in range(accounts):
            c = self.account(country=pick_country(rng), tier="standard",
                             created_days_before=rng.uniform(20, 90))
            c.ip = block.address(rng)
        self.customers = customers
        self.harvest_per_day = harvest_per_day

    def events(self) -> Iterator[Event]:
        streams: list[Iterator[Event]] = []
        for _ in range(self.customers):
            owner = self.rng.choice(self.clients)
            proxy = Client(owner.account_id, owner.key_id, owner.ip,
                           self.rng.choice(SDK_AGENTS))
            streams.append(chat_sessions(self.world, random.Random(self.rng.random()), proxy,
                                         [owner.ip], self.rng.uniform(1, 4),
                                         UTC_OFFSET[pick_country(self.rng)], start=self.start))
        items = pool("code", self.world.split) + pool("chat", self.world.split)

        def harvest() -> Iterator[Event]:
            for t in renewal(self.rng, self.world.timing.conv, self.start, self.world.end,
                             self.harvest_per_day):
                yield self.harvest(t, self.rng.choice(self.clients), items, OLD_MODEL)

        return heapq.merge(harvest(), *streams, key=lambda e: e[0])


class HeavySingle(Campaign):
    """One account harvesting at a high, steady rate from one server."""

    kind = "heavy_single"

    def __init__(self, world: World, rng: random.Random, per_day: float,
                 start_frac: float = 0.0) -> None:
        super().__init__(world, rng, start_frac)
        c = self.account(country=pick_country(rng), tier="standard")
        c.ip, c.user_agent = world.net.datacenter().address(rng), rng.choice(SCRIPT_AGENTS)
        self.per_day = per_day
        self.variation = Variation(0.1, 0.05, 0.05)

    def events(self) -> Iterator[Event]:
        items = pool("code", self.world.split)
        for t in renewal(self.rng, self.world.timing.conv, self.start, self.world.end,
                         self.per_day):
            yield self.harvest(t, self.clients[0], items, OLD_MODEL, self_instruct=0.1)


class SlowLow(Campaign):
    """Many small residential accounts, each as quiet as a casual user, with distinct
    payment methods and mail domains. One scheduler drives them: at each tick a few
    accounts send within seconds to minutes of each other (the operator's spread, 20-300
    s), from the same instruction family."""

    kind = "slow_low"

    def __init__(self, world: World, rng: random.Random, accounts: int,
                 ticks_per_day: float, start_frac: float = 0.0) -> None:
        super().__init__(world, rng, start_frac)
        for _ in range(accounts):
            country = pick_country(rng)
            c = self.account(country=country, email_domain=rng.choice(CONSUMER_DOMAINS),
                             created_days_before=(world.start - self.start) / DAY
                             + rng.uniform(1, 40))
            c.ip = world.net.residential(country).address(rng)
        self.ticks_per_day = ticks_per_day
        self.spread = rng.uniform(*SCHEDULER_SPREAD_S)

    def events(self) -> Iterator[Event]:
        items = pool("code", self.world.split) + pool("seed", self.world.split)
        rng = self.rng
        last = 0.0
        for tick in renewal(rng, self.world.timing.conv, self.start, self.world.end,
                            self.ticks_per_day):
            k = min(len(self.clients), rng.randint(2, 5))
            offsets = sorted(rng.uniform(0, self.spread) for _ in range(k))
            for client, off in zip(rng.sample(self.clients, k), offsets, strict=True):
                t = max(last, tick + off)
                if t >= self.world.end:
                    return
                last = t
                yield self.harvest(t, client, items, OLD_MODEL)


class CotElicitation(Campaign):
    """Asks for full worked reasoning on GSM8K problems, often from the reasoning model."""

    kind = "cot_elicitation"

    def __init__(self, world: World, rng: random.Random, accounts: int,
                 per_account_day: float, start_frac: float = 0.0) -> None:
        super().__init__(world, rng, start_frac)
        block = world.net.datacenter()
        shared = world.new_id("pf_", 8)
        for _ in range(accounts):
            c = self.account(payment=shared if rng.random() < 0.5 else None,
                             country=pick_country(rng))
            c.ip, c.user_agent = block.address(rng), rng.choice(SDK_AGENTS)
        self.per_day = accounts * per_account_day

    def events(self) -> Iterator[Event]:
        rng = self.rng
        items = pool("math", self.world.split)
        for t in renewal(rng, self.world.timing.conv, self.start, self.world.end, self.per_day):
            item, client = rng.choice(items), rng.choice(self.clients)
            text = rng.choice(self.harness_of(client).cot).format(q=item.text)
            if rng.random() < self.variation.noise:
                text = add_noise(rng, text)
            model = REASONER if rng.random() < 0.5 else OLD_MODEL
            yield exchange(self.world, rng, t, client, model,
                           [{"role": "user", "content": text}],
                           completion_tokens=self.world.timing.conv.completion_tokens(rng, 0.6),
                           reference=item.reference, max_tokens=4096, temperature=0.0,
                           reasoning=model == REASONER)


class RubricGrading(Campaign):
    """Reward-model harvesting: has the model grade or compare candidate answers."""

    kind = "rubric_grading"

    def __init__(self, world: World, rng: random.Random, accounts: int,
                 per_account_day: float, start_frac: float = 0.0) -> None:
        super().__init__(world, rng, start_frac)
        blocks = [world.net.datacenter() for _ in range(2)]
        for _ in range(accounts):
            c = self.account(country=pick_country(rng), tier="unverified")
            c.ip, c.user_agent = rng.choice(blocks).address(rng), rng.choice(SCRIPT_AGENTS)
        self.per_day = accounts * per_account_day

    def _candidate(self, item: Item) -> str:
        answer = item.reference or item.text
        roll = self.rng.random()
        if roll < 0.3:
            return answer[: max(20, int(len(answer) * self.rng.uniform(0.3, 0.8)))]
        if roll < 0.5:
            return shuffle_sentences(self.rng, answer)
        return answer

    def events(self) -> Iterator[Event]:
        rng = self.rng
        items = pool("code", self.world.split) + pool("math", self.world.split)
        code = self.world.timing.code
        for t in renewal(rng, self.world.timing.conv, self.start, self.world.end, self.per_day):
            item, client = rng.choice(items), rng.choice(self.clients)
            question = f"{item.text}\n{item.input}".strip()
            rubric = rng.choice(self.harness_of(client).rubric)
            text = rubric.format(q=question, a=self._candidate(item),
                                 b=self._candidate(rng.choice(items)))
            if rng.random() < self.variation.noise:
                text = add_noise(rng, text)
            score = rng.randint(1, 10)
            yield exchange(self.world, rng, t, client, OLD_MODEL,
                           [{"role": "user", "content": text}],
                           completion_tokens=code.completion_tokens(rng) + 25,
                           reference=f'{{"score": {score}, "rationale": "', max_tokens=300,
                           temperature=0.0)


class ModelSwitch(Campaign):
    """Harvests the current model, then moves all accounts to a newly released model
    within hours of release and doubles its rate."""

    kind = "model_switch"

    def __init__(self, world: World, rng: random.Random, accounts: int,
                 per_account_day: float, start_frac: float = 0.0) -> None:
        super().__init__(world, rng, start_frac)
        blocks = [world.net.datacenter() for _ in range(rng.randint(1, 2))]
        payments = [world.new_id("pf_", 8) for _ in range(max(1, accounts // 3))]
        for _ in range(accounts):
            c = self.account(payment=rng.choice(payments), country=pick_country(rng))
            c.ip, c.user_agent = rng.choice(blocks).address(rng), rng.choice(SDK_AGENTS)
        self.per_day = accounts * per_account_day
        self.switch = world.release_ts + rng.uniform(0.5, 10) * HOUR

    def events(self) -> Iterator[Event]:
        rng, w = self.rng, self.world
        items = pool("code", w.split) + pool("chat", w.split)
        before = renewal(rng, w.timing.conv, self.start, min(self.switch, w.end), self.per_day)
        for t in before:
            yield self.harvest(t, rng.choice(self.clients), items, OLD_MODEL)
        for t in renewal(rng, w.timing.conv, max(self.switch, self.start), w.end,
                         self.per_day * 2.5):
            model = NEW_MODEL if rng.random() < 0.97 else OLD_MODEL
            yield self.harvest(t, rng.choice(self.clients), items, model)


class ToolHarvest(Campaign):
    """Held-out variant: agentic tool-use distillation (GPTeacher tool prompts) where every
    request leaves through a different residential proxy exit."""

    kind = "tool_harvest"

    def __init__(self, world: World, rng: random.Random, accounts: int,
                 per_account_day: float, start_frac: float = 0.0) -> None:
        super().__init__(world, rng, start_frac)
        self.exits = residential_exits(world)
        for _ in range(accounts):
            country = pick_country(rng)
            c = self.account(country=country, email_domain=rng.choice(CONSUMER_DOMAINS))
            c.ip = rng.choice(self.exits).address(rng)
        self.per_day = accounts * per_account_day

    def events(self) -> Iterator[Event]:
        rng, w = self.rng, self.world
        items = pool("tools", w.split)
        for t in renewal(rng, w.timing.conv, self.start, w.end, self.per_day):
            client = rng.choice(self.clients)
            client.user_agent = rng.choice(SDK_AGENTS)
            if rng.random() < 0.1:
                item = rng.choice(items)
                messages = [*self.harvest_messages(item, client),
                            {"role": "assistant", "content": item.reference},
                            {"role": "user", "content": rng.choice(FOLLOW_UPS)}]
                yield exchange(w, rng, t, client, OLD_MODEL, messages,
                               completion_tokens=w.timing.conv.completion_tokens(rng),
                               ip=rng.choice(self.exits).address(rng))
                continue
            yield self.harvest(t, client, items, OLD_MODEL,
                               ip=rng.choice(self.exits).address(rng))


CAMPAIGN_TYPES: dict[str, type[Campaign]] = {
    c.kind: c for c in (Hydra, Reseller, HeavySingle, SlowLow, CotElicitation, RubricGrading,
                        ModelSwitch, ToolHarvest)
}
