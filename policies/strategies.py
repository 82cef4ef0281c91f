"""Care strategies that clinicians would not choose, kept to check the simulator.

A testbed in which they beat measurement-based care would reward an artefact
of the simulator (Luo et al., ICML 2024), so the strategy calibration
(:mod:`evaluation.strategies`) runs them beside STAR*D-style care:

- ``add_everything``: adds every treatment as soon as the rules allow
  (augmentation, psychotherapy, guided digital CBT, specialist care, dose).
- ``switch_every_2w``: changes the antidepressant class every time the rules
  allow (every two weeks) while the patient has not remitted.

Like the baselines they read named observation features only and obey the
item-9 referral rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from envs.spec import FEATURE_INDEX, N_ACTIONS, Action
from policies.base import BoolArray, FloatArray, Policy, check_inputs
from policies.baselines import _item9_override, _one_hot

#: The order in which ``add_everything`` adds treatments.
ADD_ORDER: tuple[Action, ...] = (
    Action.AUGMENT,
    Action.ADD_PSYCHOTHERAPY,
    Action.ADD_DIGITAL_GUIDED,
    Action.REFER_SPECIALIST,
    Action.RAISE_DOSE,
)


def _first_allowed(mask: BoolArray, order: tuple[Action, ...]) -> FloatArray:
    probs = np.zeros((len(mask), N_ACTIONS))
    chosen = np.zeros(len(mask), dtype=bool)
    for action in order:
        rows = ~chosen & mask[:, action]
        probs[rows, action] = 1.0
        chosen |= rows
    probs[~chosen, Action.CONTINUE] = 1.0
    return probs


@dataclass
class AddEverythingPolicy:
    """Every treatment the rules allow, as soon as they allow it."""

    name: str = "add_everything"

    def action_probs(self, obs: NDArray[np.floating], mask: BoolArray) -> FloatArray:
        obs, mask = check_inputs(obs, mask)
        return _item9_override(obs, mask, _first_allowed(mask, ADD_ORDER))


@dataclass
class SwitchEveryTwoWeeksPolicy:
    """A class switch whenever the rules allow one, until PHQ-9 falls below 5."""

    name: str = "switch_every_2w"

    def action_probs(self, obs: NDArray[np.floating], mask: BoolArray) -> FloatArray:
        obs, mask = check_inputs(obs, mask)
        probs = _first_allowed(mask, (Action.SWITCH_CLASS,))
        _one_hot(obs[:, FEATURE_INDEX["phq9"]] < 5, Action.CONTINUE, probs)  # remitted
        return _item9_override(obs, mask, probs)


STRATEGIES: dict[str, Callable[[], Policy]] = {
    "add_everything": AddEverythingPolicy,
    "switch_every_2w": SwitchEveryTwoWeeksPolicy,
}
