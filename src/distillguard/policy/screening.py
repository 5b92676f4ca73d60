"""Denied-party screening: account organisations and names against screening lists.

A list is CSV or JSON (documented in docs/policy.md, "Screening lists"):

* CSV with a header row. ``name`` is required; ``alt_names`` (aliases separated by ``;``),
  ``source``, ``id`` (or ``_id`` / ``entity_number``), ``country``, ``programs`` and
  ``type`` (``Individual`` marks a person) are optional; other columns are ignored. The
  CSV export of the US Consolidated Screening List has this shape.
* JSON: ``{"version": 1, "entries": [{"id", "name", "aliases": [...], "source",
  "country", "programs", "type"}]}``, a bare list of such entries, or the Consolidated
  Screening List API answer (``{"results": [{"name", "alt_names", ...}]}``).

Matching uses ``rapidfuzz``: names are normalised (letters of other scripts that imitate
Latin ones, by Unicode's confusables list, and words wholly in another script
transliterated, and also, when every letter of such a word imitates a Latin one, read as
that Latin; case, punctuation, accents, and legal
forms such as *Ltd*, *LLC* or *L.L.C.*, *GmbH*, *OOO*, *Co.*, *Limited Liability Company*
are dropped), then compared with
``token_sort_ratio`` so word order and small spelling or transliteration differences
(*Sergey*/*Sergei*) still match; names are also compared with spaces removed
(*Zhongguancun* / *Zhong Guan Cun*). A person listed with a middle name or patronymic also
matches without it. A score at or above ``screening.threshold`` (default 90)
is a match. Matches are never blocked automatically: they open a review item with the
evidence, and an analyst confirms or dismisses it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson
from anyascii import anyascii
from confusable_homoglyphs import confusables
from rapidfuzz import fuzz, process

from distillguard.errors import ConfigError

LEGAL_FORMS = frozenset([
    "ltd", "limited", "llc", "inc", "incorporated", "co", "company", "corp", "corporation",
    "gmbh", "ag", "sa", "plc", "jsc", "ojsc", "pjsc", "cjsc", "oao", "ooo", "zao", "pao",
    "joint", "stock",
    "bv", "nv", "srl", "spa", "pte", "pvt", "llp", "lp", "sarl", "sas", "kg", "ug", "oy",
    "ab", "as", "aps", "kk", "the", "of", "and", "group", "holding", "holdings",
    "ao", "tov", "ou", "ltda", "pty", "mbh", "aktiengesellschaft", "sro", "doo", "kft",
    "zrt", "fze", "fzc", "fzco", "fzllc", "bhd", "sdn",
])
# Legal forms of several words whose words are not legal forms alone (a name may hold
# "open", "public" or "state"). Lists name many entities "LIMITED LIABILITY COMPANY X"
# or "PUBLIC JOINT STOCK COMPANY X"; "liability" or "public" left in the name kept
# "X LLC" under the threshold.
LEGAL_PHRASES: tuple[tuple[str, ...], ...] = (
    ("gesellschaft", "mit", "beschrankter", "haftung"),
    ("federal", "state", "unitary", "enterprise"), ("state", "unitary", "enterprise"),
    ("open", "joint", "stock"), ("closed", "joint", "stock"), ("public", "joint", "stock"),
    ("private", "joint", "stock"), ("limited", "liability"), ("public", "limited"),
    ("private", "limited"), ("societe", "anonyme"), ("sociedad", "anonima"),
    ("sociedade", "anonima"), ("sp", "zoo"),
)
_NON_WORD = re.compile(r"[^0-9a-z]+")
# Changed whenever normalising or scoring changes what matches: accounts screened before
# are screened again with the new matching (their digest in policy_screened holds it).
MATCHING_VERSION = 2


@lru_cache(maxsize=8192)
def _latin_lookalike(ch: str) -> str:
    """A character of another script that looks like a Latin letter or digit (Cyrillic
    о, а, е, х, Greek ο: Unicode's confusables, UTS #39, as ``confusable_homoglyphs``
    ships them) as that letter; any other character as it is."""
    if ch.isascii():
        return ch
    found = confusables.is_confusable(ch, preferred_aliases=["latin"], greedy=False)
    if found:
        for glyph in found[0]["homoglyphs"]:
            if glyph["c"].isascii() and glyph["c"].isalnum():
                # the confusables fold I into l; a capital that looks like l is an I
                return "I" if glyph["c"] == "l" and ch.isupper() else str(glyph["c"])
    return ch


def _is_latin(ch: str) -> bool:
    return ch.isascii() or unicodedata.name(ch, "").startswith("LATIN ")


_WORD = re.compile(r"\w+")


def _in_latin(word: str, lookalikes: bool = False) -> str:
    """A word as Latin letters: one that holds Latin letters keeps them, its look-alike
    letters of other scripts read as the Latin ones they imitate (a spoof such as
    ``Rоsоbоrоnехpоrt``); a word wholly in another script is transliterated
    (``anyascii``: ``Рособоронэкспорт`` -> ``Rosoboroneksport``). With ``lookalikes``, a
    word wholly in another script whose every letter imitates a Latin one is read as
    those (``АВС``, all Cyrillic, as ``ABC``; transliterated it is ``AVS``)."""
    if any(c.isascii() and c.isalpha() for c in word):
        return "".join(_latin_lookalike(c) for c in word)
    if lookalikes:
        read = "".join(_latin_lookalike(c) for c in word)
        if all(_is_latin(c) for c in read):     # Latin letters beyond ASCII (ɡ) folded
            return str(anyascii(read))
    return str(anyascii(word))


def normalise(name: str, *, lookalikes: bool = False) -> str:
    """Words in Latin letters (:func:`_in_latin`), lower case, accents folded,
    punctuation and legal forms removed. Before the first step a name spelt with a few
    Cyrillic letters (``Rоsоbоrоnехpоrt``) matched nothing, each one a word break, and a
    name written in Cyrillic or Chinese normalised to nothing at all."""
    name = _WORD.sub(lambda m: _in_latin(m.group(0), lookalikes), name)
    folded = unicodedata.normalize("NFKD", name)
    folded = "".join(c for c in folded if not unicodedata.combining(c)).lower()
    words = _drop_phrases(_join_letters(_NON_WORD.sub(" ", folded).split()))
    return " ".join(w for w in words if w not in LEGAL_FORMS)


def _join_letters(words: list[str]) -> list[str]:
    """Runs of two or more one-letter words as one word: an abbreviation written with
    dots (``L.L.C.``, ``S.A.``, ``O.O.O.``) is the legal form it spells, and a name
    spelt out letter by letter (``R o s o b o r o n e x p o r t``) the name."""
    out: list[str] = []
    run: list[str] = []
    for word in [*words, ""]:
        if len(word) == 1:
            run.append(word)
            continue
        out += ["".join(run)] if len(run) > 1 else run
        run = []
        if word:
            out.append(word)
    return out


def _drop_phrases(words: list[str]) -> list[str]:
    """``words`` without the legal forms of :data:`LEGAL_PHRASES`."""
    out: list[str] = []
    i = 0
    while i < len(words):
        for phrase in LEGAL_PHRASES:
            if tuple(words[i:i + len(phrase)]) == phrase:
                i += len(phrase)
                break
        else:
            out.append(words[i])
            i += 1
    return out


def readings(name: str) -> list[str]:
    """The ways ``name`` is compared: normalised, and, when it holds a word wholly in
    look-alike letters of another script, also with that word read as the Latin it
    imitates. A name is either Russian (``Сосо``, *Soso*) or a spoof of a Latin one
    (*Coco*); screening cannot tell which, so it compares both."""
    first = normalise(name)
    second = normalise(name, lookalikes=True)
    return [first] if second == first else [first, second]


@dataclass(frozen=True, slots=True)
class ListEntry:
    entry_id: str
    name: str
    aliases: tuple[str, ...] = ()
    source: str = ""
    country: str | None = None
    programs: str | None = None
    individual: bool = False


@dataclass(frozen=True, slots=True)
class Match:
    value: str          # the account's name that matched
    field: str          # which account field it came from
    entry: ListEntry
    matched_name: str   # the list name or alias it matched
    score: float

    def evidence(self) -> str:
        where = f"{self.entry.source} " if self.entry.source else ""
        return (f"{self.field} {self.value!r} matches {self.matched_name!r} on screening list "
                f"{where}entry {self.entry.entry_id} (score {self.score:.0f})")


class ScreeningList:
    """Every entry's names, normalised once, searchable with one rapidfuzz call."""

    def __init__(self, entries: list[ListEntry], digest: str = "") -> None:
        self.entries = entries
        self.digest = digest
        self._names: list[str] = []
        self._owners: list[tuple[ListEntry, str]] = []
        for entry in entries:
            for raw in (entry.name, *entry.aliases):
                for norm in _variants(normalise(raw), entry.individual):
                    self._names.append(norm)
                    self._owners.append((entry, raw))

        self._compact = [n.replace(" ", "") for n in self._names]

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, value: str, *, threshold: float, field: str = "name") -> list[Match]:
        """Entries whose name or alias matches ``value`` at ``threshold`` or above."""
        out: dict[str, Match] = {}
        if not self._names:
            return []
        for norm in readings(value or ""):
            if not norm:
                continue
            found = process.extract(norm, self._names, scorer=fuzz.token_sort_ratio,
                                    processor=None, score_cutoff=threshold, limit=10)
            # Spacing differs between transliterations (Zhongguancun / Zhong Guan Cun).
            found += process.extract(norm.replace(" ", ""), self._compact,
                                     scorer=fuzz.ratio, processor=None,
                                     score_cutoff=threshold, limit=10)
            for _name, score, index in found:
                entry, raw = self._owners[index]
                if len(norm) < 5 and score < 100:      # short names: exact only
                    continue
                best = out.get(entry.entry_id)
                if best is None or score > best.score:
                    out[entry.entry_id] = Match(value, field, entry, raw, float(score))
        return sorted(out.values(), key=lambda m: -m.score)


