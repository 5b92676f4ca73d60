"""Calibration: the fitted risk model and the flag threshold, as one versioned JSON file.

``distillguard detect calibrate`` replays a labelled trace through the detector, takes a
snapshot of every account's features at each evaluation, fits the logistic model
(fixed solver and regularisation, so the fit is reproducible; some weights kept to the
sign their feature's meaning gives, :data:`~.scoring.SIGNS`), and sets the
flag threshold from a target false-positive rate: the lowest risk at which at most
``target_fpr`` of the benign accounts would ever have been flagged during the replay.
Nothing is hand-picked; the file records what it was fitted on.

The detector loads :data:`DEFAULT_CALIBRATION` (shipped with the package) unless told
otherwise. Format (version 2; version 1 files were fitted without the volume weighing of
:func:`~.scoring.standardise` and are refused)::

    {"version": 2, "features": [...], "mean": [...], "scale": [...], "coef": [...],
     "intercept": b, "threshold": t, "target_fpr": 0.001,
     "community": {"features": [...], "mean", "scale", "coef", "intercept", "threshold"},
     "fitted_on": {"trace_sha256": ..., "accounts": n, "benign": n, "attack": n,
                   "snapshots": n, "benign_flagged_at_threshold": n}}
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from distillguard.detect.scoring import COMMUNITY_FEATURES, FEATURES, SIGNS, Model, standardise
from distillguard.errors import ConfigError
from distillguard.files import write_atomically

CALIBRATION_VERSION = 2
DEFAULT_CALIBRATION = Path(__file__).with_name("calibration.json")


def _model_json(model: Model) -> dict[str, Any]:
    return {"mean": model.mean.round(8).tolist(), "scale": model.scale.round(8).tolist(),
            "coef": model.coef.round(8).tolist(), "intercept": round(model.intercept, 8)}


def _model(data: dict[str, Any], features: tuple[str, ...]) -> Model:
    return Model(mean=np.asarray(data["mean"], dtype=float),
                 scale=np.asarray(data["scale"], dtype=float),
                 coef=np.asarray(data["coef"], dtype=float),
                 intercept=float(data["intercept"]), features=features)


@dataclass
class Calibration:
    """The account model and threshold, and the community model and threshold: an
    account is flagged when its own risk or its community's reaches the threshold."""

    model: Model
    threshold: float
    target_fpr: float
    fitted_on: dict[str, Any] = field(default_factory=dict)
    community: Model | None = None
    community_threshold: float = 1.01

    def to_json(self) -> dict[str, Any]:
        out = {"version": CALIBRATION_VERSION, "features": list(FEATURES),
               **_model_json(self.model), "threshold": self.threshold,
               "target_fpr": self.target_fpr, "fitted_on": self.fitted_on}
        if self.community is not None:
            out["community"] = {"features": list(COMMUNITY_FEATURES),
                                **_model_json(self.community),
                                "threshold": self.community_threshold}
        return out

    @classmethod
    def from_json(cls, data: Any, source: str = "calibration") -> Calibration:
        if not isinstance(data, dict) or data.get("version") != CALIBRATION_VERSION:
            if isinstance(data, dict) and data.get("version") == 1:
                raise ConfigError(f"{source}: a version 1 calibration file, fitted before "
                                  "per-exchange features were weighed by volume; run "
                                  "`distillguard detect calibrate` again")
            raise ConfigError(f"{source}: not a version {CALIBRATION_VERSION} calibration file")
        if list(data.get("features") or []) != list(FEATURES):
            raise ConfigError(f"{source}: fitted for other features; run "
                              "`distillguard detect calibrate` again")
        community = data.get("community")
        if community is not None and list(community.get("features") or []) != list(
                COMMUNITY_FEATURES):
            raise ConfigError(f"{source}: community model fitted for other features")
        return cls(model=_model(data, FEATURES), threshold=float(data["threshold"]),
                   target_fpr=float(data["target_fpr"]),
                   fitted_on=dict(data.get("fitted_on") or {}),
                   community=_model(community, COMMUNITY_FEATURES) if community else None,
                   community_threshold=float(community["threshold"]) if community else 1.01)

    @classmethod
    def neutral(cls) -> Calibration:
        """A model that flags nothing: what calibration replays the trace with."""
        n = len(FEATURES)
        return cls(model=Model(np.zeros(n), np.ones(n), np.zeros(n), 0.0, FEATURES),
                   threshold=1.01, target_fpr=0.0)

    def write(self, path: str | Path) -> None:
        write_atomically(path, orjson.dumps(self.to_json(), option=orjson.OPT_INDENT_2))

    @classmethod
    def read(cls, path: str | Path | None = None) -> Calibration:
        p = Path(path) if path is not None else DEFAULT_CALIBRATION
        try:
            return cls.from_json(orjson.loads(p.read_bytes()), str(p))
        except OSError as exc:
            raise ConfigError(f"cannot read calibration file {p}: {exc.strerror}") from None
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"{p}: not valid JSON ({exc.msg})") from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def threshold_for(benign_max: np.ndarray, target_fpr: float) -> tuple[float, int]:
    """Lowest threshold at which at most ``target_fpr`` of benign accounts exceed it.

    Returns (threshold, benign accounts at or above it). The threshold sits just above the
    (k+1)-th highest benign peak risk, k = floor(target_fpr * n)."""
    if benign_max.size == 0:
        return 0.5, 0
    allowed = int(math.floor(target_fpr * benign_max.size))
    peaks = np.sort(benign_max)[::-1]
    if allowed >= peaks.size:
        return float(peaks[-1]), int(peaks.size)
    edge = float(peaks[allowed])
    threshold = float(np.nextafter(edge, 1.0)) if edge < 1.0 else 1.0
    threshold = min(1.0, max(threshold, 1e-6))
    return threshold, int((benign_max >= threshold).sum())


