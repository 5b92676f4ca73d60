"""Entry point for ``spark-submit``: ``spark-submit [options] .../detect_spark/__main__.py
--trace s3a://bucket/trace/ --accounts accounts.jsonl --out verdicts.json``."""

from distillguard.detect_spark.cli import detect

if __name__ == "__main__":
    detect(prog_name="distillguard spark detect")
