""""Was this model trained on our outputs?" with API access to the suspect model only.

Every answer the gateway serves carries, at its *global* slots, a form chosen by a key
only the provider holds (see :mod:`distillguard.countermeasures.fingerprint`). A model
trained on enough of those answers picks up the keyed preferences; an independent model
cannot know them. The test queries the suspect model, pools its answers, and counts at
how many distinct global (pair, context) slots it uses the keyed form.

Null hypothesis: the suspect model's outputs are independent of the secret key (it was
not trained on our marked outputs). Then, at each distinct slot, the keyed form is a fair
coin independent of the form the model writes, so matches ~ Binomial(n, 1/2) and the
p-value is the upper tail. Assumptions: the key is secret and was never used to choose
the prompts; slots are counted once per (pair, context) so the model's repeated habits
are not counted twice; the number of slots found depends on the prompts (answers in
prose with contractions and common adverbs give many, code and arithmetic few).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tqdm import tqdm

from distillguard.countermeasures.fingerprint import Fingerprinter


def model_test(fingerprinter: Fingerprinter, outputs: Iterable[str],
               alpha: float = 0.01) -> dict[str, Any]:
    score = fingerprinter.score_global(outputs)
    return {**score.to_dict(), "alpha": alpha,
            "trained_on_marked_outputs": score.slots > 0 and score.p_value < alpha,
            "null": "outputs independent of the key: matches ~ Binomial(slots, 1/2)"}


def query_model(base_url: str, api_key: str, model: str, prompts: Sequence[str], *,
                max_tokens: int = 400, progress: bool = True) -> list[str]:
    """The suspect model's answers to ``prompts`` through any OpenAI-compatible API."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=2)
    out = []
    for prompt in tqdm(prompts, desc="querying", disable=not progress):
        r = client.chat.completions.create(model=model, max_tokens=max_tokens,
                                           messages=[{"role": "user", "content": prompt}])
        out.append(r.choices[0].message.content or "")
    return out
