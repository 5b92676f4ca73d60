"""Word shingles and MinHash signatures, computed in batches with numpy.

Text is normalised before shingling so that reformatting does not matter: lower case,
words only (punctuation, Markdown, list markers at line starts such as ``1)`` or ``-``,
and whitespace dropped), and every fingerprint variant
folded to one form (so the per-account marks of :mod:`distillguard.countermeasures` do
not make two copies of one answer look different). Shingles are word 3-grams: each word
gets a 64-bit hash (CRC-32 and Adler-32, cached) and a 3-gram hash mixes its three words'
hashes. Signatures use multiply-shift hashing; the LSH index is
:class:`datasketch.MinHashLSH`, which only needs the hash values.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np
from datasketch import LeanMinHash

from distillguard.countermeasures.variants import FORMS, PAIRS

NUM_PERM = 64
SHINGLE = 3
_MAX = np.uint64((1 << 32) - 1)
_SHIFT = np.uint64(32)
_rng = np.random.RandomState(20260301)
_A = (_rng.randint(0, 1 << 62, size=NUM_PERM, dtype=np.uint64) * np.uint64(2)
      + np.uint64(1)).reshape(-1, 1)
_B = _rng.randint(0, 1 << 62, size=NUM_PERM, dtype=np.uint64).reshape(-1, 1)
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_WORD_IDS: dict[str, int] = {}
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# List markers a reformatter adds or removes at line starts ("1)", "2.", "-", "*", "(3)")
_LIST_MARKERS = re.compile(r"(?m)^[ \t]*(?:(?:[-*+\u2022]|\(?\d{1,3}[.)])[ \t]+)+")
# Contractions with the apostrophe lost fold too ("dont"), except where that spelling is
# a word of another form: "were" is not "we're" ("were not" / "weren't" must agree).
_FORM_WORDS = {w for form in FORMS for w in form.split()}
_FOLD = {form.replace("'", ""): PAIRS[pair][0] for form, (pair, _i) in FORMS.items()
         if " " not in form and form.replace("'", "") not in _FORM_WORDS}
_FOLD.update({form: PAIRS[pair][0] for form, (pair, _i) in FORMS.items() if " " not in form})
# Second forms of several words ("for instance", "so as to", "lots of"), matched on the
# words joined by single spaces after the one-word folding above.
_PHRASES = {b: a for a, b, _g in PAIRS if " " in b}
_PHRASE_RE = re.compile(
    r"(?<!\S)(?:" + "|".join(re.escape(f) for f in sorted(_PHRASES, key=len, reverse=True))
    + r")(?!\S)")
_EMPTY = np.zeros(0, dtype=np.uint64)


def words(text: str, *, fold: bool = True) -> list[str]:
    text = _LIST_MARKERS.sub("", text)
    raw = _WORD.findall(text.lower().replace("\u2019", "'"))
    if not fold:
        return raw
    joined = " ".join(_FOLD.get(w, w) for w in raw)
    return _PHRASE_RE.sub(lambda m: _PHRASES[m.group(0)], joined).split()


def _word_ids(w: list[str]) -> np.ndarray:
    cache = _WORD_IDS
    out = np.empty(len(w), dtype=np.uint64)
    for k, word in enumerate(w):
        h = cache.get(word)
        if h is None:
            h = zlib.crc32(word.encode()) | (zlib.adler32(word.encode()) << 32)
            if len(cache) < 2_000_000:
                cache[word] = h
        out[k] = h
    return out


def shingles(text: str, *, fold: bool = True) -> np.ndarray:
    """Sorted distinct 64-bit hashes of the text's word 3-grams (1-grams if shorter).
    ``fold=False`` keeps fingerprint variants apart (to tell two accounts' copies apart)."""
    w = words(text, fold=fold)
    if not w:
        return _EMPTY
    ids = _word_ids(w)
    if len(ids) < SHINGLE:
        return np.unique(ids)
    grams = ids[:-2] * _M1 + ids[1:-1] * _M2 + ids[2:]
    return np.unique(grams)


def signatures(sets: Sequence[np.ndarray]) -> np.ndarray:
    """MinHash signatures (len(sets) x NUM_PERM) of many shingle sets in one numpy pass:
    multiply-shift hashing ``(a*x + b) mod 2**64 >> 32``. Empty sets get the maximum
    value everywhere (they match nothing)."""
    sig = np.full((len(sets), NUM_PERM), _MAX, dtype=np.uint64)
    nonempty = [i for i, s in enumerate(sets) if len(s)]
    if not nonempty:
        return sig
    flat = np.concatenate([sets[i] for i in nonempty])
    offsets = np.cumsum([0] + [len(sets[i]) for i in nonempty[:-1]])
    hashed = (_A * flat + _B) >> _SHIFT
    sig[nonempty] = np.minimum.reduceat(hashed, offsets, axis=1).T
    return sig


def lean(signature: np.ndarray) -> LeanMinHash:
    return LeanMinHash(seed=1, hashvalues=signature, scheme="affine32")


def containment(small: np.ndarray, large: np.ndarray) -> tuple[float, float]:
    """(|S ∩ L| / |S|, Jaccard) of two sorted distinct hash arrays."""
    if not len(small) or not len(large):
        return 0.0, 0.0
    inter = len(np.intersect1d(small, large, assume_unique=True))
    return inter / len(small), inter / (len(small) + len(large) - inter)
