"""Confidence intervals and high-confidence lower bounds for off-policy estimates.

- Trajectory bootstrap (Efron & Tibshirani 1993, "An Introduction to the
  Bootstrap"): episodes are resampled with replacement, percentile or BCa
  interval. The resamples are drawn once as a (B, E) matrix of counts
  (``bincount`` of uniform indices, i.e. multinomial counts) and every
  estimator's column sums are ``counts @ [num | den]``, one BLAS product (see
  :mod:`evaluation.ope.terms`). Counts are built in blocks of resamples that
  fit in :data:`COUNTS_BLOCK_BYTES`, so memory stays bounded at any size;
  block sizes follow from the numbers of episodes and resamples, so the seed
  fixes the resamples, which every estimator computed together shares.
- BCa (Efron 1987, "Better bootstrap confidence intervals", JASA 82(397)):
  bias correction from the share of resamples below the estimate, acceleration
  from the jackknife, whose leave-one-out values come in closed form from
  column sums (:meth:`RatioTerms.jackknife`).
- Student t: exact for the per-episode-mean estimators (IS, PDIS, DR); for the
  self-normalised ones (WIS, WPDIS, WDR) the standard error is the delta
  method's, from the linearised estimator (:meth:`RatioTerms.influence`),
  with n - 1 degrees of freedom.
- One-sided lower bounds on the mean of independent terms known to lie in
  ``[a, b]``: Hoeffding (1963) and the empirical Bernstein bound of Maurer &
  Pontil (2009, "Empirical Bernstein bounds and sample variance penalization",
  COLT, Theorem 4), the bound behind high-confidence off-policy evaluation
  (Thomas, Theocharous & Ghavamzadeh 2015, "High confidence off-policy
  evaluation", AAAI). Their upper end is +inf.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import stats

from evaluation.ope.terms import RatioTerms

F64 = NDArray[np.float64]

#: Largest (resamples, episodes) float64 block of bootstrap counts held at once: the rows of one matrix product.
COUNTS_BLOCK_BYTES = 128 * 2**20
#: Counts are drawn in sub-blocks of at most this many bytes of int64 indices: small enough for the allocator
#: to recycle them (allocations above its mmap threshold, 32 MiB at most in glibc, are fresh pages every time,
#: and zeroing those cost more system time than the arithmetic).
DRAW_BLOCK_BYTES = 8 * 2**20


@dataclass(frozen=True)
class IntervalResult:
    low: float
    high: float
    method: str
    level: float
    warnings: tuple[str, ...] = ()


def check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie strictly between 0 and 1, got {level!r}")


def _block_rows(n_episodes: int, n_boot: int) -> tuple[int, int]:
    """Rows per matrix-product block and per drawing sub-block (fixed by the sizes, so the seed fixes the draws)."""
    block = int(max(1, min(n_boot, COUNTS_BLOCK_BYTES // (8 * n_episodes))))
    draw = int(max(1, min(block, DRAW_BLOCK_BYTES // (8 * n_episodes))))
    return block, draw


def _draw_counts(rng: np.random.Generator, out: F64, draw_rows: int) -> None:
    """Fill ``out`` (b, E) with bootstrap counts: uniform indices, one ``bincount`` per sub-block with a row offset."""
    rows, n = out.shape
    offsets = (np.arange(draw_rows, dtype=np.int64) * n)[:, None]
    for start in range(0, rows, draw_rows):
        b = min(draw_rows, rows - start)
        index = rng.integers(0, n, size=(b, n), dtype=np.int64)
        index += offsets[:b]
        out[start:start + b] = np.bincount(index.ravel(), minlength=b * n).reshape(b, n)


def _count_blocks(n_episodes: int, n_boot: int, seed: int) -> Iterator[F64]:
    """Blocks of bootstrap counts in one reused buffer (each block is overwritten by the next)."""
    if n_episodes < 2:
        raise ValueError(f"a bootstrap needs at least 2 episodes, got {n_episodes}")
    if n_boot < 2:
        raise ValueError(f"n_boot must be at least 2, got {n_boot}")
    rng = np.random.default_rng(seed)
    block, draw = _block_rows(n_episodes, n_boot)
    buffer = np.empty((block, n_episodes))
    for start in range(0, n_boot, block):
        counts = buffer[:min(block, n_boot - start)]
        _draw_counts(rng, counts, draw)
        yield counts


def resample_counts(n_episodes: int, n_boot: int, seed: int) -> Iterator[F64]:
    """The bootstrap's resamples as counts, in blocks: row ``b`` says how often each episode is drawn (sums to E).

    Uniform indices counted with ``bincount`` (multinomial counts), so there
    is no loop over resamples; float64 so that the product with the terms is
    a BLAS dgemm. The same seed, number of episodes and ``n_boot`` give the same counts.
    """
    for counts in _count_blocks(n_episodes, n_boot, seed):
        yield counts.copy()


def bootstrap_values(terms: Sequence[RatioTerms], n_boot: int = 1000, seed: int = 0) -> list[F64]:
    """Each estimator's value on ``n_boot`` trajectory-bootstrap resamples, all from the same resamples.

    Every estimator's ``[num | den]`` columns are stacked side by side, so a
    block of resamples costs one matrix product for all of them.
    """
    if not terms:
        return []
    n = terms[0].n_episodes
    if any(t.n_episodes != n for t in terms):
        raise ValueError("all estimators must be computed on the same episodes")
    stacked = [t.stacked() for t in terms]
    matrix = np.concatenate(stacked, axis=1) if len(stacked) > 1 else stacked[0]
    sums = np.empty((n_boot, matrix.shape[1]))
    row = 0
    for counts in _count_blocks(n, n_boot, seed):
        np.matmul(counts, matrix, out=sums[row:row + len(counts)])
        row += len(counts)
    edges = np.cumsum([0] + [s.shape[1] for s in stacked])
    return [t.from_stacked_sums(sums[:, edges[i]:edges[i + 1]], float(n)) for i, t in enumerate(terms)]


def _finite(boot: F64, method: str) -> tuple[F64, tuple[str, ...]]:
    finite = boot[np.isfinite(boot)]
    dropped = len(boot) - len(finite)
    if len(finite) < 2:
        raise ValueError(f"{method}: fewer than 2 bootstrap resamples have a defined value")
    if dropped:
        return finite, (f"{dropped} of {len(boot)} bootstrap resamples had no episode with non-zero weight "
                        "(value undefined) and were left out",)
    return finite, ()


def percentile_interval(boot: F64, level: float = 0.95) -> IntervalResult:
    """Percentile bootstrap interval: the ``(1 - level)/2`` and ``(1 + level)/2`` quantiles of the resamples."""
    check_level(level)
    values, notes = _finite(boot, "bootstrap")
    alpha = 1.0 - level
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return IntervalResult(float(low), float(high), "bootstrap", level, notes)


def bca_acceleration(jackknife: F64) -> float:
    """Efron's acceleration ``sum d^3 / (6 (sum d^2)^1.5)``, ``d = mean(theta_(.)) - theta_(i)``."""
    jk = jackknife[np.isfinite(jackknife)]
    d = jk.mean() - jk if len(jk) else jk
    ss = float(np.square(d).sum())
    return float(np.power(d, 3).sum() / (6.0 * ss**1.5)) if ss > 0 else 0.0


