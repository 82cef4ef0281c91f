"""Clinical rules that block actions, computed from observable features alone.

The simulator, the baseline policies, the offline agents and the recommender
all go through :func:`action_mask`, so what is allowed is decided in one
place and from what a clinician can see (never from hidden state). The
conditions live in one compiled scalar function, :func:`rule_hits_scalar`,
which the simulator's step kernel calls too; :data:`RULES` gives each
condition its name, its description and the actions it blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numpy.typing import NDArray

from envs.spec import (
    ACTION_NAMES,
    FEATURE_INDEX,
    ITEM9_REFERRAL_THRESHOLD,
    MAX_DOSE_LEVEL,
    N_ACTIONS,
    N_FEATURES,
    Action,
)

FloatArray = NDArray[np.floating]
BoolArray = NDArray[np.bool_]

#: Weeks a step or dose must run before it may change (too early to judge).
MIN_WEEKS_BEFORE_CHANGE = 2

#: Weeks of sustained remission before an antidepressant may be tapered and
#: stopped: at least 6 months after remission (NICE NG222 2022, section 1.8, preventing relapse;
#: CANMAT 2023: 6-12 months for patients at low risk of recurrence).
MIN_WEEKS_WELL_BEFORE_TAPER = 26


@dataclass(frozen=True)
class Rule:
    """A rule that, when it applies, blocks ``actions``."""

    name: str
    description: str
    actions: tuple[Action, ...]
    critical: bool = False


_ALL_BUT_REFERRAL = tuple(a for a in Action if a is not Action.REFER_SPECIALIST)

#: In the order of the hits that :func:`rule_hits_scalar` writes.
RULES: tuple[Rule, ...] = (
    Rule(
        "item9_referral_only",
        f"PHQ-9 item 9 >= {ITEM9_REFERRAL_THRESHOLD} (thoughts of self-harm): "
        "referral to specialist care is the only safe action",
        _ALL_BUT_REFERRAL,
        critical=True,
    ),
    Rule(
        "no_antidepressant",
        "no antidepressant is prescribed: no dose to raise, drug to switch within class, augment or taper",
        (Action.RAISE_DOSE, Action.SWITCH_WITHIN_CLASS, Action.AUGMENT, Action.TAPER_ANTIDEPRESSANT),
    ),
    Rule("maximum_dose", f"the dose is already at the maximum (level {MAX_DOSE_LEVEL})", (Action.RAISE_DOSE,)),
    Rule(
        "dose_changed_recently",
        f"the dose changed less than {MIN_WEEKS_BEFORE_CHANGE} weeks ago",
        (Action.RAISE_DOSE,),
    ),
    Rule(
        "step_started_recently",
        f"the current step started less than {MIN_WEEKS_BEFORE_CHANGE} weeks ago: too early to judge it",
        (Action.SWITCH_WITHIN_CLASS, Action.SWITCH_CLASS, Action.AUGMENT),
    ),
    Rule("already_augmented", "an augmenting agent is already prescribed", (Action.AUGMENT,)),
    Rule("already_in_psychotherapy", "the patient is already in psychotherapy", (Action.ADD_PSYCHOTHERAPY,)),
    Rule(
        "already_on_digital",
        "the patient is already in a digital CBT programme",
        (Action.ADD_DIGITAL_GUIDED, Action.ADD_DIGITAL_UNGUIDED),
    ),
    Rule(
        "no_digital_access",
        "the patient has no access to digital therapy",
        (Action.ADD_DIGITAL_GUIDED, Action.ADD_DIGITAL_UNGUIDED),
    ),
    Rule("already_referred", "the patient is already in specialist care", (Action.REFER_SPECIALIST,)),
    Rule(
        "remission_not_sustained",
        f"remission has not been sustained for {MIN_WEEKS_WELL_BEFORE_TAPER} weeks: too early to stop the "
        "antidepressant (NICE NG222: at least 6 months after remission)",
        (Action.TAPER_ANTIDEPRESSANT,),
    ),
)
N_RULES = len(RULES)
RULE_BY_NAME: dict[str, Rule] = {rule.name: rule for rule in RULES}

#: BLOCKS[r, a] is true when rule r blocks action a.
BLOCKS = np.zeros((N_RULES, N_ACTIONS), dtype=np.bool_)
for _r, _rule in enumerate(RULES):
    for _a in _rule.actions:
        BLOCKS[_r, _a] = True

# The features the rules read, in the argument order of rule_hits_scalar.
RULE_FEATURES: tuple[str, ...] = (
    "phq9_item9",
    "dose_level",
    "weeks_on_dose",
    "weeks_on_step",
    "on_augmentation",
    "on_psychotherapy",
    "on_digital",
    "digital_access",
    "in_specialist_care",
    "weeks_well",
)
_RULE_FEATURE_IDX = np.array([FEATURE_INDEX[f] for f in RULE_FEATURES], dtype=np.int64)


@numba.njit(cache=True, error_model="numpy")
def rule_hits_scalar(
    item9: float,
    dose: float,
    weeks_on_dose: float,
    weeks_on_step: float,
    on_augmentation: float,
    on_psychotherapy: float,
    on_digital: float,
    digital_access: float,
    in_specialist_care: float,
    weeks_well: float,
    hits: NDArray[np.bool_],
) -> None:
    """Write which RULES apply (in RULES order) for one patient into ``hits``."""
    high_item9 = item9 >= ITEM9_REFERRAL_THRESHOLD
    hits[0] = high_item9
    hits[1] = dose <= 0
    hits[2] = dose >= MAX_DOSE_LEVEL
    hits[3] = weeks_on_dose < MIN_WEEKS_BEFORE_CHANGE
    # Starting a first antidepressant (switch_class with none) is never too early.
    hits[4] = weeks_on_step < MIN_WEEKS_BEFORE_CHANGE and dose > 0
    hits[5] = on_augmentation > 0
    hits[6] = on_psychotherapy > 0
    hits[7] = on_digital > 0
    hits[8] = digital_access <= 0
    # A high item 9 always allows (re-)referral: it is the safe action.
    hits[9] = in_specialist_care > 0 and not high_item9
    hits[10] = weeks_well < MIN_WEEKS_WELL_BEFORE_TAPER


@numba.njit(cache=True, error_model="numpy")
def _rule_hits_kernel(values: NDArray[np.float64], hits: NDArray[np.bool_]) -> None:
    for i in range(values.shape[0]):
        v = values[i]
        rule_hits_scalar(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], hits[i])


def _as_obs(obs: FloatArray) -> NDArray[np.float64]:
    values: NDArray[np.float64] = np.asarray(obs).astype(np.float64, copy=False)
    if values.ndim != 2 or values.shape[1] != N_FEATURES:
        raise ValueError(f"observations must have shape (n, {N_FEATURES}), got {values.shape}")
    return values


def rule_hits(obs: FloatArray) -> BoolArray:
    """Which rules apply to each observation row, shape (n, len(RULES))."""
    values = np.ascontiguousarray(_as_obs(obs)[:, _RULE_FEATURE_IDX])
    hits = np.zeros((len(values), N_RULES), dtype=np.bool_)
    _rule_hits_kernel(values, hits)
    return hits


def mask_from_hits(hits: BoolArray) -> BoolArray:
    """Allowed actions given rule hits: an action is allowed when no rule blocks it."""
    return ~(hits.astype(np.uint8) @ BLOCKS.astype(np.uint8)).astype(bool)


def action_mask(obs: FloatArray) -> BoolArray:
    """Allowed actions, shape (n, n_actions); ``continue`` or ``refer`` is always allowed."""
    return mask_from_hits(rule_hits(obs))


def blocking_rules(obs_row: FloatArray) -> dict[str, list[Rule]]:
    """For one observation: the rules blocking each action (an empty list = allowed)."""
    hits = rule_hits(np.asarray(obs_row, dtype=np.float64).reshape(1, -1))[0]
    return {
        name: [RULES[r] for r in range(N_RULES) if hits[r] and BLOCKS[r, a]]
        for a, name in enumerate(ACTION_NAMES)
    }
