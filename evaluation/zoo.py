"""A zoo of candidate policies of known, differing quality, to score off-policy estimators.

Off-policy estimators are judged on how well they rank and bracket many
candidates, not one. The zoo spans near-copies of the logging policy (easy:
weights near 1), protocol variants that lean towards one step of care
(moderate overlap), other protocols and the random policy (poor overlap), and
optionally trained policy bundles. Every member is stochastic enough that
the logged data under STAR*D with epsilon 0.1 can identify it, except where
noted: that is the regime in which estimators can be compared at all.
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
    """At least ten candidates; trained policy bundles (paths) are appended as given."""
    stard = make_baseline("stard")
    # true values (total reward per patient, 26 weeks) from 1.3 to 3.4, most gaps >= 0.1
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
    if bundles:
        from policies import load

        zoo.extend(load(path) for path in bundles)
    names = [p.name for p in zoo]
    if len(set(names)) != len(names):
        raise ValueError(f"policy zoo: candidate names must be unique, got {names}")
    return zoo


def _named(policy: Policy, name: str) -> Policy:
    """The baselines name themselves by class; the zoo needs one name per member."""
    return MixturePolicy(name, ((policy, 1.0),))


__all__ = ["MixturePolicy", "PreferAction", "lean", "policy_zoo"]
