"""Each campaign operator's own harness: the system prompt and prompt wrappers it sends.

Separate distillation operations write their own scripts, so two chain-of-thought
campaigns ask for worked reasoning in their own words, put the problem in their own
place and use their own system prompt, even when they harvest the same public data set.
A :class:`Harness` is drawn once per campaign from fragments a script author would
combine; the campaign then sends its own wrappers for its whole life (with the noise of
:mod:`.variation`). Fragments are generic: any two operators may still happen to pick
the same opening or closing, as separate scripts sometimes do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SYSTEM_ROLES = (
    "You are a helpful assistant.", "You are an expert assistant.",
    "You are a knowledgeable AI assistant.", "You are a senior software engineer.",
    "You are a world-class problem solver.", "Act as a careful, precise assistant.",
    "You are an experienced tutor.", "You are a professional technical writer.",
    "You are ChatGPT, a large language model.", "You are an AI that answers questions.",
)
SYSTEM_ASKS = (
    "Give a complete, high-quality answer.", "Answer thoroughly and accurately.",
    "Provide a detailed response.", "Always answer in full and never truncate the output.",
    "Respond with complete, correct and well-structured answers.",
    "Include every detail a reader would need.", "Be accurate, specific and exhaustive.",
    "Write the best possible answer to every request.",
)
SYSTEM_STYLES = (
    "", "Use Markdown formatting.", "Use headings and lists where they help.",
    "Write in clear English.", "Do not mention that you are an AI.",
    "Prefer code examples when relevant.", "Keep a neutral, professional tone.",
)
USER_FRAMES = (
    "{q}", "{q}", "{q}", "Task: {q}", "Instruction: {q}", "{q}\n\nAnswer:",
    "Please complete the following.\n\n{q}", "{q}\n\nRespond in full.",
    "### Instruction\n{q}\n\n### Response", "Request:\n{q}",
)

COT_OPENERS = (
    "Think step by step", "Let's reason carefully", "Work through it step by step",
    "Show all your work", "Explain your reasoning in detail", "Reason through the problem",
    "Show your reasoning", "Think it through carefully", "Write out your full chain of thought",
    "Walk me through the solution",
)
COT_PLACES = (
    "inside <thinking></thinking> tags", "inside <reasoning></reasoning> tags",
    "as numbered steps", "in a section headed 'Reasoning'", "as if teaching a student",
    "one line per step", "with every intermediate step", "in full sentences",
)
COT_ENDINGS = (
    "then give the final answer.", "then state the final answer after '####'.",
    "and end with 'Final answer:' and the number.", "before stating the answer.",
    "then box the final answer.", "and finish with the answer on its own line.",
)
COT_LABELS = ("", "Question: ", "Problem: ", "Q: ", "Task: ", "Math problem: ")

RUBRIC_PERSONAS = (
    "You are a strict grader.", "You are an impartial judge.", "Act as an expert reviewer.",
    "You are evaluating answers written by an AI assistant.", "You are a careful annotator.",
    "You are a quality rater for a question answering service.",
)
RUBRIC_TASKS = (
    "Score the response on a 1-10 scale for correctness, helpfulness and clarity.",
    "Evaluate the following answer against the rubric (accuracy 0-4, completeness 0-3, "
    "style 0-3).",
    "Rate the answer on a scale of 1 to 5 for correctness and completeness.",
    "Grade the response using this rubric: correct (0-5), clear (0-3), concise (0-2).",
    "Score the answer from 0 to 100 for overall quality.",
)
RUBRIC_OUTPUTS = (
    "Output JSON {{\"score\": int, \"rationale\": str}}.",
    "Return the total and a one-sentence justification.",
    "Reply with the score on the first line and a short reason on the second.",
    "Give your rationale first, then 'Score: N'.",
    "Respond only with the number.",
)
RUBRIC_LABELS = (
    ("Question:", "Response:"), ("[Question]", "[Answer]"), ("### Prompt", "### Completion"),
    ("Q:", "A:"), ("<question>", "<answer>"), ("User request:", "Assistant reply:"),
)
PAIRWISE = (
    "Which response is better, A or B? Consider correctness first, then clarity. Reply "
    "with 'A' or 'B' and a short reason.",
    "Compare Response A and Response B. Which answer is better? Answer 'A', 'B' or 'tie'.",
    "You see two answers to one question. Pick the better one (Response A or Response B) "
    "and explain in one sentence.",
)


def _system(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return ""
    style = rng.choice(SYSTEM_STYLES)
    return " ".join(p for p in (rng.choice(SYSTEM_ROLES), rng.choice(SYSTEM_ASKS), style) if p)


def _cot(rng: random.Random) -> tuple[str, ...]:
    opener, ending = rng.choice(COT_OPENERS), rng.choice(COT_ENDINGS)
    places = rng.sample(COT_PLACES, 2)
    label = rng.choice(COT_LABELS)
    out = []
    for place in places:
        ask = f"{opener} {place}, {ending}"
        out.append(f"{ask}\n\n{label}{{q}}" if rng.random() < 0.5 else f"{label}{{q}}\n\n{ask}")
    return tuple(out)


def _rubric(rng: random.Random) -> tuple[str, ...]:
    persona, output = rng.choice(RUBRIC_PERSONAS), rng.choice(RUBRIC_OUTPUTS)
    q, a = rng.choice(RUBRIC_LABELS)
    single = [f"{persona} {task} {output}\n\n{q}\n{{q}}\n\n{a}\n{{a}}"
              for task in rng.sample(RUBRIC_TASKS, 2)]
    pair = f"{rng.choice(PAIRWISE)}\n\n{q}\n{{q}}\n\nResponse A:\n{{a}}\n\nResponse B:\n{{b}}"
    return (*single, pair)


@dataclass(frozen=True, slots=True)
class Harness:
    """One operator's scripts: its system prompt (``""``: none), the frame around a
    harvested instruction, and its chain-of-thought and grading wrappers."""

    system: str
    user_frame: str
    cot: tuple[str, ...]
    rubric: tuple[str, ...]

    @classmethod
    def draw(cls, rng: random.Random) -> Harness:
        return cls(system=_system(rng), user_frame=rng.choice(USER_FRAMES), cot=_cot(rng),
                   rubric=_rubric(rng))

    def frame(self, text: str) -> str:
        return self.user_frame.format(q=text) if self.user_frame != "{q}" else text
