"""Certified policy improvement: the gate between training and serving.

The protocol is high-confidence policy improvement (HCPI; Thomas, Theocharous
& Ghavamzadeh 2015, ICML): the logged patients that did not train the policy
are split, by patient and seeded, in two.

1. **Candidate selection** on the first part: every member of the candidate
   families (:mod:`policies.candidates`: mixtures with current care, SPIBB,
   prefixes that change only the first weeks of care) is scored by the lower
   bound it is predicted to reach on the second part, and the best one is
   chosen. Not eligible: a candidate whose weights leave fewer than
   ``min_ess`` effective episodes, or that fails a critical guideline vignette.
   Each candidate is scored twice: with trajectory importance sampling
   (weights capped) and with a doubly robust difference whose outcome model is
   fitted on the first part (:mod:`evaluation.certify.doubly_robust`); the
   estimator is chosen with the candidate, so the safety test still tests one.
2. **Safety test** on the second part, of that one candidate only: a
   high-confidence lower bound on its improvement over current care in
   remission (percentage points) and in the reward the agent optimised, paired
   by episode (:mod:`evaluation.certify.bounds`). The candidate's first-choice
   policy (what happens if clinicians always take the first-ranked step) is
   tested too. Every bound is stated at ``confidence``. The two claims the
   certificate makes are tested in a fixed sequence (Maurer, Hothorn &
   Lehmacher 1995, "Multiple comparisons in drug clinical trials and
   preclinical assays: a-priori ordered hypotheses"): the candidate improves
   remission; then, only if it does, its first-choice policy improves
   remission too. A fixed sequence keeps the familywise error at
   ``1 - confidence`` without splitting it, so the primary test keeps its full
   power (a Bonferroni split over four bounds cost a change at intake its
   certificate). The reward bounds are stated beside them, each at
   ``confidence`` on its own.

Certified when the candidate's remission bound is above 0 and no critical
guideline vignette fails; otherwise "not certified: keep current care".

Remission is read from the log as a clinician would: the patient is still in
care at the end of the logged episode and the last observed PHQ-9 is below 5
(Kroenke 2001); leaving care counts as no remission, as in STAR*D.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from envs.spec import FEATURE_INDEX, SUBGROUP_FEATURES
from evaluation.certify.bounds import (
    METHODS,
    PairedBound,
    SelectionScore,
    lower_bound,
    paired_bound,
    paired_differences,
    selection_score,
)
from evaluation.certify.doubly_robust import OutcomeModel, dr_differences
from evaluation.ope.weights import target_probabilities
from offline_data.behavior import fit_behaviour_model
from offline_data.dataset import Episodes, LoggedDataset, split_by_patient
from policies.base import Policy
from policies.behaviour_model import BehaviourModel
from policies.bundle import BEHAVIOUR_FILE, BundlePolicy, update_bundle
from policies.candidates import Candidate, CandidatePolicy, FirstChoicePolicy, candidate_grid

F64 = NDArray[np.float64]
REMISSION_BELOW = 5.0  # PHQ-9 < 5 (Kroenke 2001)
#: A bound must clear 0 by more than rounding: a candidate equal to current care has ratios of 1
#: up to float32 round-off of the logged probabilities, and must not certify on that.
MIN_CERTIFIED_BOUND = 1e-6
METHODS_HELP = ("bound of the safety test: 't' (one-sided Student t, HCPI's choice: tight, trusts the central "
                "limit theorem) or 'bernstein' (empirical Bernstein: exact for remission, looser)")


@dataclass(frozen=True)
class CertifyConfig:
    """How a policy is certified. The defaults are HCPI's with a 50/50 split."""

    confidence: float = 0.95
    split: float = 0.5  # share of the certification patients that choose the candidate
    seed: int = 0
    method: str = "t"  # bound of the safety test: t or bernstein
    weights: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)  # mixture weights of the trained policy
    thresholds: tuple[float, ...] = (0.02, 0.05, 0.1)  # SPIBB: behaviour probabilities treated as too rare
    prefix_weeks: tuple[int, ...] = (1, 2, 4)  # prefix: weeks of care from intake the trained policy decides
    # a candidate whose importance weights leave fewer effective episodes than this on the selection
    # part is not chosen: a Student t bound trusts the central limit theorem, which a handful of
    # heavy weights does not obey (a 50 % mixture over 26 weeks: an effective sample of about 25)
    min_ess: float = 100.0
    truncations: tuple[float, ...] = (5.0, 20.0, 100.0)  # importance-weight caps tried per candidate
    # also bound each candidate with the doubly robust difference (Student t only: its terms have no range)
    doubly_robust: bool = True
    min_patients: int = 100  # on either side of the split

    def __post_init__(self) -> None:
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if not 0.0 < self.split < 1.0:
            raise ValueError(f"split must be in (0, 1) (the share of patients that choose the candidate), "
                             f"got {self.split}")
        if self.method not in METHODS:
            raise ValueError(f"bound method must be one of {METHODS}, got {self.method!r}")
        if not self.weights and not self.thresholds and not self.prefix_weeks:
            raise ValueError("no candidates: give at least one mixture weight, SPIBB threshold or prefix length")
        if not self.truncations:
            raise ValueError("give at least one weight truncation")
        if not self.min_ess >= 0:
            raise ValueError(f"minimum effective sample size must be >= 0, got {self.min_ess}")


