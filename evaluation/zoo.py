"""Zoos of candidate policies of known, differing quality, to score off-policy estimators.

Off-policy estimators are judged on how well they rank and bracket many
candidates, not one. Two zoos, both scored against logs of STAR*D care with
epsilon 0.1 (5,000 patients):

- :func:`policy_zoo`, the *identifiable* zoo the accuracy targets are stated
  on: baselines with different epsilons and protocol variants that lean
  towards one step of care, chosen so that the log overlaps every member
  (WIS's effective sample size in the hundreds, or above) while true values
  still span 1.5 to 3.2 reward units per patient. Estimators can only be
  compared where the data can identify the candidates at all.
- :func:`stress_zoo`: seven candidates the log barely visits (a uniformly
  random policy, another protocol, leans of 30 %, epsilon 0.4), with median
  effective sample sizes of 7 to 62 out of 5,000, beside three it overlaps
  well (the logger and two 10 % leans). No estimator can be accurate on the
  seven; the zoo shows whether each one *says so* (a small-ESS warning)
  rather than giving a confident wrong number.

Trained policy bundles join both: a trained agent that acts greedily is a
deterministic policy, which an epsilon-0.1 log almost never follows for 26
weeks (the CQL policy of make demo: median WIS ESS 4 of 5,000), so the bundle itself joins
the stress zoo and STAR*D leaning 10 % towards it joins the identifiable zoo.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from envs.spec import ACTION_NAMES, Action
from policies.base import BoolArray, FloatArray, Policy, check_inputs, restrict_to_mask
from policies.baselines import make_baseline


@dataclass
class MixturePolicy:
    """``sum_k weight_k * pi_k``: a convex combination of policies (weights normalised)."""

    name: str
    components: tuple[tuple[Policy, float], ...]

    def __post_init__(self) -> None:
        if not self.components:
            raise ValueError(f"mixture {self.name!r} needs at least one component")
        if any(w < 0 for _, w in self.components) or sum(w for _, w in self.components) <= 0:
            raise ValueError(f"mixture {self.name!r}: weights must be non-negative with a positive sum")

    def action_probs(self, obs: NDArray[np.floating], mask: BoolArray) -> FloatArray:
        obs, mask = check_inputs(obs, mask)
        total = sum(w for _, w in self.components)
        probs = sum(w / total * p.action_probs(obs, mask) for p, w in self.components)
        return restrict_to_mask(np.asarray(probs, dtype=np.float64), mask)


@dataclass
class PreferAction:
    """Always the same step of care where it is allowed (uniform over the allowed actions elsewhere)."""

    action: Action
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or f"always_{ACTION_NAMES[self.action]}"

    def action_probs(self, obs: NDArray[np.floating], mask: BoolArray) -> FloatArray:
        obs, mask = check_inputs(obs, mask)
        probs = np.zeros(mask.shape)
        probs[:, self.action] = 1.0
        return restrict_to_mask(probs, mask)


def lean(name: str, base: Policy, action: Action, share: float) -> MixturePolicy:
    """``base`` that, with probability ``share``, takes ``action`` instead (where allowed)."""
    return MixturePolicy(name, ((base, 1.0 - share), (PreferAction(action), share)))


def policy_zoo(bundles: Sequence[str | Path] = ()) -> list[Policy]:
    """The identifiable zoo: ten candidates the epsilon-0.1 STAR*D log overlaps, and for each of
    ``bundles`` STAR*D leaning 10 % towards that trained policy (``stard_lean_<name>_0.1``).

    True values (total reward per patient over 26 weeks) ran from 1.48 to 3.19
    on the spec-1 simulator (400,000 patients); on spec 2, whose reward counts
    the cost of care, from about 1.56 (a 5 % lean to class switches) to 2.33
    (a 5 % lean to guided digital CBT), 4,000 patients each (the 400,000-patient
    truths are to be re-run). Median WIS effective sample sizes on 5,000 logged
    patients were 290 to 5,000.
    """
    stard = make_baseline("stard")
    zoo: list[Policy] = [
        lean("stard_lean_switch_class_0.05", stard, Action.SWITCH_CLASS, 0.05),
        lean("stard_lean_augment_0.1", stard, Action.AUGMENT, 0.1),
        _named(make_baseline("stard"), "stard_eps0"),
        _named(make_baseline("stard", 0.1), "stard_eps0.1"),  # the logging policy itself
        _named(make_baseline("stard", 0.2), "stard_eps0.2"),
        lean("stard_lean_digital_guided_0.05", stard, Action.ADD_DIGITAL_GUIDED, 0.05),
        lean("stard_lean_refer_0.1", stard, Action.REFER_SPECIALIST, 0.1),
        lean("stard_lean_psychotherapy_0.05", stard, Action.ADD_PSYCHOTHERAPY, 0.05),
        lean("stard_lean_psychotherapy_0.1", stard, Action.ADD_PSYCHOTHERAPY, 0.1),
        MixturePolicy("stard_lean_psychotherapy_0.1_refer_0.05",
                      ((stard, 0.85), (PreferAction(Action.ADD_PSYCHOTHERAPY), 0.1),
                       (PreferAction(Action.REFER_SPECIALIST), 0.05))),
    ]
    trained = _load(bundles)
    return _unique(zoo + [MixturePolicy(f"stard_lean_{p.name}_0.1", ((stard, 0.9), (p, 0.1))) for p in trained])


def stress_zoo(bundles: Sequence[str | Path] = ()) -> list[Policy]:
    """Ten candidates, seven of which the epsilon-0.1 STAR*D log barely visits (median WIS ESS 7 to 62 of 5,000).

    On the spec-1 simulator true values ran from about 1.25 to 3.3, with a
    uniformly random policy third best; on spec 2 random care no longer beats
    STAR*D-style care (the strategy calibration's orderings). ``bundles`` (trained policies) are appended as they are.
    """
    stard = make_baseline("stard")
    zoo: list[Policy] = [
        lean("stard_lean_switch_class", stard, Action.SWITCH_CLASS, 0.1),
        lean("stard_lean_switch_within", stard, Action.SWITCH_WITHIN_CLASS, 0.3),
        lean("stard_lean_augment", stard, Action.AUGMENT, 0.1),
        _named(make_baseline("stard", 0.1), "stard_eps0.1"),  # the logging policy itself
        _named(make_baseline("stard", 0.4), "stard_eps0.4"),
        lean("stard_lean_digital_guided", stard, Action.ADD_DIGITAL_GUIDED, 0.3),
        _named(make_baseline("usual_care", 0.2), "usual_care_eps0.2"),
        _named(make_baseline("random"), "random"),
        lean("stard_lean_psychotherapy_0.1", stard, Action.ADD_PSYCHOTHERAPY, 0.1),
        lean("stard_lean_psychotherapy_0.3", stard, Action.ADD_PSYCHOTHERAPY, 0.3),
    ]
    return _unique(zoo + _load(bundles))


#: The zoos by name (``benchmarks/ope_accuracy.py --zoo``).
ZOOS = {"identifiable": policy_zoo, "stress": stress_zoo}


def _load(bundles: Sequence[str | Path]) -> list[Policy]:
    if not bundles:
        return []
    from policies import load

    return [load(path) for path in bundles]


def _unique(zoo: list[Policy]) -> list[Policy]:
    names = [p.name for p in zoo]
    if len(set(names)) != len(names):
        raise ValueError(f"policy zoo: candidate names must be unique, got {names}")
    return zoo


def _named(policy: Policy, name: str) -> Policy:
    """The baselines name themselves by class; the zoo needs one name per member."""
    return MixturePolicy(name, ((policy, 1.0),))


__all__ = ["ZOOS", "MixturePolicy", "PreferAction", "lean", "policy_zoo", "stress_zoo"]
