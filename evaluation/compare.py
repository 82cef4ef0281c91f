"""Compare candidate policies on logged data: off-policy estimates, FQE, optional simulator truth, fairness.

One call does what a reviewer needs for each candidate policy::

    result = compare_policies(dataset, {"stard": make_baseline("stard"), "cql": load("runs/a/policy")})
    result.to_json()                          # plain JSON (NaN and inf become null)
    write_tensorboard(result, "tb/")          # ope/<estimator>/{value,lo,hi}, one subfolder per policy

Per policy: the policy's probabilities on every logged step are computed
once (one batched policy call); FQE is fitted once and its Q-function feeds DR
and WDR (``q_hat``); the importance-sampling estimators share their weights and
bootstrap resamples; every policy uses the same seed, so the resamples (and
the simulator's random numbers, for ground truth) are common to all policies
and differences between them are not resampling noise.

FQE's own interval is, by default, the percentile bootstrap of its
per-episode initial values: it ignores model error (see
:func:`evaluation.fairness.fqe_estimate`). ``fqe_refits=N`` refits FQE on N
bootstrap resamples of episodes and takes the interval from their spread,
which carries the Q-model's sampling and fitting error, at N more fits per
policy.

Cost: with FQE, about a minute per policy on a million transitions with the
default :class:`~evaluation.ope.fqe.FQEConfig`; without (``estimators`` free of
``fqe``, ``dr``, ``wdr``) a fraction of a second per policy on a few thousand
episodes. ``fairness`` repeats the estimators on every subgroup
(``n_boot`` resamples each), and ``truth_patients`` rolls the simulator out.
"""

from __future__ import annotations

import dataclasses
import re
import warnings as warnings_module
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from carepath.jsontypes import is_int
from evaluation.fairness import MIN_GROUP_EPISODES, Fairness, episode_groups, fairness_report, fqe_estimate
from evaluation.ope.estimators import ESTIMATORS, Estimate, estimate_all
from evaluation.ope.weights import target_probabilities

if TYPE_CHECKING:
    from envs.params import EnvSettings, SimParams
    from evaluation.ground_truth import GroundTruth
    from evaluation.ope.fqe import FQEConfig
    from offline_data.dataset import Episodes, LoggedDataset
    from policies.base import Policy

#: Every estimator ``compare_policies`` knows: the importance-sampling family, DR, WDR and FQE.
ALL_ESTIMATORS: tuple[str, ...] = (*ESTIMATORS, "fqe")
DEFAULT_ESTIMATORS: tuple[str, ...] = ("wis", "wpdis", "dr", "wdr", "fqe")
#: Estimators that need a fitted FQE.
NEEDS_FQE = frozenset({"dr", "wdr", "fqe"})
#: Two-sided intervals (the Hoeffding and Bernstein lower bounds need a weight clip and cover IS/PDIS only).
COMPARE_INTERVALS: tuple[str, ...] = ("bootstrap", "bca", "t")
#: The estimator that headlines plots and fairness gaps: the first of these that was computed.
HEADLINE_ORDER: tuple[str, ...] = ("wdr", "dr", "wpdis", "wis", "fqe", "pdis", "is")

FQE_REFIT_NOTE = ("FQE's interval is value +- t * sd of {n} FQE refits on bootstrap resamples of episodes: it carries "
                  "the Q-model's sampling and fitting error, not a bias every refit shares (extrapolation to "
                  "actions the log rarely took); DR and WDR use the full-data fit only as a control variate.")
FQE_INTERVAL_NOTE = ("FQE's interval is a percentile bootstrap of its per-episode initial values: it treats the "
                     "fitted Q-function as exact and ignores model (regression and extrapolation) error, so it "
                     "is too narrow; DR and WDR use FQE only as a control variate.")


