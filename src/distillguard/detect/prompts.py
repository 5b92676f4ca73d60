"""What a prompt's text gives: template skeleton, layout, SimHash, phrase signals.

These are the text-level half of :mod:`distillguard.detect.features`, computed once per
distinct text (:class:`~distillguard.detect.features.Extractor` caches them):

* :func:`skeleton_words`: the prompt lower-cased, with code blocks, URLs, numbers and
  quoted strings replaced by placeholders, as words; :func:`shape`: its layout (line
  markers such as ``###``, ``Input:``); :func:`frame_keys`: hashes of the layout (none
  for one plain paragraph), the first and the last FRAME_WORDS words; :func:`simhashes`: 64-bit SimHashes (numpy, one pass
  over many prompts); together in :func:`prompt_features`;
* :func:`text_features`: reasoning, rubric and tool-use phrases and the category literals
  of a request's whole text, found in one Aho-Corasick pass.

Apart from code blocks (which may span lines) every placeholder, word and line marker
lies within one line, so a prompt's skeleton is its lines' skeletons one after another:
:func:`prompt_features` computes each distinct line once (:func:`lines_features`, kept in
a bounded cache), and campaigns, which change one line of a template (a payload, a job
tag), pay for that line only. The tests check this against :func:`skeleton_words` and
:func:`shape` on whole texts.
"""

from __future__ import annotations

import re
import zlib
from array import array
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import ahocorasick_rs
import numpy as np

from distillguard.detect.textcache import TextCache
from distillguard.exchange import content_text, request_text

FRAME_WORDS = 3
HEAD_CHARS = 1_500
TAIL_CHARS = 600
SIMHASH_WORDS = 128   # at most 255: simhashes_of counts in bytes
LAYOUT_LINES = 40
LAYOUT_PARTS = 16

_CODE_BLOCK = re.compile(r"```.*?(?:```|$)", re.S)
_URL = re.compile(r"https?://\S+|www\.\S+")
_QUOTED = re.compile(r"\"[^\"\n]{1,200}\"|'[^'\n]{1,80}'")
_NUMBER = re.compile(r"\d+(?:[.,:/]\d+)*")
_WORD = re.compile(r"[a-z#@%$]+")
_LINE_HEAD = re.compile(
    r"(?:#+ ?)?[a-z][a-z ]{0,24}:(?=\s|$)|#+|[-*>•]|\d+[.)]|```|\[[a-z]+[-_]")

# Literal phrases, matched with substring search (much faster than one big alternation).
REASONING_PHRASES = (
    "step by step", "step-by-step", "show your work", "show your reasoning",
    "show all your work", "show the steps", "show your steps", "show your thinking",
    "explain your reasoning", "explain the reasoning", "chain of thought", "chain-of-thought",
    "think carefully", "think it through", "think through", "think aloud", "let's think",
    "lets think", "let's reason", "reason carefully", "reason through", "<think", "walk me through",
    "detailed reasoning", "full reasoning", "internal reasoning", "full derivation",
    "before answering", "before giving", "intermediate step", "justify each", "reasoning first")
RUBRIC_PHRASES = (
    "rubric", "on a scale of", "on a scale from", "-10 scale", "-5 scale", "score the",
    "score from", "score between", "rate the response", "rate the answer", "rate this",
    "grade the", "grade this", "grader", "which response is better", "which answer is better",
    "response a", "response b", "assistant a", "assistant b", "evaluate the following answer",
    "evaluate the following response", "evaluate the response", "evaluate the answer",
    "as a judge", "strict judge", "\"score\"")
TOOL_PHRASES = (
    "toolformer", "function_call", "function call", "tool_call", "tool call",
    "available tools", "access to the following tools", "you have access to tools",
    "api call", "tools:", "json schema")
# Capability keywords, matched against the skeleton's words (first rule that hits wins).
def _kw(words: str) -> frozenset[str]:
    return frozenset(words.split())


CATEGORY_WORDS: tuple[tuple[int, frozenset[str], tuple[str, ...]], ...] = (
    (1, _kw("python javascript typescript java rust golang sql html css regex code "
                  "function program algorithm compile debug script array api def class bug "
                  "implement method recursion json xml bash shell"),
     ("```", "c++", "@code")),
    (2, _kw("solve calculate equation integral derivative probability math arithmetic "
                  "average percent sum total how many much cost price"), ()),
    (5, _kw("translate translation translating"), ()),
    (4, _kw("story poem essay email letter rewrite paraphrase summarize summarise "
                  "slogan headline blog tweet compose draft"), ()),
    (6, _kw("what who when why explain describe difference tell history"), ()),
)

_M1 = np.uint64(0x9E3779B97F4A7C15)
_TOKEN_CACHE: dict[str, int] = {}   # word -> hash, for SimHash (bounded)
_TOKEN_CACHE_SIZE = 1_000_000


