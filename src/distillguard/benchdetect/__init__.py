"""Detection benchmark: score verdicts against the simulator's ground truth.

``score(trace, accounts, labels, verdicts)`` returns :class:`Scores`; ``bench detect``
prints them as a table and can write a PNG report and JSON. ``run_baseline`` is a
deliberately simple reference detector to compare against.
"""

from distillguard.benchdetect.baseline import run_baseline
from distillguard.benchdetect.metrics import Scores, adjusted_rand_index, read_labels, score

__all__ = ["Scores", "adjusted_rand_index", "read_labels", "run_baseline", "score"]
