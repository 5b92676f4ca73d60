"""Benign populations: casual users, SaaS integrations, evaluation runners, companies.

The last three are the hard negatives (``hard_negative: true`` in the labels): each shares
a surface trait with an attack campaign. SaaS integrations send thousands of templated
prompts a day from datacenter addresses (like a heavy harvester); evaluation runners fire
a benchmark's worth of single-turn GSM8K questions asking for worked solutions in one
burst (like chain-of-thought harvesting) and move to a new model on release day; companies
run many accounts from one office range with one payment method, created on one day
(like a hydra cluster).

What an account record says overlaps between honest and attack accounts, as it does for
a real provider: some honest organisations signed up days ago (a start-up, a new
integration) and some never typed in an organisation; consumers share their carrier's
NAT ranges and a VPN service's hosting ranges with strangers (see :mod:`.network`).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterator
from typing import Any

from distillguard.simulate.network import Block
from distillguard.simulate.prompts import pool
from distillguard.simulate.world import (
    DAY,
    HOUR,
    NEW_MODEL,
    OLD_MODEL,
    SCRIPT_AGENTS,
    UTC_OFFSET,
    Client,
    World,
    benign_model,
    exchange,
    nhpp,
    renewal,
)

Event = tuple[float, dict[str, Any]]
FOLLOW_UPS = (
    "Can you expand on the second point?", "Thanks. Can you make that shorter?",
    "Why did you choose that approach over the alternatives?",
    "What about the example you gave earlier? Can you walk through it step by step?",
    "Could you rewrite your previous answer for a complete beginner?",
    "I tried that and got an error. What should I change?",
    "Can you turn that into a table?", "Are you sure about the first part?",
    "Great, now do the same but in Python.", "ok and what would be the downside of that?",
    "Summarize what you said in three bullet points.", "Can you give me a concrete example?",
)
# Share of consumer accounts opened in the two weeks before the trace starts.
NEW_SIGNUP_SHARE = 0.12
# Share of organisations (SaaS, evaluation runners, companies) that signed up in the two
# weeks before the trace starts, and share that left the organisation field empty.
NEW_ORG_SHARE = 0.25
NO_ORG_SHARE = 0.3
# Shares of consumers who use only their phone (behind the carrier's NAT), who send
# most of their sessions through a commercial VPN (hosting addresses), and who travel:
# most of their sessions come from hotels, cafés and offices on other networks, in other
# countries too (an honest account spread over many networks).
MOBILE_ONLY_SHARE = 0.25
VPN_SHARE = 0.05
TRAVELLER_SHARE = 0.05
# Share of a consumer's sessions sent from its first address (home); a traveller's.
HOME_SHARE = 0.8
TRAVELLER_HOME_SHARE = 0.3
COUNTRY_WEIGHTS = {"US": 40, "GB": 10, "DE": 12, "FR": 9, "ES": 6, "IT": 6, "CH": 2, "BR": 8}
COMPANY_WORDS = ("Acme", "Northwind", "Globex", "Initech", "Umbrella", "Stark", "Wayne",
                 "Hooli", "Vandelay", "Tyrell", "Cyberdyne", "Soylent", "Wonka", "Aperture")
SAAS_TEMPLATES = (
    ("You are a support triage assistant for {org}.",
     "Classify the following customer message into one of: billing, bug, feature_request, "
     "account, other. Reply with JSON {{\"category\": ..., \"urgency\": 1-5}}.\n\n"
     "Message:\n{text}"),
    ("You write concise summaries for {org}'s helpdesk.",
     "Summarize this ticket in two sentences for the on-call engineer.\n\nTicket:\n{text}"),
    ("You extract structured data for {org}.",
     "Extract the product names, versions and error messages mentioned below as JSON."
     "\n\nText:\n{text}"),
    ("You are {org}'s localisation service.",
     "Translate the following user text into German, keeping formatting.\n\n{text}"),
    ("You moderate community posts for {org}.",
     "Does this post violate the community guidelines? Answer yes or no and give one "
     "reason.\n\nPost:\n{text}"),
)
EVAL_TEMPLATE = ("Solve the following grade-school math problem. Show your work, then give "
                 "the final answer on its own line as '#### <number>'.\n\n{q}")


def pick_country(rng: random.Random) -> str:
    return rng.choices(list(COUNTRY_WEIGHTS), weights=list(COUNTRY_WEIGHTS.values()))[0]


def org_age(rng: random.Random, low: float, high: float) -> float:
    """Days since an organisation's sign-up: ``low``-``high``, or within the last two
    weeks for the share that is new."""
    return rng.uniform(0.5, 14) if rng.random() < NEW_ORG_SHARE else rng.uniform(low, high)


def org_on_record(rng: random.Random, org: str) -> str | None:
    """The organisation as the account record has it: empty for the share that left the
    field blank at sign-up."""
    return None if rng.random() < NO_ORG_SHARE else org


def company_name(rng: random.Random, world: World) -> tuple[str, str]:
    word = rng.choice(COMPANY_WORDS)
    suffix = world.new_id("", 4)
    return f"{word} {rng.choice(('Ltd', 'Inc', 'GmbH', 'SAS', 'LLC'))}", \
        f"{word.lower()}-{suffix}.example"


def chat_sessions(world: World, rng: random.Random, client: Client, ips: list[str],
                  sessions_per_day: float, offset_h: float, *, business: bool = False,
                  weekdays_only: bool = False, start: float | None = None,
                  stream: bool = False, home_share: float = HOME_SHARE) -> Iterator[Event]:
    """Interactive multi-turn sessions: diurnal session starts, follow-ups that refer to
    the previous turns (the history is re-sent), reading and typing time between turns.
    A session comes from ``ips[0]`` with probability ``home_share``, else from one of the
    others."""
    items = pool("chat", world.split)
    conv = world.timing.conv
    busy_until = 0.0
    begin = world.start if start is None else start
    for t in nhpp(rng, begin, world.end, sessions_per_day, offset_h, business, weekdays_only):
        if t < busy_until:
            continue
        ip = ips[0] if len(ips) == 1 or rng.random() < home_share else rng.choice(ips[1:])
        history: list[dict[str, str]] = []
        turns = 1 + min(8, int(rng.expovariate(0.6)))
        max_tokens = rng.choice((None, 1024, 2048, 4096))
        model = benign_model(world, rng, t)
        for turn in range(turns):
            text = rng.choice(items).text if turn == 0 else rng.choice(FOLLOW_UPS)
            messages = [*history, {"role": "user", "content": text}]
            ts, line = exchange(world, rng, t, client, model, messages,
                                completion_tokens=conv.completion_tokens(rng),
                                max_tokens=max_tokens, ip=ip, stream=stream)
            yield ts, line
            answer = line["response"]["choices"][0]["message"]["content"]
            history = [*messages, {"role": "assistant", "content": answer}][-6:]
            t += line["latency_ms"] / 1000 + 15 + rng.lognormvariate(math.log(40), 0.8)
            if t >= world.end:
                break
        busy_until = t


class Casual:
    """A consumer with a home (and sometimes a mobile) residential address; a few travel
    and send from many networks."""

    def __init__(self, world: World, rng: random.Random) -> None:
        self.world, self.rng = world, rng
        self.country = pick_country(rng)
        # A service that keeps growing has a steady share of brand-new sign-ups.
        age = rng.uniform(0.2, 14) if rng.random() < NEW_SIGNUP_SHARE else rng.uniform(1, 400)
        self.client = world.add_account("casual", country=self.country,
                                        created_days_before=age)
        carrier = world.net.carrier(self.country)
        phone = [rng.choice(carrier).address(rng) for _ in range(3)]
        roll = rng.random()
        self.home_share = HOME_SHARE
        if roll < MOBILE_ONLY_SHARE:
            self.ips = phone
        elif roll < MOBILE_ONLY_SHARE + VPN_SHARE:
            self.ips = [rng.choice(world.net.vpn()).address(rng),
                        world.net.residential(self.country).address(rng)]
        elif roll < MOBILE_ONLY_SHARE + VPN_SHARE + TRAVELLER_SHARE:
            places = [world.net.residential(pick_country(rng)).address(rng)
                      for _ in range(rng.randint(3, 8))]
            self.ips = [world.net.residential(self.country).address(rng), *phone, *places]
            self.home_share = TRAVELLER_HOME_SHARE
        else:
            self.ips = [world.net.residential(self.country).address(rng), *phone]
        self.client.ip = self.ips[0]
        self.sessions_per_day = min(40.0, rng.lognormvariate(math.log(0.8), 1.1))
        self.stream = rng.random() < 0.6   # chat front-ends stream their answers

    def events(self) -> Iterator[Event]:
        return chat_sessions(self.world, self.rng, self.client, self.ips,
                             self.sessions_per_day, UTC_OFFSET[self.country],
                             stream=self.stream, home_share=self.home_share)


class Saas:
    """An integration sending templated prompts all day from a few datacenter addresses."""

    def __init__(self, world: World, rng: random.Random, per_day: float) -> None:
        self.world, self.rng = world, rng
        # Integrations come in every size: ``per_day`` is a typical one's volume, and each
        # sends from a thirtieth of it to three times it.
        self.per_day = per_day * min(3.0, max(1 / 30, rng.lognormvariate(0.0, 1.0)))
        org, domain = company_name(rng, world)
        self.country = pick_country(rng)
        self.client = world.add_account("saas", hard_negative=True,
                                        org=org_on_record(rng, org), email_domain=domain,
                                        country=self.country, tier="verified",
                                        created_days_before=org_age(rng, 60, 700))
        block = world.net.datacenter()
        self.ips = [block.address(rng) for _ in range(rng.randint(1, 3))]
        self.client.ip, self.client.user_agent = self.ips[0], rng.choice(SCRIPT_AGENTS[:3])
        system, user = rng.choice(SAAS_TEMPLATES)
        self.system, self.user = system.format(org=org), user

    def events(self) -> Iterator[Event]:
        items = pool("chat", self.world.split)
        rng, code = self.rng, self.world.timing.code
        for t in renewal(rng, self.world.timing.conv, self.world.start, self.world.end,
                         self.per_day, UTC_OFFSET[self.country]):
            text = rng.choice(items).text
            messages = [{"role": "system", "content": self.system},
                        {"role": "user", "content": self.user.format(text=text)}]
            yield exchange(self.world, rng, t, self.client, OLD_MODEL, messages,
                           completion_tokens=code.completion_tokens(rng) + 10, max_tokens=256,
                           temperature=0.0, ip=rng.choice(self.ips))


class EvalRunner:
    """Runs the same slice of GSM8K as a benchmark every day or two, in one burst, and
    evaluates a new model within hours of its release."""

    def __init__(self, world: World, rng: random.Random, questions: int) -> None:
        self.world, self.rng = world, rng
        org, domain = company_name(rng, world)
        self.client = world.add_account("eval_runner", hard_negative=True,
                                        org=org_on_record(rng, org), email_domain=domain,
                                        tier="verified", created_days_before=org_age(rng, 30, 400))
        block: Block = world.net.datacenter()
        self.client.ip, self.client.user_agent = block.address(rng), SCRIPT_AGENTS[2]
        items = pool("math", world.split)
        first = rng.randrange(max(1, len(items) - questions))
        self.items = items[first:first + questions]
        self.every = rng.choice((1.0, 1.0, 2.0)) * DAY
        self.hour = rng.uniform(0, 24) * HOUR

    def _runs(self) -> list[tuple[float, str]]:
        w = self.world
        runs = []
        t = w.start + self.hour + self.rng.uniform(0, self.every - DAY + 1)
        while t < w.end:
            runs.append((t, OLD_MODEL if t < w.release_ts else NEW_MODEL))
            t += self.every
        release_run = w.release_ts + self.rng.uniform(1, 6) * HOUR
        if w.start < w.release_ts and release_run < w.end:
            runs.append((release_run, NEW_MODEL))
        return sorted(runs)

    def events(self) -> Iterator[Event]:
        rng, code = self.rng, self.world.timing.code
        last = 0.0
        for start, model in self._runs():
            t = max(start, last)
            for item in self.items:
                t += code.gap(rng, 0.5)
                if t >= self.world.end:
                    return
                messages = [{"role": "user", "content": EVAL_TEMPLATE.format(q=item.text)}]
                yield exchange(self.world, rng, t, self.client, model, messages,
                               completion_tokens=self.world.timing.conv.completion_tokens(rng),
                               reference=item.reference, max_tokens=1024, temperature=0.0)
            last = t


class Company:
    """Many employee accounts behind one office range, one payment method, one domain,
    all opened on the same day."""

    def __init__(self, world: World, rng: random.Random, employees: int) -> None:
        self.world, self.rng = world, rng
        org, domain = company_name(rng, world)
        self.country = pick_country(rng)
        payment = world.new_id("pf_", 8)
        office = world.net.residential(self.country)
        self.nat = [office.address(rng) for _ in range(rng.randint(1, 3))]
        opened = org_age(rng, 20, 300)
        recorded = org_on_record(rng, org)
        self.staff: list[tuple[Client, float]] = []
        for _ in range(employees):
            # Where the company gave its name, a few staff still leave the field blank.
            client = world.add_account("company", hard_negative=True,
                                       org=recorded if rng.random() < 0.9 else None,
                                       email_domain=domain, payment=payment,
                                       country=self.country, tier="verified",
                                       created_days_before=opened - rng.uniform(0, 0.2))
            client.ip = rng.choice(self.nat)
            self.staff.append((client, min(10.0, rng.lognormvariate(math.log(1.5), 0.7))))

    def events(self) -> Iterator[Event]:
        offset = UTC_OFFSET[self.country]
        streams = [chat_sessions(self.world, random.Random(self.rng.random()), client,
                                 [client.ip], per_day, offset, business=True,
                                 weekdays_only=True, stream=client.account_id[-1] < "8")
                   for client, per_day in self.staff]
        return heapq.merge(*streams, key=lambda e: e[0])
