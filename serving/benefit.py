"""Expected change in PHQ-9 of each next step against "continue", with an interval.

A policy's own scores (Q-values in reward units, or logits) rank actions but
do not say how much PHQ-9 a clinician can expect to gain. So for serving we fit
fitted Q evaluation (:mod:`evaluation.ope.fqe`) of the policy with the PHQ-9
fall as the reward: with ``gamma = 1`` and ``H`` iterations, ``Q_H(s, a)`` is the
expected fall of the observed PHQ-9 over the next ``H`` weeks when ``a`` is taken
now and the policy is followed after. The benefit of ``a`` is
``Q_H(s, a) - Q_H(s, continue)``, reported as a change in PHQ-9 (negative =
lower = better).

The interval comes from a bootstrap ensemble: FQE refitted on ``members``
resamples of patients (episodes drawn with replacement), so it carries the
regression and data error that a single fit's interval ignores. With few
members the interval is ``mean +- t * sd`` (a normal interval on the bootstrap
spread). It still assumes the logged data cover the action: for an action the
logging policy rarely took in states like this one, the members agree by
extrapolating alike, so the interval can be too narrow; the response says so.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import stats

from envs.spec import FEATURE_INDEX, N_ACTIONS, N_FEATURES, Action
from offline_data.dataset import Transitions
from policies.base import Policy
from policies.bundle import MANIFEST, BundleError, BundlePolicy, check_tensors
from policies.networks import NetworkSpec, PolicyNetwork

BENEFIT_FILE = "benefit.safetensors"
METHOD = "bootstrap ensemble of fitted Q evaluation (FQE) refits over patients"
_PHQ9 = FEATURE_INDEX["phq9"]


@dataclass
class BenefitConfig:
    """How the benefit ensemble is fitted (small: it runs at the end of every training run)."""

    members: int = 5
    horizon_weeks: int = 12
    updates_per_iteration: int = 150
    batch_size: int = 512
    hidden: tuple[int, ...] = (64, 64)
    level: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.members < 2:
            raise ValueError(f"benefit members must be at least 2 (an interval needs a spread), got {self.members}")
        if self.horizon_weeks < 1:
            raise ValueError(f"benefit horizon_weeks must be positive, got {self.horizon_weeks}")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"benefit level must be in (0, 1), got {self.level}")
        self.hidden = tuple(int(h) for h in self.hidden)


def phq9_fall(transitions: Transitions) -> NDArray[np.float32]:
    """Observed PHQ-9 fall over each logged week (0 on the last week of an episode)."""
    fall = transitions.obs[:, _PHQ9] - transitions.next_obs[:, _PHQ9]
    return np.where(transitions.done, 0.0, fall).astype(np.float32)


#: The fields of ``explain.benefit`` (what :func:`fit_benefit` writes): serving refuses any other.
BENEFIT_ENTRY_KEYS = frozenset({"file", "method", "network", "transitions", *(f.name for f in fields(BenefitConfig))})


def fit_benefit(policy: Policy, transitions: Transitions, config: BenefitConfig, *,
                progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fit the ensemble; returns the tensors to store and the manifest entry describing them."""
    # fitting only: keeps torch's FQE off the serving start-up path
    from evaluation.ope.fqe import FQEConfig, fit_fqe_resampled

    data = replace(transitions, reward=phq9_fall(transitions))
    rng = np.random.default_rng(config.seed)
    # torch_threads 0: the run's own thread count (a joblib sweep's workers have one each); a
    # stacked ensemble is wide enough to use them, unlike a single small fit
    fqe = FQEConfig(iterations=config.horizon_weeks, updates_per_iteration=config.updates_per_iteration,
                    batch_size=config.batch_size, hidden=config.hidden, gamma=1.0, seed=config.seed, device="cpu",
                    torch_threads=0)
    # every refit in one stacked model; refit k: the k-th resample drawn from rng, seed + k
    with warnings.catch_warnings():
        # FQE warns when iterations < the longest episode: here that is the point (an H-week value)
        warnings.filterwarnings("ignore", message="FQE iterations", category=UserWarning)
        results = fit_fqe_resampled(policy, data, [(rng, replace(fqe, seed=config.seed + k))
                                                   for k in range(config.members)], progress=progress)
    tensors: dict[str, torch.Tensor] = {}
    spec: NetworkSpec | None = None
    for k, result in enumerate(results):
        spec = result.network.spec
        for key, value in result.network.state_dict().items():
            tensors[f"member{k}.{key}"] = value.detach().cpu()
    assert spec is not None
    entry = {"file": BENEFIT_FILE, "method": METHOD, "network": spec.to_dict(), **asdict(config),
             "hidden": list(config.hidden), "transitions": len(transitions)}
    return tensors, entry