def fit_model(rows: np.ndarray, labels: np.ndarray,
              features: tuple[str, ...] = FEATURES) -> Model:
    """Fit the logistic model on feature snapshots (``rows``), labelled 1 for attack.

    L2-regularised logistic regression with balanced class weights (scikit-learn's
    ``LogisticRegression(C=1, class_weight="balanced")`` objective), solved with
    L-BFGS-B so that each feature of :data:`~.scoring.SIGNS` keeps its stated
    direction (its weight bounded at zero)."""
    from scipy.optimize import minimize
    from sklearn.preprocessing import StandardScaler

    if len(features) != rows.shape[1]:
        raise ValueError(f"{rows.shape[1]} feature columns for {len(features)} features")
    if len(set(labels.tolist())) < 2:
        raise ValueError("calibration needs both benign and attack accounts in the trace")
    scaler = StandardScaler().fit(rows)
    scale = np.where(scaler.scale_ > 1e-9, scaler.scale_, 1.0)
    z = standardise(rows, scaler.mean_, scale, features)
    y = np.where(labels == 1, 1.0, -1.0)
    counts = np.bincount(labels.astype(int), minlength=2)
    weight = np.where(labels == 1, len(labels) / (2 * counts[1]), len(labels) / (2 * counts[0]))

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:-1], theta[-1]
        margin = y * (z @ w + b)
        value = float(weight @ np.logaddexp(0.0, -margin) + 0.5 * w @ w)
        g = -weight * y * _sigmoid(-margin)
        return value, np.concatenate([z.T @ g + w, [g.sum()]])

    bounds = [(0.0, None) if SIGNS.get(f) == 1 else (None, 0.0) if SIGNS.get(f) == -1
              else (None, None) for f in features] + [(None, None)]
    fit = minimize(loss, np.zeros(z.shape[1] + 1), jac=True, method="L-BFGS-B",
                   bounds=bounds, options={"maxiter": 15_000, "gtol": 1e-8, "ftol": 1e-14})
    return Model(mean=np.asarray(scaler.mean_, dtype=float), scale=np.asarray(scale),
                 coef=np.asarray(fit.x[:-1], dtype=float), intercept=float(fit.x[-1]),
                 features=features)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * x)))