def _variants(norm: str, individual: bool) -> list[str]:
    """The name, and for a person listed with three or more names also each form with
    one of them left out (a middle name or patronymic is rarely given at sign-up)."""
    if not norm:
        return []
    words = norm.split()
    out = [norm]
    if individual and 3 <= len(words) <= 5:
        out += [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]
    return out


def _split_aliases(value: Any) -> tuple[str, ...]:
    if isinstance(value, list):
        return tuple(str(v).strip() for v in value if str(v).strip())
    if isinstance(value, str):
        return tuple(a.strip() for a in value.split(";") if a.strip())
    return ()


def _entry(data: dict[str, Any], number: int, origin: str) -> ListEntry:
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"screening.lists: {origin} entry {number} has no 'name'")
    ident = data.get("id") or data.get("_id") or data.get("entity_number") or f"{number}"
    aliases = _split_aliases(data.get("aliases")) + _split_aliases(data.get("alt_names"))
    programs = data.get("programs")
    if isinstance(programs, list):
        programs = "; ".join(str(p) for p in programs)
    return ListEntry(entry_id=str(ident), name=name.strip(), aliases=aliases,
                     source=str(data.get("source") or ""),
                     country=(str(data["country"]) if data.get("country") else None),
                     programs=str(programs) if programs else None,
                     individual=str(data.get("type") or "").lower()
                     in ("individual", "person"))


