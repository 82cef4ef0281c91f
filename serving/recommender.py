"""The recommender: a patient's state and a policy bundle -> ranked, explained next steps.

For every action it computes the policy's score, drops what the clinical rules
block (:func:`envs.rules.action_mask`: with item 9 >= 2 only referral is left,
and it is marked critical), ranks the rest by the policy's probability and then
its score, and adds the expected PHQ-9 change against "continue" with an
interval (:mod:`serving.benefit`) and the SHAP rationale (:mod:`serving.explain`).
A blocked action never reaches the suggestions: that is checked here a second
time, after ranking, because it is the one promise serving must keep.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from carepath.jsontypes import is_int, is_number
from envs.rules import RULES, action_mask, blocking_rules
from envs.spec import (
    ACTION_CARE_CLASS,
    ACTION_LABELS,
    ACTION_NAMES,
    FEATURE_BOUNDS,
    FEATURE_INDEX,
    FEATURE_NAMES,
    Action,
)
from policies.bundle import MANIFEST, BundleError, BundlePolicy, load
from serving.benefit import BENEFIT_ENTRY_KEYS, BenefitModel
from serving.explain import BackgroundExplainer, Explainer, NetworkExplainer
from serving.patient import build_observation
from serving.schemas import (
    BenefitEstimate,
    BlockedAction,
    BlockingRule,
    Certification,
    Contribution,
    ImputedFeature,
    PolicyInfo,
    Rationale,
    Recommendation,
    Suggestion,
)

TOP_CONTRIBUTIONS = 5
_CRITICAL_RULE = next(rule for rule in RULES if rule.critical)
UNCERTAINTY = (
    "Benefit intervals come from refitting the benefit model on resampled patients; they assume the logged care "
    "tried each step in patients like this one. Treat a wide interval as 'not known', and a step the logged care "
    "rarely took as less certain than its interval says."
)


class NotPrepared(ValueError):
    """The bundle lacks what serving needs (background, medians, benefit model)."""


def check_prepared(policy: BundlePolicy) -> None:
    """NotPrepared unless the bundle holds what serving needs, each part well formed."""
    explain = policy.manifest.explain
    missing = [key for key in ("background", "feature_medians", "benefit") if key not in explain]
    if missing:
        where = policy.path or policy.name
        raise NotPrepared(f"policy bundle {where} is not prepared for serving (no {', '.join(missing)}): "
                          f"run 'carepath prepare --policy {where} --data LOGGED.parquet'")
    check_serving_section(explain, policy.path / MANIFEST if policy.path else policy.name)


#: The rationale's explainers (``Recommender(explainer=...)``, ``carepath serve --explainer``), as each
#: answer names its method.
ExplainerName = Literal["deep", "permutation"]
EXPLAINERS: dict[str, str] = {
    "deep": "SHAP DeepExplainer values (DeepLIFT rescale rule) through the policy network against {k} "
            "k-means background points; values add up to score minus base value",
    "permutation": "SHAP permutation explainer against {k} k-means background points; values add up to score "
                   "minus base value",
}


class Recommender:
    """Load a bundle once (checked), build and warm the explainer, then answer requests."""

    def __init__(self, bundle: str | Path | BundlePolicy, *, warm: bool | Literal["background"] = True,
                 permutations: int = 1, explainer: ExplainerName = "deep") -> None:
        """``explainer``: "deep" (DeepLIFT through the policy's network,
        :class:`serving.explain.NetworkExplainer`: exact additivity, no warm-up, no lock) or
        "permutation" (shap's model-agnostic permutation explainer, ``permutations`` antithetic
        pairs). ``warm`` (permutation): True builds and warms it now, False on its first use,
        "background" in a thread started now (:class:`serving.explain.BackgroundExplainer`)."""
        if explainer not in EXPLAINERS:
            raise ValueError(f"explainer must be one of {sorted(EXPLAINERS)}, got {explainer!r}")
        self.policy = bundle if isinstance(bundle, BundlePolicy) else load(bundle)
        check_prepared(self.policy)
        explain = self.policy.manifest.explain
        self.medians: dict[str, float] = {k: float(v) for k, v in explain["feature_medians"].items()}
        self.benefit = BenefitModel.from_bundle(self.policy)
        self.score_kind = "q_value" if self.policy.has_q_values else "logit"
        background = np.asarray(explain["background"], dtype=np.float64)
        self.explainer: Explainer | BackgroundExplainer | NetworkExplainer
        if explainer == "deep":
            self.explainer = NetworkExplainer(self.policy.network, background)
        elif warm == "background":
            self.explainer = BackgroundExplainer(self.policy.outputs, background, permutations=permutations)
        else:
            self.explainer = Explainer(self.policy.outputs, background, permutations=permutations)
        self.explainer_method = EXPLAINERS[explainer].format(k=len(background))
        self.info = PolicyInfo(name=self.policy.name, algorithm=self.policy.algorithm,
                               version=self.policy.manifest.weights_sha256[:12],
                               created=self.policy.manifest.created,
                               evaluation_summary=evaluation_summary(self.policy.manifest.evaluation),
                               certification=certification_info(self.policy.manifest.certificate))
        if warm is True:
            self.explainer.warm()
        if warm:
            self.recommend({}, top_k=1, explain=False)

    @property
    def explainer_state(self) -> str:
        """"ready", "warming" (in its background thread) or "failed"."""
        if isinstance(self.explainer, BackgroundExplainer):
            return "failed" if self.explainer.failed else "ready" if self.explainer.ready else "warming"
        return "ready"

    async def explainer_warmed(self) -> None:
        """Wait off the event loop for a background warm-up, so that the loop keeps answering
        /healthz and unexplained requests meanwhile."""
        if isinstance(self.explainer, BackgroundExplainer) and not self.explainer.wait(0):
            await asyncio.to_thread(self.explainer.wait)

    def recommend(self, features: Mapping[str, Any], *, top_k: int = 3, explain: bool = True) -> Recommendation:
        """Ranked allowed next steps for one patient (features by name; missing allowed)."""
        if not 1 <= top_k <= len(ACTION_NAMES):
            raise ValueError(f"top_k must be in [1, {len(ACTION_NAMES)}], got {top_k}")
        patient = build_observation(features, self.medians)
        obs = patient.obs
        mask = action_mask(obs[None, :])[0]
        outputs, probabilities = self.policy.outputs_and_probs(obs[None, :], mask[None, :])
        scores, probs = outputs[0], probabilities[0]
        order = rank_actions(probs, scores, mask)
        shown = [a for a in order if mask[a]][:top_k]
        if any(not mask[a] for a in shown):  # unreachable by construction; refuse rather than suggest
            raise AssertionError("a blocked action reached the suggestions")
        benefit = self.benefit.predict(obs[None, :])
        explanation = self.explainer.explain(obs) if explain else None
        critical = bool(obs[FEATURE_INDEX["phq9_item9"]] >= 2) and bool(mask[Action.REFER_SPECIALIST])
        alerts = list(patient.alerts)
        if critical:
            alerts.insert(0, f"CRITICAL: {_CRITICAL_RULE.description}. Act today; do not wait for the next visit.")
        disagreement = benefit_disagreement(benefit.lo[0], benefit.hi[0], benefit.change[0], mask, shown[0])
        if disagreement is not None:
            alerts.append(disagreement)
        # a reason that rests on a value the clinician did not give must say so
        assumed = {i.name for i in patient.imputed}
        suggestions = []
        for rank, a in enumerate(shown, start=1):
            rationale = None
            if explanation is not None:
                rationale = Rationale(
                    method=self.explainer_method,
                    base_value=float(explanation.base_values[a]), score=float(explanation.scores[a]),
                    contributions=[_flag_assumed(Contribution(**vars(c)), assumed)
                                   for c in explanation.top(a, obs, TOP_CONTRIBUTIONS)])
            suggestions.append(Suggestion(
                id=str(uuid.uuid4()), rank=rank, action=ACTION_NAMES[a], label=ACTION_LABELS[ACTION_NAMES[a]],
                care_class=ACTION_CARE_CLASS[ACTION_NAMES[a]], score=float(scores[a]),
                score_kind=self.score_kind,  # type: ignore[arg-type]
                probability=float(probs[a]), critical=critical and a == Action.REFER_SPECIALIST,
                benefit=BenefitEstimate(
                    phq9_change_vs_continue=float(benefit.change[0, a]), low=float(benefit.lo[0, a]),
                    high=float(benefit.hi[0, a]), level=benefit.level, horizon_weeks=benefit.horizon_weeks,
                    method=f"{benefit.method} ({benefit.members} refits)"),
                rationale=rationale))
        blocked = [
            BlockedAction(action=name, label=ACTION_LABELS[name],
                          rules=[BlockingRule(name=r.name, description=r.description, critical=r.critical)
                                 for r in rules])
            for name, rules in blocking_rules(obs).items() if rules
        ]
        imputed = [ImputedFeature(feature=i.name, value=i.value, reason=i.reason) for i in patient.imputed]
        return Recommendation(critical=critical, alerts=alerts, suggestions=suggestions, blocked=blocked,
                              imputed=imputed, uncertainty=UNCERTAINTY, policy=self.info)

    def observation(self, features: Mapping[str, Any]) -> NDArray[np.float64]:
        """The observation row the policy sees for ``features`` (for the audit trail)."""
        return build_observation(features, self.medians).obs


def _in_bounds(feature: str, value: Any) -> bool:
    low, high = FEATURE_BOUNDS[feature]
    return is_number(value) and low <= value <= high


#: The fields ``carepath prepare`` writes under ``explain``: serving refuses any other.
EXPLAIN_KEYS = frozenset({"background", "feature_medians", "benefit", "prepared_on", "prepare_config"})


def check_serving_section(explain: Mapping[str, Any], where: Any) -> None:
    """Refuse an ``explain`` section that ``carepath prepare`` cannot have written, naming the field."""
    _refuse_unknown_keys(explain, EXPLAIN_KEYS, "explain", where)
    medians = explain["feature_medians"]
    if not isinstance(medians, dict):
        raise BundleError(f"{where}: field 'explain.feature_medians' must be an object")
    for name, value in medians.items():
        if name not in FEATURE_INDEX or not _in_bounds(name, value):
            raise BundleError(f"{where}: field 'explain.feature_medians.{name}' must be a known feature with a "
                              f"value in its bounds, got {repr(value)[:80]}")
    background = explain["background"]
    if not (isinstance(background, list) and background and all(
            isinstance(row, list) and len(row) == len(FEATURE_NAMES)
            and all(_in_bounds(f, v) for f, v in zip(FEATURE_NAMES, row, strict=True)) for row in background)):
        raise BundleError(f"{where}: field 'explain.background' must be rows of {len(FEATURE_NAMES)} feature values "
                          "within their bounds")
    benefit = explain["benefit"]
    if not isinstance(benefit, dict):
        raise BundleError(f"{where}: field 'explain.benefit' must be an object")
    _refuse_unknown_keys(benefit, BENEFIT_ENTRY_KEYS, "explain.benefit", where)
    checks = {"file": lambda v: isinstance(v, str), "network": lambda v: isinstance(v, dict),
              "members": lambda v: is_int(v) and v >= 2,
              "level": lambda v: is_number(v) and 0 < v < 1,
              "horizon_weeks": lambda v: is_int(v) and v >= 1}
    for key, ok in checks.items():
        if key not in benefit or not ok(benefit[key]):
            got = repr(benefit.get(key))[:80]
            raise BundleError(f"{where}: field 'explain.benefit.{key}' is missing or invalid, got {got}")


def _refuse_unknown_keys(section: Mapping[str, Any], known: frozenset[str], name: str, where: Any) -> None:
    unknown = sorted(str(k) for k in set(section) - known)
    if unknown:
        raise BundleError(f"{where}: field '{name}' has unknown key(s) {', '.join(repr(k)[:40] for k in unknown[:5])}")


def rank_actions(probs: NDArray[np.floating], scores: NDArray[np.floating], mask: NDArray[np.bool_]) -> list[int]:
    """Allowed actions first, then by the policy's probability, then its score (highest first)."""
    safe_scores = np.where(np.isfinite(scores), scores, -np.inf)
    return sorted(range(len(probs)), key=lambda a: (not mask[a], -float(probs[a]), -float(safe_scores[a]), a))