def resolve_estimators(estimators: str | Iterable[str]) -> tuple[str, ...]:
    """``"all"``, a comma list or names -> validated names in :data:`ALL_ESTIMATORS` order, no repeats."""
    if isinstance(estimators, str):
        names = list(ALL_ESTIMATORS) if estimators.strip() == "all" else [
            n.strip() for n in estimators.split(",") if n.strip()]
    else:
        names = [str(n).strip() for n in estimators]
    if "all" in names:
        names = list(ALL_ESTIMATORS)
    unknown = [n for n in names if n not in ALL_ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimator(s) {', '.join(repr(n) for n in unknown)}; expected 'all' or some of "
                         f"{', '.join(ALL_ESTIMATORS)}")
    if not names:
        raise ValueError(f"no estimator given; expected 'all' or some of {', '.join(ALL_ESTIMATORS)}")
    return tuple(n for n in ALL_ESTIMATORS if n in names)


def headline_estimator(estimators: Sequence[str]) -> str:
    for name in HEADLINE_ORDER:
        if name in estimators:
            return name
    return estimators[0]


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class PolicyResult:
    """Everything measured about one candidate policy."""

    label: str  # unique among the compared policies (a baseline spec, a bundle name)
    name: str  # the policy's own name
    estimates: dict[str, Estimate]
    fqe: dict[str, Any] | None = None  # value, config, last loss, iterations
    truth: GroundTruth | None = None
    fairness: Fairness | None = None
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "name": self.name,
                "estimates": {k: e.as_dict() for k, e in self.estimates.items()},
                "fqe": self.fqe, "truth": None if self.truth is None else self.truth.as_dict(),
                "fairness": None if self.fairness is None else self.fairness.to_json(),
                "warnings": list(self.warnings)}


@dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare_policies`."""

    policies: list[PolicyResult]
    estimators: tuple[str, ...]
    interval: str
    level: float
    n_boot: int
    seed: int
    data: dict[str, Any]
    truth: dict[str, Any] | None = None  # patients, seed, settings used, notes
    notes: tuple[str, ...] = ()
    subgroup_columns: dict[str, list[str]] = field(default_factory=dict)
    fqe_refits: int = 0

    @property
    def headline(self) -> str:
        return headline_estimator(self.estimators)

    @property
    def fqe_interval(self) -> str | None:
        if "fqe" not in self.estimators:
            return None
        return "refit" if self.fqe_refits else "bootstrap"

    def policy(self, label: str) -> PolicyResult:
        for p in self.policies:
            if p.label == label:
                return p
        raise KeyError(f"no policy {label!r}; compared: {', '.join(p.label for p in self.policies)}")

    def to_json(self) -> dict[str, Any]:
        """Strict JSON: NaN and infinities become null."""
        payload = {"kind": "carepath-policy-comparison", "decision_support": True,
                   "estimators": list(self.estimators), "headline_estimator": self.headline,
                   "interval": self.interval, "fqe_interval": self.fqe_interval, "fqe_refits": self.fqe_refits,
                   "level": self.level, "n_boot": self.n_boot, "seed": self.seed, "data": self.data,
                   "truth": self.truth, "notes": list(self.notes), "subgroup_columns": self.subgroup_columns,
                   "policies": [p.to_json() for p in self.policies]}
        return json_safe(payload)


def json_safe(value: Any) -> Any:
    """Plain JSON types, non-finite floats as None (``json.dumps(..., allow_nan=False)`` accepts the result)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_safe(v) for v in value.tolist()]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    return str(value)


# ----------------------------------------------------------------------------- the simulator of the data


def _trained_on_fingerprint(policy: Any) -> str | None:
    """The simulator fingerprint a bundle's training data recorded (None for baselines or older bundles)."""
    manifest = getattr(policy, "manifest", None)
    simulator = manifest.data.get("simulator") if manifest is not None else None
    value = simulator.get("fingerprint") if isinstance(simulator, Mapping) else None
    return value if isinstance(value, str) else None


def truth_environment(metadata: Mapping[str, Any]) -> tuple[SimParams, EnvSettings, list[str]]:
    """Simulator parameters and settings recorded in a log's metadata (defaults where absent), and notes."""
    from envs.params import DEFAULT_PARAMS_PATH, EnvSettings, load_params
    from offline_data.schema import META_ENV_SETTINGS, META_SIM_PARAMS, META_SOURCE

    notes: list[str] = []
    if metadata.get(META_SOURCE) not in (None, "simulator"):
        notes.append(f"the data come from {metadata.get(META_SOURCE)!r}, not the simulator: the simulator's truth "
                     "describes simulated patients, which need not resemble these")
    recorded = metadata.get(META_ENV_SETTINGS)
    settings = EnvSettings()
    if isinstance(recorded, Mapping):
        try:
            settings = EnvSettings(**recorded)
        except (TypeError, ValueError) as err:
            notes.append(f"the data's recorded simulator settings cannot be used ({err}); default settings used")
    else:
        notes.append("the data record no simulator settings; default settings used")
    sim = metadata.get(META_SIM_PARAMS)
    params = None
    if isinstance(sim, Mapping):
        import hashlib

        shown = str(sim.get("path") or "")
        path = DEFAULT_PARAMS_PATH if shown in ("", "envs/params/default.yaml") else Path(shown)
        overrides = sim.get("overrides") or None
        if path.is_file():
            try:
                params = load_params(path, overrides)
            except (ValueError, FileNotFoundError) as err:
                notes.append(f"the data's simulator parameters ({shown}) cannot be loaded ({err}); defaults used")
            else:
                recorded_sha = sim.get("sha256")
                if recorded_sha and hashlib.sha256(path.read_bytes()).hexdigest() != recorded_sha:
                    notes.append(f"simulator parameter file {path} changed since the data were generated "
                                 "(sha256 differs): the truth may not describe the logged patients")
        else:
            notes.append(f"the data's simulator parameter file {shown} is not here; default parameters used")
    else:
        notes.append("the data record no simulator parameters; default parameters used")
    if params is None:
        params = load_params()
    return params, settings, notes


# ----------------------------------------------------------------------------- the comparison


def _unique_labels(policies: Sequence[Policy] | Mapping[str, Policy]) -> list[tuple[str, Policy]]:
    items = list(policies.items()) if isinstance(policies, Mapping) else [
        (str(getattr(p, "name", type(p).__name__)), p) for p in policies]
    if not items:
        raise ValueError("no policy to compare")
    out: list[tuple[str, Policy]] = []
    seen: dict[str, int] = {}
    for label, policy in items:
        count = seen.get(label, 0) + 1
        seen[label] = count
        out.append((label if count == 1 else f"{label}#{count}", policy))
    return out


def _data_summary(dataset: LoggedDataset | Episodes, episodes: Episodes) -> dict[str, Any]:
    from offline_data.dataset import LoggedDataset
    from offline_data.schema import META_BEHAVIOR_POLICY, META_SOURCE

    summary: dict[str, Any] = {"episodes": len(episodes), "steps": int(np.asarray(episodes.valid).sum()),
                               "patients": len(np.unique(np.asarray(episodes.patient_id).astype(str))),
                               "horizon": int(np.asarray(episodes.valid).shape[1])}
    if isinstance(dataset, LoggedDataset):
        summary.update({"source": dataset.source, "origin": dataset.metadata.get(META_SOURCE),
                        "behavior_policy": dataset.metadata.get(META_BEHAVIOR_POLICY),
                        "behavior_prob_estimated": dataset.behavior_prob_estimated})
    return summary


def compare_policies(
    dataset: LoggedDataset | Episodes,
    policies: Sequence[Policy] | Mapping[str, Policy],
    *,
    estimators: str | Iterable[str] = DEFAULT_ESTIMATORS,
    interval: str = "bootstrap",
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    fqe_config: FQEConfig | None = None,
    truth_patients: int = 0,
    fairness: bool = True,
    min_group_episodes: int = MIN_GROUP_EPISODES,
    clip: float | None = None,
    fqe_refits: int = 0,
    progress: bool = True,
) -> Comparison:
    """Estimate each policy's value on ``dataset`` with ``estimators`` (see the module docstring).

    Args:
        dataset: a :class:`~offline_data.dataset.LoggedDataset` (its metadata set the simulator
            for ground truth; its kept subgroup columns join the fairness tables) or padded
            :class:`~offline_data.dataset.Episodes`.
        policies: policies (labelled by name, repeats numbered) or a mapping label -> policy.
        estimators: ``"all"``, a comma list or names from :data:`ALL_ESTIMATORS`. ``dr`` and
            ``wdr`` fit FQE even when ``fqe`` itself is not asked for.
        interval: ``bootstrap`` (percentile), ``bca`` or ``t`` for the importance-sampling and DR
            estimators; FQE always gets a percentile bootstrap.
        level, n_boot, seed: interval level, bootstrap resamples and their seed (shared by all policies).
        fqe_config: FQE options (its ``gamma`` is used by every estimator).
        truth_patients: simulated patients per policy for ground truth (0: none), under the
            simulator settings and parameters recorded in the data when there are any.
        fairness: per-subgroup values and demographic parity of recommendations.
        min_group_episodes: subgroups with fewer episodes are flagged and left out of gaps.
        clip: cap on cumulative importance weights (None: none).
        fqe_refits: with ``fqe`` among the estimators, this many refits on bootstrap resamples give
            FQE's interval (0: the bootstrap of its initial values, which ignores model error).
        progress: progress bars (FQE, simulator).
    """
    from offline_data.dataset import LoggedDataset

    names = resolve_estimators(estimators)
    if interval not in COMPARE_INTERVALS:
        raise ValueError(f"unknown interval {interval!r}; expected one of {', '.join(COMPARE_INTERVALS)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")
    if interval in ("bootstrap", "bca") and n_boot < 2:
        raise ValueError(f"n_boot must be at least 2, got {n_boot}")
    if truth_patients < 0:
        raise ValueError(f"truth_patients must be 0 (no truth) or positive, got {truth_patients}")
    if not is_int(fqe_refits) or fqe_refits < 0 or fqe_refits == 1:
        raise ValueError(f"fqe_refits must be 0 (no refits) or an integer of at least 2, got {fqe_refits!r}")
    labelled = _unique_labels(policies)
    episodes = dataset.episodes() if isinstance(dataset, LoggedDataset) else dataset
    if len(episodes) < 2:
        raise ValueError(f"the data hold {len(episodes)} episode(s); comparing policies needs at least 2")
    metadata = dataset.metadata if isinstance(dataset, LoggedDataset) else {}
    groups = episode_groups(dataset) if fairness else None
    need_fqe = bool(NEEDS_FQE.intersection(names))
    ope_names = tuple(n for n in names if n != "fqe")
    gamma = 1.0
    if need_fqe:
        from evaluation.ope.fqe import FQEConfig, fit_fqe

        fqe_config = fqe_config if fqe_config is not None else FQEConfig()
        gamma = float(fqe_config.gamma)

    notes: list[str] = []
    if "fqe" in names:
        notes.append(FQE_REFIT_NOTE.format(n=fqe_refits) if fqe_refits else FQE_INTERVAL_NOTE)
    if isinstance(dataset, LoggedDataset) and dataset.behavior_prob_estimated:
        notes.append("the behaviour probabilities were estimated (imported data): every importance-weighted "
                     "estimate inherits that model's error")
    truth_info: dict[str, Any] | None = None
    truth_setup: tuple[SimParams, EnvSettings] | None = None
    if truth_patients > 0:
        params, settings, truth_notes = truth_environment(metadata)
        truth_setup = (params, settings)
        truth_info = {"patients": truth_patients, "seed": seed, "horizon": settings.horizon,
                      "settings": dataclasses.asdict(settings), "notes": truth_notes}
        if settings.horizon != episodes.valid.shape[1]:
            truth_notes.append(f"the simulator horizon ({settings.horizon} weeks) differs from the longest logged "
                               f"episode ({episodes.valid.shape[1]} steps): truth and estimates measure different "
                               "horizons")

    results: list[PolicyResult] = []
    for label, policy in tqdm(labelled, desc="policies", unit="policy", disable=not progress or len(labelled) < 2,
                              leave=False):
        policy_notes: list[str] = []
        if truth_setup is not None:
            trained_on = _trained_on_fingerprint(policy)
            if trained_on is not None and trained_on != truth_setup[0].fingerprint():
                assert truth_info is not None
                truth_info["notes"].append(
                    f"{label} was trained on other simulator parameters (fingerprint {trained_on[:12]}) than the "
                    f"truth uses ({truth_setup[0].fingerprint()[:12]}): its truth describes patients it never met")
        probs = target_probabilities(policy, episodes)
        q_hat: NDArray[np.float64] | None = None
        fqe_info: dict[str, Any] | None = None
        initial_values: NDArray[np.float64] | None = None
        if need_fqe:
            assert fqe_config is not None
            with warnings_module.catch_warnings(record=True) as caught:
                warnings_module.simplefilter("always")
                fitted = fit_fqe(policy, episodes, fqe_config, progress=progress)
            fqe_warnings = tuple(str(w.message) for w in caught)
            q_hat = fitted.q_hat(episodes)
            initial_values = fitted.initial_values
            fqe_info = {"value": fitted.value, "config": fqe_config.to_dict(), "warnings": list(fqe_warnings),
                        "last_loss": fitted.history[-1]["loss"] if fitted.history else None,
                        "iterations": len(fitted.history)}
        estimates: dict[str, Estimate] = {}
        if ope_names:
            estimates.update(estimate_all(episodes, probs, names=ope_names,
                                          q_hat=q_hat if NEEDS_FQE.intersection(ope_names) else None, gamma=gamma,
                                          clip=clip, interval=interval, level=level, n_boot=n_boot, seed=seed))
        if "fqe" in names:
            assert initial_values is not None and fqe_info is not None
            extra = tuple(fqe_info["warnings"])
            first = next(iter(estimates.values()), None)
            overlap = first.identifiable if first is not None else True
            if not overlap:
                extra += ("no logged episode has a non-zero importance weight under this policy: FQE's value "
                          "extrapolates beyond the logged actions",)
            refits = None
            if fqe_refits:
                from evaluation.ope.fqe import refit_values

                assert fqe_config is not None
                refits = refit_values(policy, episodes, fqe_config, fqe_refits, seed=seed, progress=progress)
                fqe_info["refit_values"] = refits.tolist()
            estimates["fqe"] = fqe_estimate(initial_values, interval=interval, level=level, n_boot=n_boot,
                                            seed=seed, warnings=extra, refits=refits)
        estimates = {n: estimates[n] for n in names}
        for name, est in estimates.items():
            if not est.identifiable:
                policy_notes.append(f"{name}: not identifiable ({est.reason})")
        truth = None
        if truth_setup is not None:
            from evaluation.ground_truth import rollout

            truth = rollout(policy, truth_patients, seed=seed, params=truth_setup[0], settings=truth_setup[1],
                            progress=progress)
        fair = None
        if groups is not None:
            fair = fairness_report(episodes, probs, groups, estimators=names, q_hat=q_hat,
                                   fqe_initial_values=initial_values, interval=interval, level=level, n_boot=n_boot,
                                   seed=seed, gamma=gamma, clip=clip, min_episodes=min_group_episodes,
                                   policy=label)
            policy_notes.extend(fair.parity.warnings)
        results.append(PolicyResult(label, str(getattr(policy, "name", type(policy).__name__)), estimates,
                                    fqe_info, truth, fair, tuple(policy_notes)))
    return Comparison(results, names, interval, level, n_boot, seed, _data_summary(dataset, episodes), truth_info,
                      tuple(notes), {c: list(o) for c, o in groups.order.items()} if groups is not None else {},
                      fqe_refits if "fqe" in names else 0)


# ----------------------------------------------------------------------------- TensorBoard


def scalars(result: Comparison) -> dict[str, dict[str, float]]:
    """Per policy label, TensorBoard tag -> value: ``ope/<estimator>/{value,lo,hi}`` (identifiable estimates
    only; ``lo``/``hi`` when there is an interval), ``eval/{value,remission}[_lo,_hi]`` with ground truth,
    ``fairness/value_gap/<column>`` (headline estimator) and ``fairness/digital_share/{no_access,access}``."""
    out: dict[str, dict[str, float]] = {}
    headline = result.headline
    for p in result.policies:
        tags: dict[str, float] = {}
        for name, est in p.estimates.items():
            if not est.identifiable or not np.isfinite(est.value):
                continue
            tags[f"ope/{name}/value"] = float(est.value)
            if est.low is not None and est.high is not None and np.isfinite(est.low) and np.isfinite(est.high):
                tags[f"ope/{name}/lo"] = float(est.low)
                tags[f"ope/{name}/hi"] = float(est.high)
        if p.truth is not None:
            for metric in ("value", "remission"):
                interval = getattr(p.truth, metric)
                tags[f"eval/{metric}"] = float(interval.value)
                tags[f"eval/{metric}_lo"] = float(interval.low)
                tags[f"eval/{metric}_hi"] = float(interval.high)
        if p.fairness is not None:
            if p.fairness.values is not None:
                for gap in p.fairness.values.gaps:
                    if gap.estimator == headline and gap.gap is not None:
                        tags[f"fairness/value_gap/{gap.column}"] = float(gap.gap)
            digital = p.fairness.parity.digital
            if digital.no_access is not None:
                tags["fairness/digital_share/no_access"] = float(digital.no_access)
            if digital.access is not None:
                tags["fairness/digital_share/access"] = float(digital.access)
        out[p.label] = tags
    return out


def add_scalars(writer: Any, result: Comparison, policy: str, step: int = 0) -> None:
    """Write one policy's :func:`scalars` to an open ``SummaryWriter`` (e.g. a training run's own) at ``step``."""
    for tag, value in scalars(result)[policy].items():
        writer.add_scalar(tag, value, step)


def safe_folder_name(label: str) -> str:
    """A policy label as a folder name: letters, digits, ``.``, ``_``, ``-`` and ``=``; others become ``_``."""
    name = re.sub(r"[^A-Za-z0-9._=-]+", "_", label).strip("._") or "policy"
    return name[:100]


def write_tensorboard(result: Comparison, logdir: str | Path, step: int = 0) -> dict[str, Path]:
    """TensorBoard scalars of every policy, one subfolder per policy (so the tags are the same in each and
    TensorBoard overlays the policies as runs). Returns label -> folder."""
    from torch.utils.tensorboard import SummaryWriter

    root = Path(logdir)
    folders: dict[str, Path] = {}
    used: set[str] = set()
    for label, tags in scalars(result).items():
        base = safe_folder_name(label)
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        folder = root / name
        writer = SummaryWriter(log_dir=str(folder))
        try:
            for tag, value in tags.items():
                writer.add_scalar(tag, value, step)
        finally:
            writer.close()
        folders[label] = folder
    return folders


__all__ = ["ALL_ESTIMATORS", "COMPARE_INTERVALS", "DEFAULT_ESTIMATORS", "FQE_INTERVAL_NOTE", "FQE_REFIT_NOTE",
           "Comparison", "PolicyResult", "add_scalars", "compare_policies", "headline_estimator", "json_safe",
           "resolve_estimators", "safe_folder_name", "scalars", "truth_environment", "write_tensorboard"]
