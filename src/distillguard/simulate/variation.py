"""How attackers vary their templates so that exact matching is not enough.

Three operations, each applied with a per-campaign probability:

* paraphrase: rewrite the wrapper around an instruction (several equivalent framings)
  and swap common verbs for synonyms;
* reorder: put the input before the instruction, or shuffle the sentences of a
  multi-sentence instruction;
* noise: typos (adjacent swaps), doubled spaces, a trailing request tag or pleasantry.

The instruction content (what the harvester wants answered) is kept; only its surface
changes, as in real campaigns that rotate prompt templates.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

SYNONYMS: dict[str, tuple[str, ...]] = {
    "write": ("compose", "produce", "draft", "create"),
    "explain": ("describe", "clarify", "walk me through", "elaborate on"),
    "give": ("provide", "offer", "supply"),
    "list": ("enumerate", "name", "itemize"),
    "create": ("generate", "build", "make", "construct"),
    "find": ("determine", "identify", "locate"),
    "generate": ("create", "produce", "come up with"),
    "describe": ("explain", "characterize", "outline"),
    "summarize": ("sum up", "condense", "give a summary of"),
    "classify": ("categorize", "label", "sort"),
    "calculate": ("compute", "work out", "figure out"),
}
_WORD = re.compile(r"\b(" + "|".join(SYNONYMS) + r")\b", re.IGNORECASE)

FRAMES: tuple[str, ...] = (
    "{instruction}\n\n{input}",
    "Instruction: {instruction}\nInput: {input}",
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
    "Task: {instruction}\n\nContext:\n{input}",
    "{instruction}\n```\n{input}\n```",
    "Here is a task for you. {instruction}\nUse this input: {input}",
)
FRAMES_NO_INPUT: tuple[str, ...] = (
    "{instruction}",
    "Instruction: {instruction}",
    "### Instruction:\n{instruction}\n\n### Response:",
    "Task: {instruction}",
    "Please answer the following. {instruction}",
    "{instruction} Answer carefully.",
)
TAGS = ("ref", "req", "id", "job", "batch", "q")
PLEASANTRIES = ("Thanks!", "Thank you.", "thx", "Please be thorough.", "Be concise.")


@dataclass(frozen=True, slots=True)
class Variation:
    """Probabilities of each operation for one campaign."""

    paraphrase: float = 0.5
    reorder: float = 0.3
    noise: float = 0.3

    def apply(self, rng: random.Random, instruction: str, input_text: str = "") -> str:
        if rng.random() < self.paraphrase:
            instruction = synonym_swap(rng, instruction)
        if rng.random() < self.reorder:
            instruction = shuffle_sentences(rng, instruction)
        framed = frame(rng, instruction, input_text,
                       reorder=rng.random() < self.reorder,
                       paraphrase=rng.random() < self.paraphrase)
        if rng.random() < self.noise:
            framed = add_noise(rng, framed)
        return framed


def synonym_swap(rng: random.Random, text: str) -> str:
    def swap(m: re.Match[str]) -> str:
        word = m.group(0)
        if rng.random() < 0.5:
            return word
        choice = rng.choice(SYNONYMS[word.lower()])
        return choice[0].upper() + choice[1:] if word[0].isupper() else choice

    return _WORD.sub(swap, text)


def shuffle_sentences(rng: random.Random, text: str) -> str:
    sentences = re.split(r"(?<=[.?!])\s+", text.strip())
    if len(sentences) < 2:
        return text
    rng.shuffle(sentences)
    return " ".join(sentences)


def frame(rng: random.Random, instruction: str, input_text: str, *, reorder: bool,
          paraphrase: bool) -> str:
    if not input_text.strip() or input_text.strip() == "<noinput>":
        frames = FRAMES_NO_INPUT
        return (rng.choice(frames) if paraphrase else frames[0]).format(instruction=instruction)
    if reorder:
        return f"{input_text}\n\n{instruction}"
    template = rng.choice(FRAMES) if paraphrase else FRAMES[0]
    return template.format(instruction=instruction, input=input_text)


def add_noise(rng: random.Random, text: str) -> str:
    kind = rng.randrange(4)
    if kind == 0 and len(text) > 8:
        i = rng.randrange(len(text) - 2)
        return text[:i] + text[i + 1] + text[i] + text[i + 2:]
    if kind == 1:
        return text.replace(" ", "  ", 1 + rng.randrange(3))
    if kind == 2:
        return f"{text}\n[{rng.choice(TAGS)}-{rng.getrandbits(24):06x}]"
    return f"{text} {rng.choice(PLEASANTRIES)}"