def bca_interval(boot: F64, point: float, jackknife: F64, level: float = 0.95) -> IntervalResult:
    """Bias-corrected and accelerated bootstrap interval (Efron 1987)."""
    check_level(level)
    values, notes = _finite(boot, "BCa")
    b = len(values)
    # ties count half, so a discrete bootstrap distribution centred on the estimate has z0 = 0
    share = float(np.count_nonzero(values < point) + 0.5 * np.count_nonzero(values == point)) / b
    if not 0.0 < share < 1.0:
        notes += (f"BCa: every resample lies on one side of the estimate; bias correction capped at "
                  f"{0.5 / b:g} of the resamples",)
    share = float(np.clip(share, 0.5 / b, 1 - 0.5 / b))
    z0 = float(stats.norm.ppf(share))
    if not np.isfinite(jackknife).all():
        notes += ("BCa: some leave-one-out values are undefined (an episode carries all the weight at some step); "
                  "the acceleration uses the rest",)
    accel = bca_acceleration(jackknife)
    alpha = 1.0 - level
    z = stats.norm.ppf([alpha / 2, 1 - alpha / 2])
    adjusted = stats.norm.cdf(z0 + (z0 + z) / (1 - accel * (z0 + z)))
    low, high = np.quantile(values, adjusted)
    return IntervalResult(float(low), float(high), "bca", level, notes)


