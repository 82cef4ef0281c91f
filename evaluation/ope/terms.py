"""Every importance-sampling estimator as a sum of ratios of per-episode sums.

All six estimators in :mod:`evaluation.ope.estimators` can be written as

    value = sum_k  (sum_i num[i, k]) / (sum_i den[i, den_index[k]])

where ``den_index[k] == -1`` means "divide by the number of episodes". The
per-episode-mean estimators (IS, PDIS, DR) are one column over ``n``; WIS is
one ratio; WPDIS and WDR are one ratio per step. Written this way every
resampling scheme is a weighted column sum: a bootstrap resample with episode
counts ``c`` (one row of a counts matrix) has the value
``combine(c @ num, c @ den, c.sum())`` (:meth:`RatioTerms.combine`), and the
leave-one-out (jackknife) value without episode ``i`` is
``combine(num.sum(0) - num[i], den.sum(0) - den[i], n - 1)``, so intervals
never build (resamples, episodes, steps) tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]


@dataclass(frozen=True)
class RatioTerms:
    """Per-episode numerator and denominator columns of one estimator."""

    num: F64  # (E, K)
    den: F64  # (E, J)
    den_index: I64  # (K,), values in [-1, J): -1 divides by the number of episodes

    def __post_init__(self) -> None:
        if self.num.ndim != 2 or self.den.ndim != 2 or self.num.shape[0] != self.den.shape[0]:
            raise ValueError(f"num and den must be (E, K) and (E, J), got {self.num.shape} and {self.den.shape}")
        if self.den_index.shape != (self.num.shape[1],):
            raise ValueError(f"den_index must have shape ({self.num.shape[1]},), got {self.den_index.shape}")
        if len(self.den_index) and not (-1 <= self.den_index.min() and self.den_index.max() < self.den.shape[1]):
            raise ValueError("den_index out of range")

    @classmethod
    def mean(cls, x: F64) -> RatioTerms:
        """A per-episode mean: ``value = mean(x)``."""
        return cls(x[:, None], np.zeros((len(x), 0)), np.array([-1], dtype=np.int64))

    @property
    def n_episodes(self) -> int:
        return int(self.num.shape[0])

    @property
    def is_mean(self) -> bool:
        """True when the estimator is the mean of independent per-episode terms (IS, PDIS, DR)."""
        return bool((self.den_index == -1).all())

    def per_episode(self) -> F64:
        """The per-episode terms ``x_i`` of a mean-type estimator (value = mean x)."""
        if not self.is_mean:
            raise ValueError("a ratio (self-normalised) estimator has no independent per-episode terms")
        return self.num.sum(axis=1)

    def combine(self, num_sums: F64, den_sums: F64, n: float | F64) -> F64:
        """The estimator's value from column sums; leading axes broadcast (resamples, left-out episodes)."""
        count = np.broadcast_to(np.asarray(n, dtype=np.float64), num_sums.shape[:-1])[..., None]
        dens = np.concatenate([den_sums, count], axis=-1)[..., self.den_index]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.where(dens != 0, num_sums / np.where(dens != 0, dens, 1.0), np.nan)
        return ratios.sum(axis=-1)

    def value(self) -> float:
        return float(self.combine(self.num.sum(axis=0), self.den.sum(axis=0), self.n_episodes))

    def stacked(self) -> F64:
        """``[num | den]`` as one (E, K + J) matrix, so a resample needs one matrix product."""
        return np.concatenate([self.num, self.den], axis=1)

    def from_stacked_sums(self, sums: F64, n: float | F64) -> F64:
        """Values from ``counts @ self.stacked()`` (shape (..., K + J))."""
        k = self.num.shape[1]
        return self.combine(sums[..., :k], sums[..., k:], n)

    def jackknife(self) -> F64:
        """Leave-one-out values (E,), in closed form: column sums minus each episode's row."""
        num_loo = self.num.sum(axis=0) - self.num
        den_loo = self.den.sum(axis=0) - self.den
        return self.combine(num_loo, den_loo, self.n_episodes - 1)

    def influence(self) -> F64:
        """Empirical influence of each episode (E,), for the delta-method standard error.

        For ``value = sum_k Nbar_k / Dbar_k`` (means over episodes) the
        linearisation is ``IF_i = sum_k (num_ik - R_k den_ik) / Dbar_k`` with
        ``R_k = Nbar_k / Dbar_k``; for a plain mean it is ``x_i - mean(x)``, so
        the delta method reproduces the Student t standard error exactly.
        """
        n = self.n_episodes
        den_full = np.concatenate([self.den, np.ones((n, 1))], axis=1)[:, self.den_index]  # (E, K)
        num_mean = self.num.mean(axis=0)
        den_mean = den_full.mean(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = num_mean / den_mean
            return ((self.num - ratio * den_full) / den_mean).sum(axis=1)


__all__ = ["RatioTerms"]