def benefit_disagreement(lo: NDArray[np.float64], hi: NDArray[np.float64], change: NDArray[np.float64],
                         mask: NDArray[np.bool_], first: int) -> str | None:
    """A note when the benefit model clearly prefers another allowed step to the policy's first choice:
    its whole interval lies below (better than) the first choice's. The two are different models
    (the policy's value includes remission, side effects and dropout; the benefit is PHQ-9 alone),
    and a clinician should see where they part."""
    better = [a for a in range(len(change)) if mask[a] and a != first and hi[a] < lo[first]]
    if not better:
        return None
    best = min(better, key=lambda a: change[a])
    gap = change[first] - change[best]
    return (f"The benefit model expects PHQ-9 about {gap:.1f} points lower with "
            f"'{ACTION_LABELS[ACTION_NAMES[best]]}' than with the policy's first choice "
            f"('{ACTION_LABELS[ACTION_NAMES[first]]}'): the policy also weighs remission, side effects and "
            f"dropout; weigh both.")


NOT_CERTIFIED = ("Not certified: no certificate from logged data vouches for this policy against current care "
                 "(run 'carepath certify'). Use its suggestions with extra caution.")


def certification_info(certificate: Mapping[str, Any]) -> Certification:
    """The bundle's certificate as a clinician reads it; a bundle without one is not certified."""
    if not certificate:
        return Certification(certified=False, statement=NOT_CERTIFIED)
    certified = bool(certificate.get("certified"))
    bound, estimate = _number(certificate.get("lower_bound")), _number(certificate.get("improvement"))
    confidence = _number(certificate.get("confidence"))
    safety = (certificate.get("episodes") or {}).get("safety")
    sure = f"{100 * confidence:.0f} %" if confidence is not None else "the stated"
    if certified and bound is not None:
        said = f" (estimate {estimate:+.1f})" if estimate is not None else ""
        statement = (f"Certified against current care: with {sure} confidence this policy's suggestions lead to at "
                     f"least {bound:+.1f} percentage points more remission{said}, "
                     f"judged on {safety or 'held-out'} logged patients it was neither trained nor tuned on.")
    else:
        reasons = "; ".join(str(r) for r in certificate.get("reasons", [])) or "the bound is not above 0"
        statement = (f"Not certified: the logged data cannot show that this policy does better than current care "
                     f"({reasons}). Keep to current care unless you have reason to depart from it.")
    first = (certificate.get("first_choice") or {}).get("statement")
    return Certification(certified=certified, id=certificate.get("id"), statement=statement,
                         first_choice=str(first) if first else None, confidence=confidence,
                         lower_bound_pp=bound, improvement_pp=estimate)