def _keyword_bits() -> dict[str, int]:
    """keyword -> bit i for each rule i of CATEGORY_WORDS that lists it."""
    bits: dict[str, int] = {}
    for bit, (_, keywords, _) in enumerate(CATEGORY_WORDS):
        for word in keywords:
            bits[word] = bits.get(word, 0) | 1 << bit
    return bits


_KEYWORD_BITS = _keyword_bits()
_KEYWORDS = frozenset(_KEYWORD_BITS)


def _head_and_tail(text: str) -> str:
    """What the skeleton reads of a long prompt: its head and its tail."""
    if len(text) > HEAD_CHARS + TAIL_CHARS:
        return text[:HEAD_CHARS] + " \n " + text[-TAIL_CHARS:]
    return text


def _skeleton(low: str) -> list[str]:
    # each substitution only where its pattern can match (a substring it must contain)
    if "```" in low:
        low = _CODE_BLOCK.sub(" @code ", low)
    if "http" in low or "www." in low:
        low = _URL.sub(" @url ", low)
    if '"' in low or "'" in low:
        low = _QUOTED.sub(" @q ", low)
    return _WORD.findall(_NUMBER.sub("#", low))


def skeleton_words(text: str) -> list[str]:
    """The prompt's template skeleton as words: placeholders for code, URLs, numbers and
    quoted strings; only the head and tail of long prompts are read."""
    return _skeleton(_head_and_tail(text).lower())


def _marker(line: str) -> str | None:
    """A lower-cased line's layout part: its leading marker, ``~`` for free text, None
    for a blank line."""
    line = line.strip()
    if not line:
        return None
    m = _LINE_HEAD.match(line)
    return _NUMBER.sub("#", m.group(0)) if m else "~"


def _layout(markers: Sequence[str | None]) -> str:
    parts: list[str] = []
    for part in markers:
        if part is not None and (part != "~" or not parts or parts[-1] != "~"):
            parts.append(part)
    return " ".join(parts[:LAYOUT_PARTS])


def shape(text: str) -> str:
    """The layout of a prompt: per line, its leading marker (``###``, ``-``, ``1.``,
    ``label:``) or ``~`` for free text, consecutive free lines folded into one."""
    return _layout([_marker(line) for line in text.lower().split("\n")[:LAYOUT_LINES]])


def topics(words: Sequence[str]) -> int:
    """Bit i set when a keyword of rule i of CATEGORY_WORDS is among the words."""
    bits = 0
    for word in _KEYWORDS.intersection(words):
        bits |= _KEYWORD_BITS[word]
    return bits


def _crc_adler(text: str) -> int:
    raw = text.encode()
    return zlib.crc32(raw) | (zlib.adler32(raw) << 32)


def _hash(word: str) -> int:
    h = _TOKEN_CACHE.get(word)
    if h is None:
        h = _crc_adler(word)
        if len(_TOKEN_CACHE) < _TOKEN_CACHE_SIZE:
            _TOKEN_CACHE[word] = h
    return h


# One plain paragraph (or nothing) is no layout to share: nearly every prompt has it.
_PLAIN_LAYOUTS = ("", "~")


def _frame(layout: str, head: Sequence[str], tail: Sequence[str]) -> tuple[int, ...]:
    words = (_crc_adler("h|" + " ".join(head[:FRAME_WORDS])),
             _crc_adler("t|" + " ".join(tail[-FRAME_WORDS:])))
    if layout in _PLAIN_LAYOUTS:
        return words
    return (_crc_adler("s|" + layout), *words)


def frame_keys(text: str, words: Sequence[str], system: str = "") -> tuple[int, ...]:
    """Hashes of the prompt's layout (unless it is one plain paragraph, which every
    other prompt shares), its first and its last FRAME_WORDS skeleton words, and of the
    system prompt's skeleton when there is one."""
    keys = _frame(shape(text), words, words)
    if system:
        return (*keys, system_key(system))
    return keys


def system_key(system: str) -> int:
    """The template key of a system prompt: a hash of its skeleton's first 40 words."""
    return _crc_adler("y|" + " ".join(skeleton_words(system)[:40]))


def _word_hashes(words: Sequence[str]) -> list[int]:
    found = list(map(_TOKEN_CACHE.get, words))
    if None in found:
        return [h if h is not None else _hash(w) for h, w in zip(found, words, strict=True)]
    return found  # type: ignore[return-value]  # no None left


def simhashes(docs: Sequence[Sequence[str]]) -> list[int]:
    """64-bit SimHash of each document's words (the first SIMHASH_WORDS), in one numpy
    pass over the batch. Four 16-bit bands: two fingerprints within Hamming distance 3
    share a band."""
    return simhashes_of([_packed(_word_hashes(words[:SIMHASH_WORDS])) for words in docs])