def parse_list(raw: bytes, origin: str) -> list[ListEntry]:
    """Entries of one screening list file (CSV or JSON, recognised by content)."""
    text = raw.decode("utf-8-sig")
    if text.lstrip().startswith(("{", "[")):
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"screening.lists: {origin} is not valid JSON: {exc}") from None
        if isinstance(doc, dict):
            if doc.get("version", 1) != 1:
                raise ConfigError(f"screening.lists: {origin}: unsupported version "
                                  f"{doc.get('version')!r}")
            doc = doc.get("entries", doc.get("results"))
        if not isinstance(doc, list):
            raise ConfigError(f"screening.lists: {origin}: expected a list of entries")
        return [_entry(d if isinstance(d, dict) else {}, i, origin)
                for i, d in enumerate(doc, 1)]
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or "name" not in reader.fieldnames:
        raise ConfigError(f"screening.lists: {origin}: a CSV list needs a header row with a "
                          "'name' column")
    return [_entry(row, i, origin) for i, row in enumerate(reader, 2)]


def load_lists(paths: list[str], base: Path | None = None) -> ScreeningList:
    entries: list[ListEntry] = []
    digest = hashlib.sha256()
    for path in paths:
        p = Path(path)
        if base is not None and not p.is_absolute():
            p = base / p
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise ConfigError(f"screening.lists: cannot read {p}: {exc.strerror}") from None
        digest.update(raw)
        entries += parse_list(raw, str(p))
    return ScreeningList(entries, digest.hexdigest()[:16] if paths else "")
