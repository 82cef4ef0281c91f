"""Prepare a policy bundle for serving: what the recommender needs besides the weights.

From logged data (the validation split at the end of ``train.py``, or any file
with ``carepath prepare``) this stores in the bundle:

- ``explain.background``: k-means centres of the observations, the SHAP background;
- ``explain.feature_medians``: a typical value of each base feature, for missing input
  (for a measurement, the median of the weeks it was measured);
- ``explain.benefit`` and ``benefit.safetensors``: the bootstrap FQE ensemble of
  expected PHQ-9 change (:mod:`serving.benefit`).

The bundle is rewritten atomically with its weights unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shap
from numpy.typing import NDArray

from envs.spec import BASE_FEATURES, FEATURE_INDEX, MASK_PREFIX, MASKABLE_FEATURES
from offline_data.dataset import LoggedDataset, Transitions
from policies.bundle import BundlePolicy, load, update_bundle
from serving.benefit import BenefitConfig, fit_benefit


@dataclass
class PrepareConfig:
    """``background_size`` k-means centres from at most ``max_rows`` observations."""

    background_size: int = 16
    max_rows: int = 20_000
    seed: int = 0
    benefit: BenefitConfig = field(default_factory=BenefitConfig)

    def __post_init__(self) -> None:
        if self.background_size < 1:
            raise ValueError(f"background_size must be positive, got {self.background_size}")
        if self.max_rows < self.background_size:
            raise ValueError(f"max_rows ({self.max_rows}) must be at least background_size ({self.background_size})")


def feature_medians(obs: NDArray[np.floating]) -> dict[str, float]:
    """Median of each base feature; measurements only over the weeks they were measured."""
    medians: dict[str, float] = {}
    for name in BASE_FEATURES:
        column = obs[:, FEATURE_INDEX[name]]
        if name in MASKABLE_FEATURES:
            measured = obs[:, FEATURE_INDEX[MASK_PREFIX + name]] > 0.5
            column = column[measured] if measured.any() else column
        medians[name] = float(np.median(column)) if len(column) else 0.0
    return medians


def shap_background(obs: NDArray[np.floating], size: int, max_rows: int, seed: int) -> NDArray[np.float64]:
    """k-means centres of (a seeded sample of) the observations."""
    rng = np.random.default_rng(seed)
    rows = obs if len(obs) <= max_rows else obs[rng.choice(len(obs), max_rows, replace=False)]
    rows = np.asarray(rows, dtype=np.float64)
    if len(rows) <= size:
        return np.asarray(rows, dtype=np.float64)
    return np.asarray(shap.kmeans(rows, size).data, dtype=np.float64)


def prepare_bundle(bundle: str | Path, data: LoggedDataset | Transitions, config: PrepareConfig | None = None, *,
                   source: str = "", progress: bool = True) -> BundlePolicy:
    """Fit and store the serving extras of ``bundle`` on ``data``; returns the reloaded policy."""
    config = config if config is not None else PrepareConfig()
    transitions = data.transitions() if isinstance(data, LoggedDataset) else data
    if len(transitions) == 0:
        raise ValueError("cannot prepare a bundle for serving from empty data")
    policy = load(bundle)
    tensors, benefit_entry = fit_benefit(policy, transitions, config.benefit, progress=progress)
    explain: dict[str, Any] = {
        **policy.manifest.explain,
        "background": shap_background(transitions.obs, config.background_size, config.max_rows,
                                      config.seed).round(6).tolist(),
        "feature_medians": feature_medians(transitions.obs),
        "benefit": benefit_entry,
        "prepared_on": {"source": source, "transitions": len(transitions),
                        "episodes": int(transitions.episode.max()) + 1 if len(transitions) else 0},
        "prepare_config": {k: v for k, v in asdict(config).items() if k != "benefit"},
    }
    return update_bundle(bundle, explain=explain, extra_tensors={benefit_entry["file"]: tensors})
