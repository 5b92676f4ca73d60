"""Meaning-preserving surface variants and the text units the fingerprint works on.

A *variant pair* is two interchangeable spellings of the same thing ("do not" / "don't",
"often" / "frequently", "summarise" / "summarize"). Every occurrence of either form in
prose is a *slot*; the fingerprint (:mod:`distillguard.countermeasures.fingerprint`)
chooses, at each slot, which form the client sees.

Text is cut into *units* (a sentence or a line) and every decision depends only on the
unit's own text, so a stream processed unit by unit gives exactly the same result as the
whole body. Units that look like code (fenced blocks, indented lines, lines with code
punctuation or backticks) are never touched.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

# (form 0, form 1, guarded). A guarded pair is a contraction of "is/are/am": it is a slot
# only when a word follows in the same unit ("it is red", not "yes, it is.").
PAIRS: tuple[tuple[str, str, bool], ...] = (
    ("do not", "don't", False), ("does not", "doesn't", False),
    ("did not", "didn't", False), ("is not", "isn't", False), ("are not", "aren't", False),
    ("was not", "wasn't", False), ("were not", "weren't", False),
    ("cannot", "can't", False), ("will not", "won't", False),
    ("would not", "wouldn't", False), ("should not", "shouldn't", False),
    ("could not", "couldn't", False), ("has not", "hasn't", False),
    ("have not", "haven't", False), ("we will", "we'll", False),
    ("you will", "you'll", False),
    ("it is", "it's", True), ("that is", "that's", True), ("there is", "there's", True),
    ("you are", "you're", True), ("we are", "we're", True), ("they are", "they're", True),
    ("i am", "i'm", True), ("he is", "he's", True), ("she is", "she's", True),
    ("what is", "what's", True), ("here is", "here's", True), ("who is", "who's", True),
    ("i will", "i'll", False), ("he will", "he'll", False), ("she will", "she'll", False),
    ("they will", "they'll", False), ("it will", "it'll", False),
    ("for example", "for instance", False), ("large", "big", False),
    ("bought", "purchased", False), ("in order to", "so as to", False),
    ("often", "frequently", False), ("quickly", "rapidly", False),
    ("usually", "typically", False), ("approximately", "roughly", False),
    ("therefore", "thus", False), ("additionally", "furthermore", False),
    ("compute", "calculate", False), ("computes", "calculates", False),
    ("computed", "calculated", False), ("computing", "calculating", False),
    ("toward", "towards", False), ("among", "amongst", False),
    ("afterward", "afterwards", False), ("nearly", "almost", False),
    ("perhaps", "maybe", False), ("mostly", "largely", False),
    ("rather than", "instead of", False), ("a lot of", "lots of", False),
    ("everyone", "everybody", False), ("someone", "somebody", False),
    ("anyone", "anybody", False), ("no one", "nobody", False),
    ("until", "till", False), ("occurs", "happens", False), ("occur", "happen", False),
    ("occurred", "happened", False), ("completely", "entirely", False),
    ("essentially", "basically", False), ("particularly", "especially", False),
    ("clearly", "obviously", False),
    ("summarise", "summarize", False), ("summarises", "summarizes", False),
    ("organise", "organize", False), ("recognise", "recognize", False),
    ("realise", "realize", False), ("optimise", "optimize", False),
    ("analyse", "analyze", False), ("behaviour", "behavior", False),
    ("whereas", "while", False),
)

_APOS = "['\u2019]"
# form (normalised: lower case, straight apostrophe, single spaces) -> (pair id, index)
FORMS: dict[str, tuple[int, int]] = {}
for _pid, (_a, _b, _g) in enumerate(PAIRS):
    FORMS[_a] = (_pid, 0)
    FORMS[_b] = (_pid, 1)


def _form_pattern(form: str) -> str:
    return r"\s+".join(re.escape(w).replace("'", _APOS) for w in form.split(" "))


# "whereas" / "while" count as a slot only after a comma (", while"), where "while" is the
# contrasting conjunction, never "for a while".
_COMMA_PAIR = FORMS["whereas"][0]
_ALTERNATION = "|".join(_form_pattern(f) for f in sorted(FORMS, key=len, reverse=True))
# A form glued to a word by ".", "-", "/" or "=" is part of a name ("scipy.optimize",
# "--optimize", "summarize.py", "mode=compute"), not prose: no slot.
SLOT_RE = re.compile(rf"(?<![\w'\u2019.\-/=])(?:{_ALTERNATION})(?![\w'\u2019]|[.\-/=]\w)",
                     re.IGNORECASE)
_NEXT_WORD = re.compile(r"[ \t]+[A-Za-z0-9]")
_WORD = re.compile(r"[A-Za-z]+")
UNIT_END = re.compile(r"\n|(?<=[.!?])[ \t]")
_CODE_CHARS = re.compile(
    r"[;{}\[\]`\\]|\w_\w|\w\(|==|:=|=>|->|//|/\*|</|/>|^\s*(?:def|import|return|class|#include)\b"
    r"|^(?: {4}|\t)"
    r'|^\s*"[^"\n]*"\s*:')  # a JSON member: "key": value
_FENCE = re.compile(r"^\s*(```|~~~)")


def normal_form(text: str) -> str:
    return " ".join(text.lower().replace("\u2019", "'").split())


@dataclass(frozen=True, slots=True)
class Slot:
    """One occurrence of a variant form: which pair, its context, which form is there."""

    pair: int
    context: str
    observed: int
    start: int
    end: int


def unit_slots(unit: str, carry: str = "^") -> tuple[list[Slot], str]:
    """The slots of one prose unit with their contexts, and the context carried to the
    next unit. A slot's context is the last word before it (letters only, so inserted
    list numbers do not count), looking back into earlier units; when another slot comes
    right before it, that slot's pair. Code-like units have no slots and carry nothing."""
    if _CODE_CHARS.search(unit):
        return [], carry
    slots: list[Slot] = []
    prev_end = 0
    context = carry
    for match in SLOT_RE.finditer(unit):
        form = normal_form(match.group(0))
        pair, index = FORMS[form]
        if PAIRS[pair][2] and not _NEXT_WORD.match(unit, match.end()):
            continue
        if pair == _COMMA_PAIR and not unit[:match.start()].rstrip().endswith(","):
            continue
        words = _WORD.findall(unit, prev_end, match.start())
        if words:
            context = words[-1].lower()
        slots.append(Slot(pair, context, index, match.start(), match.end()))
        prev_end, context = match.end(), f"#{pair}"
    words = _WORD.findall(unit, prev_end)
    return slots, (words[-1].lower() if words else context)


