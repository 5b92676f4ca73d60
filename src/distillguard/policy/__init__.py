"""Access policy and enforcement: jurisdiction rules, verification tiers, denied-party
screening, the action ladder driven by detection verdicts, the review queue and audit.

See docs/policy.md. :func:`component` (in :mod:`distillguard.policy.component`) is the
factory listed in :mod:`distillguard.components`; :func:`distillguard.policy.review.open_item`
is how other components put things on the review queue.
"""
