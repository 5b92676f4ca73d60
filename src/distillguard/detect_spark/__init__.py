"""Batch campaign detection on Apache Spark (optional extra ``spark``).

:func:`~distillguard.detect_spark.job.run_spark` gives the same verdicts as the DuckDB
batch path (:func:`distillguard.detect.batch.run_batch`): Spark reads, parses, extracts
features and sorts in parallel; the one ordered detector pass runs on the driver.
See docs/spark.md.
"""

from distillguard.detect_spark.job import run_spark, session, sorted_features

__all__ = ["run_spark", "session", "sorted_features"]