def with_case(form: str, like: str) -> str:
    """``form`` written in the letter case of ``like`` (the text it replaces)."""
    if form == "i'm":
        form = "I'm"
    if like.isupper() and len(like) > 1:
        return form.upper()
    if like[:1].isupper():
        return form[:1].upper() + form[1:]
    return form


def apostrophe_of(text: str) -> str:
    return "\u2019" if "\u2019" in text else "'"


class UnitSplitter:
    """Cuts text into units incrementally; tracks fenced code blocks across units."""

    def __init__(self) -> None:
        self._buffer = ""
        self._in_fence = False
        self._line_start = True

    def feed(self, text: str) -> Iterator[tuple[str, bool]]:
        """Complete units in ``text`` (plus what was held back): (unit, is_prose)."""
        self._buffer += text
        cut = 0
        for match in UNIT_END.finditer(self._buffer):
            yield self._unit(self._buffer[cut:match.end()])
            cut = match.end()
        self._buffer = self._buffer[cut:]

    def flush(self) -> Iterator[tuple[str, bool]]:
        if self._buffer:
            rest, self._buffer = self._buffer, ""
            yield self._unit(rest)

    def _unit(self, unit: str) -> tuple[str, bool]:
        prose = not self._in_fence
        if self._line_start and _FENCE.match(unit):
            self._in_fence = not self._in_fence
            prose = False
        self._line_start = unit.endswith("\n")
        return unit, prose


def split_units(text: str) -> list[tuple[str, bool]]:
    splitter = UnitSplitter()
    return [*splitter.feed(text), *splitter.flush()]