def _flag_assumed(contribution: Contribution, assumed: set[str]) -> Contribution:
    if contribution.feature in assumed:
        contribution.text += " (assumed: not given; enter it to check)"
    return contribution


def _number(value: Any) -> float | None:
    return float(value) if is_number(value) else None


def evaluation_summary(evaluation: Mapping[str, Any]) -> list[str]:
    """The bundle's evaluation in a few lines for a clinician (simulator truth, then off-policy)."""
    lines: list[str] = []
    truth = evaluation.get("simulator_ground_truth")
    if isinstance(truth, dict) and isinstance(truth.get("policy"), dict):
        r = truth["policy"].get("remission", {})
        b = truth.get("behaviour", {}).get("remission", {})
        if "value" in r:
            line = (f"Simulated patients ({truth['policy'].get('patients', '?')}): remission "
                    f"{100 * r['value']:.1f} % [{100 * r['low']:.1f}, {100 * r['high']:.1f}]")
            if "value" in b:
                line += f" vs {100 * b['value']:.1f} % under the logged care"
            lines.append(line)
    ope = evaluation.get("off_policy_validation")
    if isinstance(ope, dict) and ope.get("policies"):
        head = ope.get("headline_estimator", "wdr")
        est = ope["policies"][0].get("estimates", {}).get(head)
        if isinstance(est, dict) and est.get("value") is not None:
            line = (f"Off-policy estimate from logged validation patients ({head.upper()}): value "
                    f"{est['value']:.2f} [{est['low']:.2f}, {est['high']:.2f}]")
            if est.get("warnings"):
                line += f" (caution: {est['warnings'][0]})"
            lines.append(line)
    return lines or ["No evaluation is recorded in this policy bundle."]

