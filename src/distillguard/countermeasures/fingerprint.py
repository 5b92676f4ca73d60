"""Per-account response fingerprinting: keyed, deterministic, meaning-preserving.

At every slot (an occurrence of a variant pair, see
:mod:`distillguard.countermeasures.variants`) the gateway writes one of the two forms,
chosen by a keyed hash of the pair and the slot's context (the word before it). Slots are
split, again by a keyed hash, into two kinds:

* **account slots** carry the choice of the receiving account
  (key = HMAC(secret, account id)): they trace a leaked response to the account that
  received it;
* **global slots** carry a choice shared by every account (key = HMAC(secret, "global")):
  a model distilled from many accounts' outputs still learns one consistent preference,
  which :mod:`distillguard.countermeasures.modeltest` tests for.

Detection counts, over the distinct (pair, context) slots of the suspect text, how many
carry the form the key predicts. Without the key, the predicted form is a fair coin
independent of the text, so for text not marked with that key the count is
Binomial(n, 1/2); the p-value is the binomial upper tail. Each distinct (pair, context)
counts once (its most frequent form), so repeated phrases do not inflate the evidence.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scipy.stats import binomtest

from distillguard.countermeasures.variants import (
    PAIRS,
    UnitSplitter,
    apostrophe_of,
    split_units,
    unit_slots,
    with_case,
)

SlotKey = tuple[int, str]


def _bit(key: bytes, pair: int, context: str) -> int:
    digest = hashlib.blake2b(f"{pair}|{context}".encode(), key=key, digest_size=8).digest()
    return digest[0] & 1


@dataclass(frozen=True, slots=True)
class Score:
    """Evidence that texts carry one key's choices: ``matches`` of ``slots`` agree."""

    subject: str
    slots: int
    matches: int
    p_value: float

    @property
    def z(self) -> float:
        if not self.slots:
            return 0.0
        return (self.matches - self.slots / 2) / ((self.slots / 4) ** 0.5)

    def to_dict(self) -> dict[str, object]:
        return {"subject": self.subject, "slots": self.slots, "matches": self.matches,
                "match_rate": round(self.matches / self.slots, 4) if self.slots else None,
                "z": round(self.z, 3), "p_value": self.p_value}


def p_value(matches: int, slots: int) -> float:
    if slots == 0:
        return 1.0
    return float(binomtest(matches, slots, 0.5, alternative="greater").pvalue)


class Fingerprinter:
    """Marks texts for an account and scores texts against accounts or the global key."""

    def __init__(self, secret: bytes | str, *, global_share: float = 0.5) -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        if len(secret) < 16:
            raise ValueError("the fingerprint secret must be at least 16 bytes")
        if not 0.0 <= global_share <= 1.0:
            raise ValueError("global_share must be between 0 and 1")
        self._secret = secret
        self._split_key = self._derive(b"kind")
        self.global_key = self._derive(b"global")
        self._global_threshold = round(global_share * 256)
        self._account_keys: dict[str, bytes] = {}

    def _derive(self, label: bytes) -> bytes:
        return hmac.new(self._secret, label, hashlib.sha256).digest()[:32]

    def account_key(self, account_id: str) -> bytes:
        key = self._account_keys.get(account_id)
        if key is None:
            key = self._derive(b"account:" + account_id.encode())
            if len(self._account_keys) < 100_000:
                self._account_keys[account_id] = key
        return key

    def is_global(self, pair: int, context: str) -> bool:
        digest = hashlib.blake2b(f"{pair}|{context}".encode(), key=self._split_key,
                                 digest_size=1).digest()
        return digest[0] < self._global_threshold

    def choice(self, account_key: bytes, pair: int, context: str) -> int:
        key = self.global_key if self.is_global(pair, context) else account_key
        return _bit(key, pair, context)

    # -- marking ------------------------------------------------------------------------

    def mark_unit(self, unit: str, account_key: bytes, carry: str = "^") -> tuple[str, str]:
        """One prose unit as the key's holder receives it, and the context carried on."""
        slots, carry = unit_slots(unit, carry)
        if not slots:
            return unit, carry
        apostrophe = apostrophe_of(unit)
        out: list[str] = []
        cut = 0
        for slot in slots:
            want = self.choice(account_key, slot.pair, slot.context)
            original = unit[slot.start:slot.end]
            out.append(unit[cut:slot.start])
            if want == slot.observed:
                out.append(original)
            else:
                out.append(with_case(str(PAIRS[slot.pair][want]), original)
                           .replace("'", apostrophe))
            cut = slot.end
        out.append(unit[cut:])
        return "".join(out), carry

    def mark(self, text: str, account_id: str) -> str:
        """``text`` as the account ``account_id`` receives it."""
        marker = StreamMarker(self, account_id)
        return marker.feed(text) + marker.flush()

    # -- detection ------------------------------------------------------------------------

    def distinct_slots(self, texts: Iterable[str]) -> dict[SlotKey, int]:
        """(pair, context) -> the form seen most often there, over all ``texts``."""
        seen: dict[SlotKey, Counter[int]] = {}
        for text in texts:
            carry = "^"
            for unit, prose in split_units(text):
                if not prose:
                    continue
                slots, carry = unit_slots(unit, carry)
                for slot in slots:
                    seen.setdefault((slot.pair, slot.context), Counter())[slot.observed] += 1
        return {k: c.most_common(1)[0][0] for k, c in seen.items()}

    def score_slots(self, slots: dict[SlotKey, int], key: bytes, subject: str, *,
                    kind: str) -> Score:
        want_global = kind == "global"
        n = matches = 0
        for (pair, context), observed in slots.items():
            if self.is_global(pair, context) != want_global:
                continue
            n += 1
            matches += _bit(key, pair, context) == observed
        return Score(subject, n, matches, p_value(matches, n))

    def score_account(self, texts: Iterable[str], account_id: str) -> Score:
        return self.score_slots(self.distinct_slots(texts), self.account_key(account_id),
                                account_id, kind="account")

    def score_global(self, texts: Iterable[str]) -> Score:
        return self.score_slots(self.distinct_slots(texts), self.global_key, "global",
                                kind="global")

    def trace(self, texts: Iterable[str], candidates: Sequence[str]) -> list[Score]:
        """Score every candidate account; best first. Compare p-values with
        ``alpha / len(candidates)`` (Bonferroni) before naming anyone."""
        slots = self.distinct_slots(texts)
        scores = [self.score_slots(slots, self.account_key(a), a, kind="account")
                  for a in candidates]
        return sorted(scores, key=lambda s: (s.p_value, -s.matches))


class StreamMarker:
    """Marks streamed text unit by unit; the concatenated output equals :meth:`mark`."""

    def __init__(self, fingerprinter: Fingerprinter, account_id: str) -> None:
        self.fingerprinter = fingerprinter
        self.key = fingerprinter.account_key(account_id)
        self.splitter = UnitSplitter()
        self.carry = "^"

    def feed(self, text: str) -> str:
        return "".join(self.mark(u, p) for u, p in self.splitter.feed(text))

    def flush(self) -> str:
        return "".join(self.mark(u, p) for u, p in self.splitter.flush())

    def mark(self, unit: str, prose: bool) -> str:
        if not prose:
            return unit
        out, self.carry = self.fingerprinter.mark_unit(unit, self.key, self.carry)
        return out