@dataclass(frozen=True)
class Certificate:
    """What the logged data can vouch for. ``lower_bound`` and ``improvement`` are in
    percentage points of remission; ``reward_*`` in the reward's units."""

    certified: bool
    confidence: float
    method: str
    estimator: str
    lower_bound: float
    improvement: float
    reward_lower_bound: float
    reward_improvement: float
    behaviour_value: dict[str, float]  # remission (%) and reward of current care on the safety part
    episodes: dict[str, int]  # candidate / safety episodes
    candidate: dict[str, Any]
    first_choice: dict[str, Any]
    data_sha256: str
    behaviour_probabilities: str  # "logged" or "estimated"
    behaviour_model: dict[str, Any]  # what the candidate mixes with: a known baseline or a fitted model
    reasons: list[str]
    subgroups: list[dict[str, Any]] = field(default_factory=list)
    selection: list[dict[str, Any]] = field(default_factory=list)
    vignettes: dict[str, Any] | None = None
    created: str = ""
    id: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One sentence for a clinician."""
        if self.certified:
            return (f"Certified against current care at {100 * self.confidence:.0f} % confidence: remission at least "
                    f"{self.lower_bound:+.1f} percentage points (estimate {self.improvement:+.1f}), from "
                    f"{self.episodes['safety']:,} logged patients it was not trained or selected on.")
        return ("Not certified: the logged data cannot show that this policy does better than current care "
                f"(remission bound {self.lower_bound:+.1f} percentage points at {100 * self.confidence:.0f} % "
                "confidence); keep current care.")


def remission_outcome(episodes: Episodes) -> F64:
    """1 when the patient is still in care at the end of the episode with a last observed PHQ-9 below 5."""
    last = np.maximum(episodes.lengths - 1, 0)
    rows = np.arange(len(last))
    phq9 = episodes.obs[rows, last, FEATURE_INDEX["phq9"]]
    left = (episodes.terminated & episodes.valid).any(axis=1)
    return ((phq9 < REMISSION_BELOW) & ~left & (episodes.lengths > 0)).astype(np.float64)


def episode_returns(episodes: Episodes) -> F64:
    return np.where(episodes.valid, episodes.reward, 0.0).sum(axis=1).astype(np.float64)


def trajectory_weights(probs: F64, episodes: Episodes) -> F64:
    """``prod_t pi_c(a_t | s_t) / pi_b(a_t | s_t)`` over each episode's logged steps (in log space)."""
    chosen = np.take_along_axis(probs, episodes.action[..., None], axis=2)[..., 0]
    with np.errstate(divide="ignore"):
        log_ratio = np.log(chosen) - np.log(episodes.behavior_prob.astype(np.float64))
    log_ratio = np.where(episodes.valid, log_ratio, 0.0)
    return np.exp(np.minimum(log_ratio.sum(axis=1), 700.0))


def dataset_sha256(dataset: LoggedDataset) -> str:
    """A content hash of the logged rows (independent of file format and row storage)."""
    f = dataset.frame
    digest = hashlib.sha256()
    for array in (f.obs, f.action, f.reward, f.behavior_prob, f.t, f.episode_id):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update("\n".join(map(str, f.patient_ids[f.patient_code])).encode())
    return digest.hexdigest()