def _packed(hashes: Iterable[int]) -> bytes:
    """Word hashes as unsigned 64-bit integers in machine order, 8 bytes each."""
    return array("Q", hashes).tobytes()


def simhashes_of(docs: Sequence[bytes]) -> list[int]:
    """:func:`simhashes` from each document's word hashes (:func:`_packed`; the first
    SIMHASH_WORDS are used).

    Each word's 64-bit hash is unpacked into 64 bytes of 0/1; a document's per-bit counts
    are sums of those rows. A document has at most SIMHASH_WORDS (128) words, so a count
    fits in a byte and eight counts are summed at once in each uint64 lane (no carry
    crosses a byte)."""
    heads = [doc[:8 * SIMHASH_WORDS] for doc in docs]
    out = [0] * len(docs)
    flat = b"".join(heads)
    if not flat:
        return out
    spread = np.frombuffer(flat, dtype=np.uint64) * _M1   # spread crc/adler bits
    # row i, column j = bit j of word i's hash (little-endian bytes, little bit order)
    raw = spread.astype("<u8", copy=False).view(np.uint8).reshape(-1, 8)
    bits = np.unpackbits(raw, axis=1, bitorder="little")
    tokens = np.array([len(h) // 8 for h in heads], dtype=np.intp)
    full = np.flatnonzero(tokens)                         # documents with words
    starts = (np.cumsum(tokens) - tokens)[full]
    counts = np.add.reduceat(bits.view(np.uint64), starts, axis=0).view(np.uint8)
    set_bits = 2 * counts.astype(np.int32) > tokens[full, None]   # more +1 than -1
    values = np.packbits(set_bits, axis=1, bitorder="little").view("<u8").ravel()
    for k, value in zip(full.tolist(), values.tolist(), strict=True):
        out[k] = value
    return out


def _phrase_automaton() -> tuple[ahocorasick_rs.AhoCorasick, tuple[int, ...]]:
    """One Aho-Corasick automaton over every literal phrase, and each phrase's signal
    bits: _REASONING, _RUBRIC, _TOOL, then bit _LITERAL + i for rule i of
    CATEGORY_WORDS. One pass over a text finds them all (overlaps included)."""
    masks: dict[str, int] = {}
    groups = [REASONING_PHRASES, RUBRIC_PHRASES, TOOL_PHRASES,
              *(literals for _, _, literals in CATEGORY_WORDS)]
    for bit, phrases in enumerate(groups):
        for phrase in phrases:
            masks[phrase] = masks.get(phrase, 0) | 1 << bit
    return ahocorasick_rs.AhoCorasick(list(masks)), tuple(masks.values())


_REASONING, _RUBRIC, _TOOL, _LITERAL = 1, 2, 4, 3
_PHRASES, _PHRASE_BITS = _phrase_automaton()


def phrase_bits(low: str) -> int:
    """The signal bits (see _phrase_automaton) of the phrases found in a lower-cased
    text: the same as testing ``phrase in low`` for each phrase."""
    bits = 0
    for index, _, _ in _PHRASES.find_matches_as_indexes(low, overlapping=True):
        bits |= _PHRASE_BITS[index]
    return bits


class LineFeatures(NamedTuple):
    """What one line gives (computed once per distinct line)."""

    head: tuple[str, ...]         # the first FRAME_WORDS skeleton words
    tail: tuple[str, ...]         # the last FRAME_WORDS skeleton words
    hashes: bytes                 # the first SIMHASH_WORDS words' hashes (_packed)
    marker: str | None            # layout part (None: a blank line)
    topics: int


class PromptFeatures(NamedTuple):
    """What the prompt (the last user turn) gives, computed once per distinct prompt.
    (Tuples of plain values: the garbage collector stops tracking cached ones.)"""

    frame: tuple[int, ...]        # layout (if any), head and tail keys (frame_keys)
    simhash: int
    topics: int                   # bit i: a keyword of CATEGORY_WORDS[i] among the words


class TextFeatures(NamedTuple):
    """What the request's whole (head and tail) text gives, once per distinct text."""

    reasoning: bool
    rubric: bool
    tool: bool                    # tool-use framing
    literals: int                 # bit i: a literal of CATEGORY_WORDS[i] in the text
    length: int                   # characters of the lower-cased text


def lines_features(lines: Sequence[str]) -> list[LineFeatures]:
    """Skeleton words, their hashes, layout marker and topics of each line (lines without
    a code block: those are read with their whole prompt). Words new to the word-hash
    cache are hashed once each for all the lines."""
    lows = [line.lower() for line in lines]
    docs = [_skeleton(low) for low in lows]
    new = set().union(*docs).difference(_TOKEN_CACHE)
    if len(_TOKEN_CACHE) + len(new) <= _TOKEN_CACHE_SIZE:
        _TOKEN_CACHE.update({word: _crc_adler(word) for word in new})
        get = _TOKEN_CACHE.__getitem__
        hashes = [_packed(map(get, words[:SIMHASH_WORDS])) for words in docs]
    else:   # the cache is full: hash what it lacks word by word
        hashes = [_packed(_word_hashes(words[:SIMHASH_WORDS])) for words in docs]
    return [LineFeatures(tuple(words[:FRAME_WORDS]), tuple(words[-FRAME_WORDS:]), h,
                         _marker(low), topics(words))
            for low, words, h in zip(lows, docs, hashes, strict=True)]


def _layout_of(prompt: str, known: dict[str, LineFeatures]) -> str:
    """shape(prompt), with the markers of the lines in ``known`` taken from there."""
    markers = []
    for line in prompt.split("\n", LAYOUT_LINES)[:LAYOUT_LINES]:
        info = known.get(line)
        markers.append(_marker(line.lower()) if info is None else info.marker)
    return _layout(markers)


def prompt_features(prompts: Sequence[str], lines: TextCache[LineFeatures] | None = None
                    ) -> list[PromptFeatures]:
    """Template keys, SimHash (one numpy pass) and topics of each prompt, from its
    lines' features (kept in ``lines``, when given) unless a code block may span lines."""
    memo: TextCache[LineFeatures] = lines if lines is not None else TextCache(0)
    split: list[list[str] | None] = []   # each prompt's lines (None: read whole)
    for prompt in prompts:
        head = _head_and_tail(prompt)
        # a code block may span lines: such a prompt is read whole
        split.append(None if "```" in head else head.split("\n"))
    # this call's lines, kept or computed
    known = memo.resolve((line for lines in split if lines for line in lines), lines_features)
    docs = []
    rest = []
    for prompt, lines_of in zip(prompts, split, strict=True):
        if lines_of is None:
            words = _skeleton(_head_and_tail(prompt).lower())
            docs.append(_packed(_word_hashes(words[:SIMHASH_WORDS])))
            rest.append((_layout_of(prompt, known), words, words, topics(words)))
            continue
        infos = [known[line] for line in lines_of]
        chunks = []
        size = 0
        topic = 0
        for info in infos:
            if size < 8 * SIMHASH_WORDS:
                chunks.append(info.hashes)
                size += len(info.hashes)
            topic |= info.topics
        first: list[str] = []
        for info in infos:
            first.extend(info.head)
            if len(first) >= FRAME_WORDS:
                break
        last: list[str] = []
        for info in reversed(infos):
            last[:0] = info.tail
            if len(last) >= FRAME_WORDS:
                break
        if len(prompt) <= HEAD_CHARS + TAIL_CHARS:   # the lines are the prompt's own
            layout = _layout([info.marker for info in infos[:LAYOUT_LINES]])
        else:   # the layout reads the first lines of the whole prompt
            layout = _layout_of(prompt, known)
        docs.append(b"".join(chunks))
        rest.append((layout, first, last, topic))
    return [PromptFeatures(_frame(layout, first, last), sim, topic)
            for (layout, first, last, topic), sim in zip(rest, simhashes_of(docs), strict=True)]


def text_features(text: str) -> TextFeatures:
    """Phrase signals of a request's text (head and tail of long texts)."""
    low = text.lower()
    bits = phrase_bits(low)
    return TextFeatures(bool(bits & _REASONING), bool(bits & _RUBRIC), bool(bits & _TOOL),
                        bits >> _LITERAL, len(low))


def request_parts(request: Any) -> tuple[str, str, str, int]:
    """(text, prompt, system, depth) of a request body, in one pass over its messages:
    its whole text (only the head and tail of a long one), the last user turn (the
    template lives there; the text when there is none), the system and developer
    prompts joined, and the number of earlier assistant turns."""
    if not isinstance(request, dict):
        return "", "", "", 0
    messages = request.get("messages")
    if not isinstance(messages, list):
        text = _text_head_tail(request_text(request))
        return text, text, "", 0
    pieces = []
    user = ""
    system = []
    depth = 0
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        piece = content if isinstance(content, str) else content_text(content)
        pieces.append(piece)
        role = m.get("role")
        if role == "user":
            user = piece
        elif role == "assistant":
            depth += 1
        elif role == "system" or role == "developer":
            system.append(str(content or ""))
    text = _text_head_tail("\n".join(pieces))
    return text, user or text, "\n".join(system), depth


def _text_head_tail(text: str) -> str:
    if len(text) > HEAD_CHARS + TAIL_CHARS:
        return text[:HEAD_CHARS] + "\n" + text[-TAIL_CHARS:]
    return text
