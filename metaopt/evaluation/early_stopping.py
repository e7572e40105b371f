"""Learning-curve early stopping: predict a training's final loss from its first steps.

A :class:`CurvePredictor` maps the first ``k`` points of a loss curve to the final
loss, in the spirit of Baker et al. 2018 ("Accelerating Neural Architecture Search
using Performance Prediction"): a regression on frozen features of the observed
prefix -- the (log) losses, their first and second differences -- fitted on curves
that ran to the end. Here the regression is ridge regression in log-loss space
(closed form; the paper's nu-SVR is one choice among several it compares, and a
linear model already ranks well, see docs/early_stopping.md).

:meth:`CurvePredictor.calibrate` turns the point prediction into a stopping rule
with a chosen *false-stop rate* ``alpha``: a training is stopped when even the
predicted final loss minus the ``1 - alpha`` quantile of the calibration
residuals is worse than the incumbent's, so a training that would have beaten
the incumbent is stopped with probability about ``alpha`` (on curves like the
calibration ones). :func:`budget_saved` measures what such a rule saves.

Example:
  >>> rng = np.random.default_rng(0)
  >>> rates = rng.uniform(0.01, 0.2, 200)
  >>> curves = 1.0 + 2.0 * np.exp(-np.outer(rates, np.arange(1, 21)))  # [runs, evals]
  >>> pred = CurvePredictor.fit(curves[:100], k=5).calibrate(curves[100:150], alpha=0.05)
  >>> float(np.corrcoef(pred.predict(curves[150:, :5]), curves[150:, -1])[0, 1]) > 0.99
  True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

#: floor under losses before the log (a loss of exactly 0 stays finite)
LOG_FLOOR = 1e-12


def features(prefix: np.ndarray) -> np.ndarray:
    """Frozen features of curve prefixes ``[N, k]``: log losses, their first and second
    differences, ``[N, 3k - 3]`` (for ``k >= 2``)."""
    y = np.log(np.maximum(np.asarray(prefix, np.float64), LOG_FLOOR))
    parts = [y, np.diff(y, axis=1)]
    if y.shape[1] >= 3:
        parts.append(np.diff(y, 2, axis=1))
    return np.concatenate(parts, axis=1)


@dataclasses.dataclass(frozen=True)
class CurvePredictor:
    """Ridge regression from a curve's first ``k`` points to its final log loss.

    Attributes:
      k: points of the curve it reads.
      weights: ``[F + 1]`` (the last entry is the intercept) on standardised features.
      mean, scale: the features' standardisation, from the fitting curves.
      margin: the calibrated residual quantile (log space) of :meth:`calibrate`;
        0 until calibrated (the rule is then the point prediction).
      alpha: the false-stop rate the margin was calibrated for (``nan``: not calibrated).
    """

    k: int
    weights: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    margin: float = 0.0
    alpha: float = float("nan")

    @classmethod
    def fit(cls, curves: np.ndarray, k: int, ridge: float = 1e-2) -> CurvePredictor:
        """Fits on complete curves ``[N, E]`` (finite; ``2 <= k < E``).

        Raises:
          ValueError: ``k`` out of range, too few curves, or a non-finite curve.
        """
        curves = np.asarray(curves, np.float64)
        if curves.ndim != 2 or not 2 <= k < curves.shape[1]:
            raise ValueError(f"need curves [N, E] and 2 <= k < E, got {curves.shape} and k={k}")
        if not np.all(np.isfinite(curves)):
            raise ValueError("curves to fit on must be finite (drop diverged runs first)")
        if curves.shape[0] < 4:
            raise ValueError(f"need at least 4 curves to fit, got {curves.shape[0]}")
        x = features(curves[:, :k])
        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        z = np.concatenate([(x - mean) / scale, np.ones((len(x), 1))], axis=1)
        y = np.log(np.maximum(curves[:, -1], LOG_FLOOR))
        reg = ridge * len(x) * np.eye(z.shape[1])
        reg[-1, -1] = 0.0  # no penalty on the intercept
        w = np.linalg.solve(z.T @ z + reg, z.T @ y)
        return cls(k=k, weights=w, mean=mean, scale=scale)

    def predict_log(self, prefix: np.ndarray) -> np.ndarray:
        """Predicted final log losses of prefixes ``[N, >= k]`` (the first ``k`` points)."""
        prefix = np.asarray(prefix, np.float64)[:, : self.k]
        with np.errstate(invalid="ignore"):  # inf - inf in a diverged prefix's differences
            z = (features(prefix) - self.mean) / self.scale
        out = z @ self.weights[:-1] + self.weights[-1]
        # a prefix that already diverged predicts a diverged run
        return np.where(np.all(np.isfinite(prefix), axis=1), out, np.inf)

    def predict(self, prefix: np.ndarray) -> np.ndarray:
        """Predicted final losses of prefixes ``[N, >= k]``."""
        return np.exp(self.predict_log(prefix))

    def calibrate(self, curves: np.ndarray, alpha: float = 0.05) -> CurvePredictor:
        """The predictor with ``margin`` = the ``1 - alpha`` quantile of ``predicted -
        true`` final log loss on complete curves held out from :meth:`fit`."""
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        curves = np.asarray(curves, np.float64)
        ok = np.all(np.isfinite(curves), axis=1)
        resid = self.predict_log(curves[ok]) - np.log(np.maximum(curves[ok, -1], LOG_FLOOR))
        return dataclasses.replace(self, margin=float(np.quantile(resid, 1.0 - alpha)), alpha=alpha)

    def stop(self, prefix: np.ndarray, incumbent: float) -> np.ndarray:
        """Whether to stop each training ``[N]``: its final loss, predicted optimistically
        (minus the calibrated margin), is still worse than ``incumbent``."""
        return self.predict_log(prefix) - self.margin > np.log(max(incumbent, LOG_FLOOR))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_json` reads it back."""
        return {
            "k": self.k,
            "weights": self.weights.tolist(),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "margin": self.margin,
            "alpha": None if np.isnan(self.alpha) else self.alpha,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CurvePredictor:
        arr = lambda key: np.asarray(d[key], np.float64)
        alpha = float("nan") if d.get("alpha") is None else float(d["alpha"])
        return cls(int(d["k"]), arr("weights"), arr("mean"), arr("scale"), d["margin"], alpha)


def budget_saved(
    stopped: np.ndarray, k: int, num_evals: int, final: np.ndarray, incumbent: float
) -> dict[str, float]:
    """What a stopping decision costs and saves on complete curves.

    Args:
      stopped: ``[N]`` the rule's decisions after ``k`` of ``num_evals`` points.
      k, num_evals: the prefix length and the curve length (evenly spaced points).
      final: ``[N]`` the true final losses.
      incumbent: the loss to beat.

    Returns:
      ``saved`` (fraction of all training steps not run), ``stopped`` (fraction of runs
      stopped), ``false_stop_rate`` (fraction of the runs that end better than the
      incumbent that were stopped; ``nan`` when none does) and ``winners``.
    """
    stopped = np.asarray(stopped, bool)
    wins = np.asarray(final, np.float64) < incumbent
    return {
        "saved": float(np.mean(stopped) * (1.0 - k / num_evals)),
        "stopped": float(np.mean(stopped)),
        "false_stop_rate": float(np.mean(stopped[wins])) if wins.any() else float("nan"),
        "winners": int(wins.sum()),
    }
