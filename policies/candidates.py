"""Candidate policies that stay where the logged data has support.

A trained policy may put its mass on actions the logged clinicians rarely
took; there the data cannot vouch for it. Two families keep close to the
behaviour policy ``pi_b`` (estimated: :class:`offline_data.behavior.BehaviourModel`):

- ``mixture``: ``w pi + (1 - w) pi_b``. ``w = 0`` is current care, ``w = 1``
  the trained policy; importance weights grow with ``w``, so a small ``w``
  is easier to certify and changes less.
- ``prefix``: the trained policy decides the first ``weeks`` weeks of care and
  current care every week after. A dynamic treatment regime changed only in
  its first stages (Murphy 2003, "Optimal dynamic treatment regimes", JRSS B):
  importance weights span those weeks alone, so a change at the start of care
  (the choice every patient meets, where the log's exploration gives each
  action support) can be certified where one spread over 26 weeks cannot.
- ``spibb``: safe policy improvement with baseline bootstrapping (Laroche,
  Trichelair & Tachet des Combes 2019, "Safe policy improvement with baseline
  bootstrapping", ICML; their Pi_b-SPIBB). Where ``pi_b`` gives an action less
  than ``threshold`` (too rarely taken to estimate its value, the counterpart of
  their count threshold), the candidate keeps ``pi_b``'s probability; the rest of
  the mass follows the trained policy over the well-supported actions.

Both are policies in the sense of :class:`policies.base.Policy`, so serving,
off-policy evaluation and the simulator call them as they call any other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from envs.spec import FEATURE_INDEX
from policies.base import BoolArray, FloatArray, Policy, check_inputs, restrict_to_mask

Family = Literal["mixture", "spibb", "prefix"]
FAMILIES: tuple[str, ...] = ("mixture", "spibb", "prefix")
_WEEKS_IN_CARE = FEATURE_INDEX["weeks_in_care"]


@dataclass(frozen=True)
class Candidate:
    """One member of a candidate family, with how certification bounds it: ``estimator`` "is"
    (trajectory importance sampling, weights capped at ``truncation``) or "dr" (doubly robust,
    uncapped). The estimator changes the certificate, never what is served."""

    family: Family
    weight: float = 1.0  # mixture: share of the trained policy
    threshold: float = 0.0  # spibb: behaviour probability under which pi_b is kept
    weeks: int = 0  # prefix: weeks of care (from intake) the trained policy decides
    truncation: float = 20.0
    estimator: str = "is"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"candidate family must be one of {FAMILIES}, got {self.family!r}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"mixture weight must be in [0, 1], got {self.weight}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"SPIBB threshold must be in [0, 1), got {self.threshold}")
        if self.family == "prefix" and not (isinstance(self.weeks, int) and self.weeks >= 1):
            raise ValueError(f"a prefix candidate decides at least 1 week, got weeks={self.weeks!r}")
        if not self.truncation >= 1.0:
            raise ValueError(f"weight truncation must be at least 1, got {self.truncation}")
        if self.estimator not in ("is", "dr"):
            raise ValueError(f"candidate estimator must be 'is' or 'dr', got {self.estimator!r}")

    def combine(self, trained: FloatArray, current: FloatArray, mask: BoolArray,
                obs: NDArray[np.floating]) -> FloatArray:
        """This candidate's probabilities from the trained policy's and current care's on ``obs``."""
        if self.family == "mixture":
            return restrict_to_mask(self.weight * trained + (1.0 - self.weight) * current, mask)
        if self.family == "prefix":
            early = np.asarray(obs)[:, _WEEKS_IN_CARE] < self.weeks
            return restrict_to_mask(np.where(early[:, None], trained, current), mask)
        return restrict_to_mask(spibb_probs(trained, current, mask, self.threshold), mask)

    def describe(self) -> str:
        if self.family == "mixture":
            return f"mixture: {100 * self.weight:.0f} % trained policy, {100 * (1 - self.weight):.0f} % current care"
        if self.family == "prefix":
            span = "the first week" if self.weeks == 1 else f"the first {self.weeks} weeks"
            return f"prefix: trained policy for {span} of care, current care after"
        return f"SPIBB: current care's probabilities kept where it takes an action under {self.threshold:g}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> Candidate:
        if not isinstance(d, dict):
            raise ValueError(f"a candidate must be an object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"family", "weight", "threshold", "weeks", "truncation", "estimator"})
        if unknown:
            raise ValueError(f"candidate has unknown key(s) {unknown}")
        try:
            return cls(family=d["family"], weight=float(d.get("weight", 1.0)),
                       threshold=float(d.get("threshold", 0.0)), weeks=_whole(d.get("weeks", 0)),
                       truncation=float(d.get("truncation", 20.0)),
                       estimator=str(d.get("estimator", "is")))
        except KeyError:
            raise ValueError("candidate lacks its 'family'") from None
        except (TypeError, ValueError) as err:
            raise ValueError(f"candidate: {err}") from None


def candidate_from_record(record: Any) -> Candidate:
    """The candidate a certificate's ``candidate`` entry names; the entry's report fields
    (description, predicted bound, effective sample size...) are not part of it."""
    if not isinstance(record, dict):
        raise ValueError(f"a candidate must be an object, got {type(record).__name__}")
    return Candidate.from_dict({k: v for k, v in record.items() if k in Candidate.__dataclass_fields__})


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"weeks must be a whole number, got {value!r}")
    return int(value)