class LoggedPart:
    """One part of the certification patients, with both policies' probabilities computed once."""

    def __init__(self, dataset: LoggedDataset, policy: Policy, behaviour: Policy) -> None:
        self.episodes = dataset.episodes()
        self.trained = target_probabilities(policy, self.episodes)
        self.current = target_probabilities(behaviour, self.episodes)
        self.remission = remission_outcome(self.episodes)
        self.returns = episode_returns(self.episodes)

    def __len__(self) -> int:
        return len(self.episodes)

    def probs(self, candidate: Candidate) -> F64:
        """The candidate's probabilities on every logged step (as served: ``Candidate.combine``)."""
        valid = self.episodes.valid
        out = np.zeros_like(self.trained)
        out[valid] = candidate.combine(self.trained[valid], self.current[valid], self.episodes.mask[valid],
                                       self.episodes.obs[valid])
        return out

    def is_current_care(self, probs: F64) -> bool:
        """Whether ``probs`` are current care's on every logged step: then the improvement is exactly
        0, and a doubly robust difference (whose control terms have mean 0 but not value 0) must not
        turn that into noise a bound could certify."""
        valid = self.episodes.valid
        return bool(np.allclose(probs[valid], self.current[valid], rtol=0.0, atol=1e-9))

    def first_choice_probs(self, candidate_policy: CandidatePolicy) -> F64:
        return target_probabilities(first_choice_policy(candidate_policy), self.episodes)


def first_choice_policy(candidate_policy: CandidatePolicy) -> Policy:
    """What happens if clinicians always take the first-ranked step where the candidate departs from
    current care. A prefix departs only in its first weeks: after them the page ranks current care's
    steps, and what clinicians do then is current care, whatever its first-ranked step."""
    if candidate_policy.candidate.family == "prefix":
        return CandidatePolicy(FirstChoicePolicy(candidate_policy.policy), candidate_policy.behaviour,
                               candidate_policy.candidate)
    return FirstChoicePolicy(candidate_policy)


@dataclass(frozen=True)
class Certification:
    """The certificate, the chosen candidate as a policy, and the behaviour model it mixes with."""

    certificate: Certificate
    policy: CandidatePolicy
    behaviour: Policy


