"""``distillguard spark detect``: batch campaign detection with Apache Spark.

::

    distillguard spark detect --trace TRACE [--accounts ACCOUNTS.jsonl] --out VERDICTS.json
        [--master local[4] | spark://host:7077 | yarn] [--partitions N] [--conf KEY=VALUE]

Same options and the same verdicts file as ``distillguard detect``; TRACE may be a local
path, a folder, a glob or a Hadoop URI (``hdfs://``, ``s3a://``). Needs the ``spark``
extra (``pip install 'distillguard[spark]'``) and Java 17 or later. See docs/spark.md.
"""

from __future__ import annotations

import time

import click

from distillguard.detect.batch import TICK_SECONDS
from distillguard.detect.calibration import Calibration
from distillguard.detect.cli import Progress, tick_seconds_of, write_verdicts
from distillguard.errors import ConfigError
from distillguard.files import output_path


@click.group("spark")
def spark() -> None:
    """Run batch detection on Apache Spark (local mode or a cluster)."""


@spark.command("detect")
@click.option("--trace", required=True,
              help="Trace: file, folder, glob or Hadoop URI (JSON Lines, any order, .gz ok), "
                   "or a ledger's Parquet export (.parquet).")
@click.option("--accounts", type=click.Path(exists=True, dir_okay=False),
              help="Accounts file (JSON Lines) on the driver.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), callback=output_path,
              help="Verdicts file to write (on the driver).")
@click.option("--calibration", "calibration_path", type=click.Path(exists=True, dir_okay=False),
              help="Calibration file (default: the one shipped with distillguard).")
@click.option("--tick-seconds", default=TICK_SECONDS, show_default=True, type=float,
              callback=tick_seconds_of,
              help="Evaluate links and risk every this many seconds of trace time.")
@click.option("--master", default=None,
              help="Spark master URL (default: what spark-submit set, else local[*]).")
@click.option("--partitions", type=click.IntRange(min=1),
              help="Input splits and sort partitions (default: Spark's split of the input).")
@click.option("--conf", "confs", multiple=True, metavar="KEY=VALUE",
              help="Extra Spark setting, e.g. spark.driver.memory=4g (repeatable).")
@click.option("--progress-log", type=click.Path(dir_okay=False),
              help="Also write progress as JSON Lines (exchanges, seconds, driver MB).")
def detect(trace: str, accounts: str | None, out: str, calibration_path: str | None,
           tick_seconds: float, master: str | None, partitions: int | None,
           confs: tuple[str, ...], progress_log: str | None) -> None:
    """Find distillation campaigns in a trace with Spark; write verdicts with evidence."""
    try:
        from distillguard.detect_spark.job import run_spark, session
    except ImportError as exc:  # pragma: no cover - the extra is not installed
        raise ConfigError(f"Spark detection needs the 'spark' extra ({exc})") from None
    conf: dict[str, str] = {}
    for item in confs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--conf")
        conf[key.strip()] = value.strip()
    from pyspark.sql import SparkSession

    calibration = Calibration.read(calibration_path)
    began = time.perf_counter()
    owned = SparkSession.getActiveSession() is None   # stop only a session made here
    spark_session = session(master, conf=conf)
    spark_session.sparkContext.setLogLevel("WARN")
    try:
        with Progress(progress_log) as progress:
            result, _ = run_spark(spark_session, trace, calibration, accounts=accounts,
                                  tick_seconds=tick_seconds, partitions=partitions,
                                  on_progress=progress)
    finally:
        if owned:
            spark_session.stop()
    write_verdicts(result, out, time.perf_counter() - began)