@dataclass(frozen=True)
class Benefit:
    """Expected PHQ-9 change against "continue" over ``horizon_weeks``, per action: (n, A) arrays."""

    change: NDArray[np.float64]  # negative = PHQ-9 lower than when continuing = better
    lo: NDArray[np.float64]
    hi: NDArray[np.float64]
    level: float
    horizon_weeks: int
    method: str
    members: int


class BenefitModel:
    """The fitted ensemble, rebuilt from a bundle (hash-checked, no pickle)."""

    def __init__(self, networks: list[PolicyNetwork], entry: dict[str, Any]) -> None:
        self.networks = [n.eval() for n in networks]
        self.entry = entry
        self.level = float(entry["level"])
        self.horizon_weeks = int(entry["horizon_weeks"])
        k = len(networks)
        # normal interval on the bootstrap spread, widened for few members (Student t)
        self._t = float(stats.t.ppf(0.5 + self.level / 2, df=k - 1))

    @classmethod
    def from_bundle(cls, policy: BundlePolicy) -> BenefitModel:
        entry = policy.manifest.explain.get("benefit")
        if not isinstance(entry, dict):
            raise ValueError(f"policy {policy.name!r} has no benefit model: run 'carepath prepare' on its bundle")
        name = str(entry.get("file", BENEFIT_FILE))
        tensors = policy.extra_tensors(name)
        where = policy.path / MANIFEST if policy.path is not None else policy.name
        try:
            spec = NetworkSpec.from_dict(entry["network"])
        except (TypeError, ValueError, KeyError) as err:
            raise BundleError(f"{where}: field 'explain.benefit.network': {err}") from None
        if spec.n_in != N_FEATURES or spec.n_out != N_ACTIONS:
            raise BundleError(f"{where}: field 'explain.benefit.network': sizes do not match the features and actions")
        file_path = policy.path / name if policy.path is not None else Path(name)
        members = int(entry["members"])
        used = {key for key in tensors if any(key.startswith(f"member{k}.") for k in range(members))}
        if used != set(tensors):
            raise BundleError(f"{file_path}: tensors beyond the {members} members in bundle.json")
        networks = []
        for k in range(members):
            prefix = f"member{k}."
            member = {key[len(prefix):]: v for key, v in tensors.items() if key.startswith(prefix)}
            check_tensors(member, spec, file_path)
            network = PolicyNetwork(spec)
            network.load_state_dict(member)
            networks.append(network)
        return cls(networks, entry)

    @torch.no_grad()
    def predict(self, obs: NDArray[np.floating]) -> Benefit:
        x = torch.as_tensor(np.atleast_2d(np.asarray(obs, dtype=np.float32)))
        q = torch.stack([net(x) for net in self.networks]).double().numpy()  # (K, n, A): PHQ-9 fall
        fall_vs_continue = q - q[:, :, [int(Action.CONTINUE)]]
        change = -fall_vs_continue  # a fall in PHQ-9 is a negative change
        mean = change.mean(axis=0)
        half = self._t * change.std(axis=0, ddof=1)
        return Benefit(change=mean, lo=mean - half, hi=mean + half, level=self.level,
                       horizon_weeks=self.horizon_weeks, method=str(self.entry.get("method", METHOD)),
                       members=len(self.networks))