def certify(
    policy: Policy,
    dataset: LoggedDataset,
    behaviour: Policy | None = None,
    config: CertifyConfig | None = None,
    *,
    critical_vignettes: Callable[[Policy], Mapping[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Certification:
    """Certify ``policy`` on ``dataset`` (patients it was not trained on) against current care.

    ``behaviour`` is the estimated behaviour policy the candidates mix with; without one it
    is fitted (:func:`offline_data.behavior.fit_behaviour_model`) on the candidate part only,
    so that the candidates never depend on the safety part. ``critical_vignettes`` scores the
    chosen candidate on the guideline vignettes (a dict with ``critical_failures``).
    """
    config = config or CertifyConfig()
    say = progress or (lambda _: None)
    parts = split_by_patient(dataset, {"candidate": config.split, "safety": 1.0 - config.split}, seed=config.seed)
    for name, part in parts.items():
        if part.n_patients < config.min_patients:
            raise ValueError(f"the {config.split:g} split leaves {part.n_patients} patients on the {name} side, "
                             f"fewer than {config.min_patients}: certify on more logged patients or change --split")
    behaviour_spec: dict[str, Any] = {"kind": "given", "name": getattr(behaviour, "name", "behaviour")}
    if behaviour is None:
        known = logging_policy(dataset)
        if known is not None:
            behaviour, behaviour_spec = known
            say(f"current care: the logging policy the log records ({behaviour.name})")
        else:
            say(f"fitting the behaviour model on the {parts['candidate'].n_patients:,} candidate-selection patients")
            f = parts["candidate"].frame
            fitted: Policy = fit_behaviour_model(f.obs, f.allowed, f.action, seed=config.seed)[0]
            behaviour = fitted
            behaviour_spec = {"kind": "fitted", "patients": parts["candidate"].n_patients}
    say(f"candidate selection on {parts['candidate'].n_patients:,} patients")
    choose = LoggedPart(parts["candidate"], policy, behaviour)
    test = LoggedPart(parts["safety"], policy, behaviour)
    level = config.confidence

    use_dr = config.doubly_robust and config.method == "t"
    q_choose = q_test = None
    if use_dr:  # the outcome model sees the selection half only
        outcome = OutcomeModel(choose.episodes, choose.remission, seed=config.seed)
        q_choose, q_test = outcome.predict_all(choose.episodes), outcome.predict_all(test.episodes)
    # a candidate that fails a critical guideline vignette would be refused whatever the data say;
    # the vignettes are textbook cases, not logged patients, so checking them here spends no data
    blocked: dict[tuple[Any, ...], bool] = {}

    def fails_vignettes(candidate: Candidate) -> bool:
        key = (candidate.family, candidate.weight, candidate.threshold, candidate.weeks)
        if critical_vignettes is None:
            return False
        if key not in blocked:
            check = critical_vignettes(CandidatePolicy(policy, behaviour, candidate))
            blocked[key] = bool(check.get("critical_failures"))
        return blocked[key]

    scored: list[tuple[Candidate, SelectionScore, bool]] = []
    for candidate in candidate_grid(config.weights, config.thresholds, config.truncations, use_dr,
                                    config.prefix_weeks):
        d, rho = candidate_differences(candidate, choose, q_choose)
        eligible = kish_ess(rho) >= config.min_ess and not fails_vignettes(candidate)
        scored.append((candidate, selection_score(d, level, len(test)), eligible))
    # the eligible candidate likeliest to pass; among equals the one closest to current care, then
    # the simpler estimator (with none eligible, the one closest to current care, reported, never certified)
    chosen, best, chosen_eligible = max(scored, key=lambda c: (
        c[2], round(c[1].pass_probability, 9) if c[2] else 0.0, round(c[1].predicted_bound, 12) if c[2] else 0.0,
        -c[0].weight, c[0].threshold, -c[0].weeks, c[0].estimator == "is", -c[0].truncation))
    say(f"safety test of {chosen.describe()} on {parts['safety'].n_patients:,} patients")

    candidate_policy = CandidatePolicy(policy, behaviour, chosen)
    floor = float(choose.returns.min())
    ceiling = float(choose.returns.max())

    cap = weight_cap(chosen)

    def bounds(probs: F64) -> tuple[PairedBound, PairedBound]:
        rho = trajectory_weights(probs, test.episodes)
        remission = remission_bound(test, probs, rho, chosen, q_test, config.method, level)
        reward = paired_bound(rho, test.returns, floor=floor, ceiling=ceiling, truncation=cap,
                              method=config.method, confidence=level)
        return remission, reward

    chosen_probs = test.probs(chosen)
    remission, reward = bounds(chosen_probs)
    first_remission, first_reward = bounds(test.first_choice_probs(candidate_policy))

    vignettes = dict(critical_vignettes(candidate_policy)) if critical_vignettes is not None else None
    critical_failures = list(vignettes.get("critical_failures", [])) if vignettes else []
    reasons = []
    if not chosen_eligible:
        reasons.append(f"no candidate was eligible (every one left fewer than {config.min_ess:g} effective "
                       "episodes or failed a critical vignette)")
    if remission.lower_bound <= MIN_CERTIFIED_BOUND:
        reasons.append(f"remission lower bound {100 * remission.lower_bound:+.2f} pp is not above 0")
    if critical_failures:
        reasons.append(f"critical guideline vignette(s) failed: {', '.join(map(str, critical_failures))}")
    certified = not reasons
    logged = ("behaviour probabilities estimated by carepath data import: the bound assumes the estimate is right"
              if dataset.behavior_prob_estimated else "behaviour probabilities as logged")
    estimator = (f"trajectory importance sampling, paired by episode, weights truncated at {chosen.truncation:g}; "
                 f"{logged}")
    if chosen.estimator == "dr":
        estimator = ("remission: doubly robust paired difference (Jiang & Li 2016) with an outcome model fitted on "
                     "the selection half; reward: trajectory importance sampling, paired by episode; weights "
                     f"uncapped; {logged}")
    method = (f"HCPI: candidate chosen on {len(choose):,} episodes as the likeliest to pass (effective sample >= "
              f"{config.min_ess:g}, no critical vignette failed), safety test on {len(test):,} "
              f"other episodes; one-sided {'Student t' if config.method == 't' else 'empirical Bernstein'} bound; "
              f"every bound at {100 * level:g} %; fixed-sequence testing (candidate remission, then first-choice "
              "remission only if the candidate's holds) keeps both claims together at that confidence")
    if config.method == "bernstein":
        method += f"; reward range assumed [{floor:.3g}, {ceiling:.3g}] (seen on the candidate part)"
    certificate = Certificate(
        certified=certified,
        confidence=config.confidence,
        method=method,
        estimator=estimator,
        lower_bound=100 * remission.lower_bound,
        improvement=100 * remission.improvement,
        reward_lower_bound=reward.lower_bound,
        reward_improvement=reward.improvement,
        behaviour_value={"remission": 100 * remission.behaviour_value, "reward": reward.behaviour_value + floor},
        episodes={"candidate": len(choose), "safety": len(test)},
        candidate={**chosen.as_dict(), "description": chosen.describe(),
                   "predicted_lower_bound": 100 * best.predicted_bound, "pass_probability": best.pass_probability,
                   "ess": remission.ess, "truncated_share": remission.truncated_share},
        # second in the fixed sequence: claimed only when the candidate's own test passed
        first_choice={"certified": bool(certified and first_remission.lower_bound > MIN_CERTIFIED_BOUND),
                      "lower_bound": 100 * first_remission.lower_bound,
                      "improvement": 100 * first_remission.improvement,
                      "reward_lower_bound": first_reward.lower_bound, "ess": first_remission.ess,
                      "statement": _first_choice_statement(first_remission, certified, chosen)},
        data_sha256=dataset_sha256(dataset),
        behaviour_probabilities="estimated" if dataset.behavior_prob_estimated else "logged",
        behaviour_model=behaviour_spec,
        reasons=reasons,
        subgroups=_subgroups(test, trajectory_weights(chosen_probs, test.episodes), cap, config.method,
                             config.confidence),
        # not eligible: too few effective episodes for the t bound, or a critical vignette failed
        selection=[{**c.as_dict(), "predicted_lower_bound": 100 * sc.predicted_bound,
                    "pass_probability": sc.pass_probability, "eligible": ok} for c, sc, ok in scored],
        vignettes=vignettes,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return Certification(_replace(certificate, id=_certificate_id(certificate)), candidate_policy, behaviour)


def store_certificate(bundle_path: Path, certification: Certification, record: Mapping[str, Any],
                      out: Path | None = None) -> BundlePolicy:
    """Write ``record`` (the certificate and where it came from) into the bundle, with the fitted
    behaviour model the candidate mixes with when it is one; ``out``: a new bundle there instead."""
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    if isinstance(certification.behaviour, BehaviourModel):
        tensors[BEHAVIOUR_FILE] = {k: torch.as_tensor(np.ascontiguousarray(v))
                                   for k, v in certification.behaviour.to_tensors().items()}
    return update_bundle(bundle_path, certificate=dict(record), extra_tensors=tensors, out=out)


def candidate_differences(candidate: Candidate, part: LoggedPart, q_all: F64 | None) -> tuple[F64, F64]:
    """Per-episode paired differences in remission under the candidate's estimator on ``part``, and
    the importance weights they rest on (capped as the estimator caps them)."""
    probs = part.probs(candidate)
    rho = trajectory_weights(probs, part.episodes)
    if part.is_current_care(probs):
        return np.zeros(len(rho)), np.ones(len(rho))
    if candidate.estimator == "dr":
        if q_all is None:
            raise ValueError("a doubly robust candidate needs the outcome model's predictions")
        return dr_differences(probs, part.episodes, part.remission, q_all), rho
    return paired_differences(rho, part.remission, 0.0, candidate.truncation), np.minimum(rho, candidate.truncation)


def weight_cap(candidate: Candidate) -> float:
    """The importance-weight cap of the candidate's bounds. The doubly robust estimator needs exact
    weights, so its candidate's other bounds (reward, first choice) use uncapped weights too: a cap
    far below the weights a change at intake brings (about 50) would bias them far down."""
    return candidate.truncation if candidate.estimator == "is" else math.inf


def remission_bound(part: LoggedPart, probs: F64, rho: F64, candidate: Candidate, q_all: F64 | None, method: str,
                    confidence: float) -> PairedBound:
    """The safety test's remission bound for ``probs`` (the candidate's or its first choice's, with
    trajectory weights ``rho``) under the candidate's estimator. Probabilities that are current care's
    on every step get the importance-sampling difference, exactly 0, never the doubly robust one."""
    if candidate.estimator == "dr" and not part.is_current_care(probs):
        if q_all is None:
            raise ValueError("a doubly robust candidate needs the outcome model's predictions")
        return dr_bound(dr_differences(probs, part.episodes, part.remission, q_all), part.remission, rho, confidence)
    return paired_bound(rho, part.remission, floor=0.0, ceiling=1.0, truncation=weight_cap(candidate), method=method,
                        confidence=confidence)


def kish_ess(rho: F64) -> float:
    """Kish's effective sample size of importance weights: ``(sum w)^2 / sum w^2``."""
    return float(rho.sum() ** 2 / max(float((rho * rho).sum()), 1e-300))


def dr_bound(d: F64, outcome: F64, rho: F64, confidence: float) -> PairedBound:
    """The doubly robust difference's point estimate and one-sided t bound, as a :class:`PairedBound`."""
    behaviour = float(np.mean(outcome))
    improvement = float(np.mean(d))
    return PairedBound(improvement, lower_bound(d, "t", confidence, (-np.inf, np.inf)), behaviour,
                       behaviour + improvement, kish_ess(rho), 0.0, len(d))


def logging_policy(dataset: LoggedDataset) -> tuple[Policy, dict[str, Any]] | None:
    """The policy that logged the data, when the log names a baseline and its probabilities were
    logged, not estimated (simulated logs): then current care is known exactly, and a fitted model
    of it, wrong by a little at every one of 26 weekly steps, would not stand in for it."""
    from offline_data.schema import META_BEHAVIOR_POLICY
    from policies.baselines import BASELINES, make_baseline

    logged = dataset.metadata.get(META_BEHAVIOR_POLICY)
    if dataset.behavior_prob_estimated or not isinstance(logged, dict) or logged.get("name") not in BASELINES:
        return None
    try:
        epsilon = float(logged.get("epsilon", 0.0))
    except (TypeError, ValueError):
        return None
    return make_baseline(str(logged["name"]), epsilon), {"kind": "baseline", "name": str(logged["name"]),
                                                          "epsilon": epsilon}


def _first_choice_statement(bound: PairedBound, certified: bool, chosen: Candidate) -> str:
    if not certified:
        return ("not tested: the first-ranked step is tested only once the candidate itself is certified "
                f"(its remission bound alone: {100 * bound.lower_bound:+.1f} pp)")
    if bound.lower_bound > MIN_CERTIFIED_BOUND:
        span = "week" if chosen.weeks == 1 else f"{chosen.weeks} weeks"
        when = f" in the first {span} of care" if chosen.family == "prefix" else ""
        return (f"also certified if clinicians always take the first-ranked step{when} "
                f"(remission bound {100 * bound.lower_bound:+.1f} pp)")
    text = ("not covered: if clinicians always take the first-ranked step, the logged data cannot vouch for it "
            f"(remission bound {100 * bound.lower_bound:+.1f} pp)")
    if certified:
        text += "; the certificate covers choosing among the ranked steps as the policy's probabilities weigh them"
    return text


def _subgroups(split: LoggedPart, rho: F64, truncation: float, method: str,
               confidence: float) -> list[dict[str, Any]]:
    """The safety test per subgroup (sex, age band, digital access at intake), from the chosen candidate's
    trajectory weights ``rho``: descriptive, each at the stated confidence without a multiplicity correction."""
    first = split.episodes.obs[:, 0, :]
    out = []
    for feature in SUBGROUP_FEATURES:
        values = first[:, FEATURE_INDEX[feature]]
        for value in np.unique(values):
            rows = values == value
            if rows.sum() < 2:
                continue
            b = paired_bound(rho[rows], split.remission[rows], floor=0.0, ceiling=1.0, truncation=truncation,
                             method=method, confidence=confidence)
            out.append({"feature": feature, "value": float(value), "episodes": int(rows.sum()),
                        "improvement": 100 * b.improvement, "lower_bound": 100 * b.lower_bound,
                        "behaviour_remission": 100 * b.behaviour_value})
    return out


def _replace(cert: Certificate, **changes: Any) -> Certificate:
    return Certificate(**{**asdict(cert), **changes})


def _certificate_id(cert: Certificate) -> str:
    body = {k: v for k, v in cert.as_dict().items() if k not in ("id",)}
    text = json.dumps(body, sort_keys=True, default=_jsonable)
    return "cert-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


__all__ = [
    "Certificate",
    "Certification",
    "CertifyConfig",
    "candidate_differences",
    "certify",
    "dataset_sha256",
    "episode_returns",
    "kish_ess",
    "remission_bound",
    "remission_outcome",
    "store_certificate",
    "trajectory_weights",
]