def t_interval(terms: RatioTerms, level: float = 0.95, point: float | None = None) -> IntervalResult:
    """Student t interval, ``value +- t_{n-1} * se``; se from the influence values (exact for a mean)."""
    check_level(level)
    n = terms.n_episodes
    if n < 2:
        raise ValueError(f"a t interval needs at least 2 episodes, got {n}")
    value = terms.value() if point is None else point
    influence = terms.influence()
    se = float(np.sqrt(np.square(influence).sum() / (n * (n - 1))))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    notes = () if terms.is_mean else ("t interval of a self-normalised estimator: delta-method standard error",)
    return IntervalResult(value - half, value + half, "t", level, notes)


def refit_interval(point: float, refits: NDArray[np.floating], level: float = 0.95) -> IntervalResult:
    """``point +- t_{B-1} * sd(refits)``: a normal-theory interval from B refits on bootstrap resamples.

    For a model-based estimate (FQE) whose fit is itself random, the spread of
    B refitted values estimates the standard error of the fitted value; with B
    small (10 or so) the t quantile with B - 1 degrees of freedom pays for
    estimating that spread, where percentiles of 10 values could not.
    """
    check_level(level)
    x = np.asarray(refits, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"a refit interval needs at least 2 refitted values, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("a refit interval needs finite refitted values")
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1)) * float(np.std(x, ddof=1))
    return IntervalResult(point - half, point + half, "refit", level)


def _check_range(x: F64, low: float, high: float) -> float:
    if not high > low:
        raise ValueError(f"the range of the per-episode terms must have high > low, got [{low}, {high}]")
    span = high - low
    slack = 1e-9 * max(1.0, abs(low), abs(high))
    if x.min() < low - slack or x.max() > high + slack:
        raise ValueError(f"per-episode terms span [{x.min():.6g}, {x.max():.6g}], outside the stated range "
                         f"[{low:.6g}, {high:.6g}]: the range (reward range or weight bound) is wrong")
    return span


def hoeffding_lower(x: F64, low: float, high: float, level: float = 0.95) -> IntervalResult:
    """Hoeffding's one-sided bound: ``E x >= mean(x) - (b - a) sqrt(ln(1/delta) / (2 n))`` w.p. ``level``."""
    check_level(level)
    span = _check_range(x, low, high)
    delta = 1.0 - level
    bound = float(x.mean()) - span * float(np.sqrt(np.log(1.0 / delta) / (2 * len(x))))
    return IntervalResult(bound, float("inf"), "hoeffding", level)


def bernstein_lower(x: F64, low: float, high: float, level: float = 0.95) -> IntervalResult:
    """Empirical Bernstein bound (Maurer & Pontil 2009, Theorem 4), one-sided, w.p. ``level``:

    ``E x >= mean(x) - sqrt(2 V ln(2/delta) / n) - 7 (b - a) ln(2/delta) / (3 (n - 1))``,
    ``V`` the sample variance (ddof 1). Tighter than Hoeffding when the terms
    vary much less than their range allows, which is typical of clipped
    importance weights.
    """
    check_level(level)
    n = len(x)
    if n < 2:
        raise ValueError(f"the empirical Bernstein bound needs at least 2 episodes, got {n}")
    span = _check_range(x, low, high)
    log_term = float(np.log(2.0 / (1.0 - level)))
    variance = float(np.var(x, ddof=1))
    bound = float(x.mean()) - np.sqrt(2 * variance * log_term / n) - 7 * span * log_term / (3 * (n - 1))
    return IntervalResult(float(bound), float("inf"), "bernstein", level)


__all__ = ["IntervalResult", "bca_interval", "bernstein_lower", "bootstrap_values", "hoeffding_lower",
           "percentile_interval", "refit_interval", "resample_counts", "t_interval"]