def candidate_grid(weights: tuple[float, ...], thresholds: tuple[float, ...], truncations: tuple[float, ...],
                   doubly_robust: bool = False, prefix_weeks: tuple[int, ...] = ()) -> list[Candidate]:
    """Every mixture weight, SPIBB threshold and prefix length, each with every weight truncation
    (and, with ``doubly_robust``, once more bounded by the doubly robust estimator)."""
    members = ([Candidate("mixture", weight=w) for w in weights]
               + [Candidate("spibb", threshold=t) for t in thresholds]
               + [Candidate("prefix", weeks=h) for h in prefix_weeks])
    grid = [replace(m, truncation=c) for m in members for c in truncations]
    if doubly_robust:
        grid += [replace(m, estimator="dr") for m in members]
    return grid


class CandidatePolicy:
    """A trained policy made to stay near current care, as a :class:`~policies.base.Policy`."""

    def __init__(self, policy: Policy, behaviour: Policy, candidate: Candidate) -> None:
        self.policy = policy
        self.behaviour = behaviour
        self.candidate = candidate
        self.name = f"{getattr(policy, 'name', 'policy')} ({candidate.describe()})"

    def action_probs(self, obs: NDArray[np.floating], mask: BoolArray) -> FloatArray:
        obs, mask = check_inputs(obs, mask)
        trained = np.asarray(self.policy.action_probs(obs, mask), dtype=np.float64)
        current = np.asarray(self.behaviour.action_probs(obs, mask), dtype=np.float64)
        return self.candidate.combine(trained, current, mask, obs)


def spibb_probs(trained: FloatArray, current: FloatArray, mask: BoolArray, threshold: float) -> FloatArray:
    """Pi_b-SPIBB with the trained policy in place of the greedy step: rarely taken actions keep
    ``current``'s probability; the remaining mass goes to the well-supported actions as the
    trained policy shares it (as ``current`` does where the trained policy puts none there)."""
    rare = mask & (current < threshold)
    kept = np.where(rare, current, 0.0)
    supported = mask & ~rare
    free = 1.0 - kept.sum(axis=1, keepdims=True)
    trained_there = np.where(supported, trained, 0.0)
    current_there = np.where(supported, current, 0.0)
    total = trained_there.sum(axis=1, keepdims=True)
    share = np.where(total > 0, trained_there / np.where(total > 0, total, 1.0),
                     current_there / np.maximum(current_there.sum(axis=1, keepdims=True), 1e-300))
    return kept + free * share


class FirstChoicePolicy:
    """What happens if clinicians always take the first-ranked step: all mass on the most probable."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.name = f"first choice of {getattr(policy, 'name', 'policy')}"

    def action_probs(self, obs: NDArray[np.floating], mask: BoolArray) -> FloatArray:
        obs, mask = check_inputs(obs, mask)
        probs = np.where(mask, np.asarray(self.policy.action_probs(obs, mask), dtype=np.float64), -1.0)
        out = np.zeros_like(probs)
        out[np.arange(len(out)), probs.argmax(axis=1)] = 1.0
        return out


__all__ = ["FAMILIES", "Candidate", "CandidatePolicy", "FirstChoicePolicy", "candidate_from_record", "candidate_grid",
           "spibb_probs"]
