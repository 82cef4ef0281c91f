"""Baseline clinical policies: STAR*D measurement-based care, usual care, random.

They read named features of the observation, never hidden state, so they
can run on logged data and in serving exactly as in the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from envs.spec import ACTION_NAMES, FEATURE_INDEX, ITEM9_REFERRAL_THRESHOLD, MAX_TREATMENT_LEVEL, N_ACTIONS, Action
from policies.base import BoolArray, FloatArray, check_inputs, mix_epsilon, restrict_to_mask

_F = FEATURE_INDEX

#: Scheduled STAR*D visits, in weeks on the current step (Trivedi 2006).
STARD_VISITS = (2, 4, 6, 9, 12, 14)

#: Share of next-step choices by level reached, from STAR*D's reported arms
#: (Rush 2006): level 2 switch 727 (sertraline ~1/3: within class), augment 565,
#: cognitive therapy 147; level 3 switch 235, augment 142; level 4 switch only.
STARD_NEXT_STEP: dict[int, dict[Action, float]] = {
    1: {
        Action.SWITCH_WITHIN_CLASS: 0.17,
        Action.SWITCH_CLASS: 0.34,
        Action.AUGMENT: 0.39,
        Action.ADD_PSYCHOTHERAPY: 0.10,
    },
    2: {Action.SWITCH_CLASS: 0.62, Action.AUGMENT: 0.38},
    3: {Action.SWITCH_CLASS: 1.0},
}


def _one_hot(rows: BoolArray, action: Action, probs: FloatArray) -> None:
    probs[rows] = 0.0
    probs[rows, action] = 1.0


@dataclass
class StardPolicy:
    """STAR*D measurement-based care (Trivedi 2006; Rush 2006), on PHQ-9.

    At scheduled visits: raise the dose while the patient has not remitted and
    tolerates it; leave a step that has not brought remission by week 12
    (earlier on intolerable side effects or no response at maximum dose);
    after the fourth level, refer. Item 9 >= 2 always means referral.
    A step is judged only on a PHQ-9 measured that week (a carried-forward
    score may be stale), and a patient who responded without remitting
    chooses follow-up instead of the next level half of the time, as STAR*D
    allowed. After week 14 of a step the patient is in follow-up: only a
    relapse (PHQ-9 >= 10) brings a further step, not one noisy score of 5.

    After sustained remission the antidepressant is tapered, as guidelines
    advise: once the rules allow it (6 months well, NICE NG222), unless the
    patient has had ``maintenance_prior_episodes`` or more prior episodes, for
    whom NICE NG222 and CANMAT 2023 advise maintenance (2 years or longer).
    ``taper=False`` keeps every remitter on treatment, as STAR*D's
    naturalistic follow-up did.
    """

    epsilon: float = 0.0
    remission_below: float = 5.0  # PHQ-9 < 5 (QIDS-SR <= 5 in STAR*D)
    nonresponse_at_least: float = 10.0  # PHQ-9 >= 10 (QIDS-SR >= 9)
    intolerable_side_effects: float = 7.0  # burden 0-10
    exit_week: int = 12
    follow_up_after: int = 14
    relapse_at_least: float = 10.0
    responder_follow_up: float = 0.5
    taper: bool = True
    maintenance_prior_episodes: int = 2
    name: str = "stard"

    def __post_init__(self) -> None:
        mix_epsilon(np.ones((1, 1)), np.ones((1, 1), dtype=bool), self.epsilon)  # validates epsilon

    def base_probs(self, obs: NDArray[np.floating], mask: BoolArray) -> FloatArray:
        n = len(obs)
        phq = obs[:, _F["phq9"]]
        week = obs[:, _F["weeks_on_step"]]
        level = obs[:, _F["treatment_level"]]
        dose = obs[:, _F["dose_level"]]
        side = obs[:, _F["side_effect_burden"]]
        fresh = obs[:, _F["mask_phq9"]] > 0
        responded = phq <= 0.5 * obs[:, _F["phq9_at_intake"]]
        probs = np.zeros((n, N_ACTIONS))
        probs[:, Action.CONTINUE] = 1.0

        visit = np.isin(week, STARD_VISITS) | (week > max(STARD_VISITS)) & (week % 2 == 0)
        follow_up = week > self.follow_up_after
        not_remitted = np.where(follow_up, phq >= self.relapse_at_least, phq >= self.remission_below)
        can_raise = mask[:, Action.RAISE_DOSE] & (side < 6)
        intolerant = (side >= self.intolerable_side_effects) & (week >= 2)
        # raise at visits from week 4 on while not remitted and tolerated
        raise_dose = visit & (week >= 4) & not_remitted & can_raise & ~intolerant
        # next step: no remission by the exit week, no response at maximum dose by
        # week 9, or intolerable side effects
        at_max = dose >= 3
        next_step = fresh & not_remitted & (
            (week >= self.exit_week) | (visit & (week >= 9) & at_max & (phq >= self.nonresponse_at_least))
        )
        next_step = (next_step | intolerant) & ~raise_dose
        _one_hot(raise_dose, Action.RAISE_DOSE, probs)
        stay = next_step & responded & ~intolerant  # responders may choose follow-up

        done_levels = next_step & (level >= MAX_TREATMENT_LEVEL)
        for lvl, choices in STARD_NEXT_STEP.items():
            rows = next_step & (level == lvl)
            if rows.any():
                probs[rows] = 0.0
                for action, share in choices.items():
                    probs[rows, action] = share
        probs[stay] *= 1.0 - self.responder_follow_up
        probs[stay, Action.CONTINUE] += self.responder_follow_up
        # on intolerance prefer a class switch whatever the level
        rows = intolerant & (level < MAX_TREATMENT_LEVEL)
        _one_hot(rows, Action.SWITCH_CLASS, probs)
        rows = done_levels & mask[:, Action.REFER_SPECIALIST]
        _one_hot(rows, Action.REFER_SPECIALIST, probs)
        if self.taper:
            # the taper rule (remission_not_sustained) already demands 6 months well
            low_risk = obs[:, _F["prior_episodes"]] < self.maintenance_prior_episodes
            rows = visit & low_risk & mask[:, Action.TAPER_ANTIDEPRESSANT] & (phq < self.remission_below)
            _one_hot(rows, Action.TAPER_ANTIDEPRESSANT, probs)
        # a chosen step that is blocked falls back to continue (not to a random action)
        allowed_mass = (probs * mask).sum(axis=1)
        _one_hot(allowed_mass <= 0, Action.CONTINUE, probs)
        return probs

    def action_probs(self, obs: NDArray[np.floating], mask: BoolArray) -> FloatArray:
        obs, mask = check_inputs(obs, mask)
        probs = restrict_to_mask(self.base_probs(obs, mask), mask)
        probs = mix_epsilon(probs, mask, self.epsilon)
        return _item9_override(obs, mask, probs)


@dataclass
class UsualCarePolicy:
    """Usual primary care: slower and less consistent than the STAR*D algorithm.

    Reviews every 4 weeks; at a review with PHQ-9 >= 15 raises the dose,
    after 12 weeks without response changes treatment (class switch or
    psychotherapy); a third of reviews end with no change whatever the score
    (clinical inertia, Henke 2009).
    """

    epsilon: float = 0.0
    inertia: float = 0.33
    name: str = "usual_care"

    def __post_init__(self) -> None:
        mix_epsilon(np.ones((1, 1)), np.ones((1, 1), dtype=bool), self.epsilon)
        if not 0.0 <= self.inertia <= 1.0:
            raise ValueError(f"inertia must be in [0, 1], got {self.inertia}")

    def action_probs(self, obs: NDArray[np.floating], mask: BoolArray) -> FloatArray:
        obs, mask = check_inputs(obs, mask)
        n = len(obs)
        phq = obs[:, _F["phq9"]]
        week = obs[:, _F["weeks_on_step"]]
        probs = np.zeros((n, N_ACTIONS))
        probs[:, Action.CONTINUE] = 1.0
        review = (week >= 4) & (week % 4 == 0)
        act = 1.0 - self.inertia
        raise_dose = review & (phq >= 15) & mask[:, Action.RAISE_DOSE]
        change = review & ~raise_dose & (week >= 12) & (phq >= 10)
        probs[raise_dose, Action.CONTINUE] = self.inertia
        probs[raise_dose, Action.RAISE_DOSE] = act
        probs[change, Action.CONTINUE] = self.inertia
        probs[change, Action.SWITCH_CLASS] = act * 0.7
        probs[change, Action.ADD_PSYCHOTHERAPY] = act * 0.3
        # once the rules allow a taper (6 months well), usual care stops at a review
        # whatever the risk of recurrence (no maintenance by prior episodes)
        taper = review & ~raise_dose & ~change & mask[:, Action.TAPER_ANTIDEPRESSANT] & (phq < 10)
        probs[taper, Action.CONTINUE] = self.inertia
        probs[taper, Action.TAPER_ANTIDEPRESSANT] = act
        probs = restrict_to_mask(probs, mask)
        probs = mix_epsilon(probs, mask, self.epsilon)
        return _item9_override(obs, mask, probs)


@dataclass
class RandomPolicy:
    """Uniform over the allowed actions."""

    epsilon: float = 1.0  # accepted for a uniform interface; random is always uniform
    name: str = "random"

    def action_probs(self, obs: NDArray[np.floating], mask: BoolArray) -> FloatArray:
        obs, mask = check_inputs(obs, mask)
        return mask / mask.sum(axis=1, keepdims=True)


def _item9_override(obs: NDArray[np.floating], mask: BoolArray, probs: FloatArray) -> FloatArray:
    """Item 9 >= 2: referral with certainty, whatever epsilon says (a hard rule)."""
    urgent = (obs[:, _F["phq9_item9"]] >= ITEM9_REFERRAL_THRESHOLD) & mask[:, Action.REFER_SPECIALIST]
    if urgent.any():
        probs = probs.copy()
        _one_hot(urgent, Action.REFER_SPECIALIST, probs)
    return probs


BASELINES = {"stard": StardPolicy, "usual_care": UsualCarePolicy, "random": RandomPolicy}


def make_baseline(name: str, epsilon: float = 0.0) -> StardPolicy | UsualCarePolicy | RandomPolicy:
    """A baseline policy by name (``stard``, ``usual_care``, ``random``)."""
    try:
        cls = BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline policy {name!r}; expected one of {sorted(BASELINES)}") from None
    return cls(epsilon=epsilon)


def baseline_from_spec(spec: str) -> StardPolicy | UsualCarePolicy | RandomPolicy:
    """A baseline from ``name[:epsilon]`` (``stard``, ``usual_care:0.1``); the errors say what is wrong
    with the spec, for the caller to prefix with where it came from."""
    name, _, eps_text = spec.partition(":")
    if name not in BASELINES:
        raise ValueError(f"unknown policy: not a baseline name ({', '.join(sorted(BASELINES))}, optionally with "
                         "':epsilon')")
    try:
        epsilon = float(eps_text) if eps_text else 0.0
    except ValueError:
        raise ValueError(f"epsilon {eps_text!r} is not a number") from None
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {eps_text}")
    return make_baseline(name, epsilon)


__all__ = ["ACTION_NAMES", "BASELINES", "RandomPolicy", "StardPolicy", "UsualCarePolicy", "baseline_from_spec",
           "make_baseline"]
