"""Strategy calibration: published comparisons of care strategies, re-run as simulated trials.

The protocol table (:mod:`evaluation.calibration`) checks one protocol's
path. Researchers use the simulator to *compare* strategies, so each row here
re-runs a published comparison with the trial's enrolment, arms and time
point, and checks the difference or ratio it reported (or, for the
orderings every clinician expects, the sign of a difference with its 95 %
interval). Arms of a trial start from the same enrolled patients with the
same seed, so they share their noise (common random numbers) and differ only
by the strategy.

Definitions used throughout:

- Remission: a trial assessment (true severity plus PHQ-9 measurement noise)
  below 5; leaving care counts as no remission (intention to treat).
- Relapse: an assessment of PHQ-9 >= 10 while in care. STAR*D defined relapse
  as QIDS-SR16 >= 11 (Rush 2006); the two scales' severity bands line up
  (QIDS-SR16 11-15 and PHQ-9 10-14 are both "moderate": Rush 2003; Kroenke
  2001), so QIDS-SR16 >= 11 is read as PHQ-9 >= 10.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from envs import dynamics as D
from envs.cohort import ActionFn, CohortRun, run_cohort, run_from
from envs.params import EnvSettings, SimParams
from envs.spec import Action
from evaluation.calibration import Target, _assess, _last_index, as_protocol, policy_arm, rct_eligible, scripted
from evaluation.ground_truth import Z95, rollout
from policies.base import Policy
from policies.baselines import RandomPolicy, StardPolicy
from policies.strategies import AddEverythingPolicy, SwitchEveryTwoWeeksPolicy

S = D.S
RELAPSE_AT_LEAST = 10.0
_RECORD = (S.SEV, S.LEVEL, S.W_STEP, S.DROPPED)


def _stard_arm(seed: int) -> ActionFn:
    """STAR*D-style care without a taper, as STAR*D's naturalistic follow-up kept treatment."""
    return policy_arm(StardPolicy(taper=False), np.random.default_rng([seed, 7]))


def _then(first: Action, after: ActionFn) -> ActionFn:
    """A trial arm: ``first`` at randomisation (week 0), then ``after``."""
    start = scripted({0: first})

    def act(obs: NDArray[np.float32], mask: NDArray[np.bool_], week: int) -> NDArray[np.int64]:
        return start(obs, mask, week) if week == 0 else after(obs, mask, week)

    return act


def _settings(weeks: int) -> EnvSettings:
    return EnvSettings(horizon=max(weeks, 1))


def _remitted_itt(run: CohortRun, params: SimParams, seed: int) -> NDArray[np.bool_]:
    assess = _assess(run.column(S.SEV)[-1], params, seed)
    return (assess < 5) & run.active[-1]


def _relapsed(run: CohortRun, params: SimParams, seed: int, every: int) -> NDArray[np.bool_]:
    """An assessment of PHQ-9 >= 10 at any scheduled visit while in care."""
    sev = run.column(S.SEV)
    weeks = np.arange(every, sev.shape[0], every)
    assess = _assess(sev[weeks], params, seed)
    return np.asarray(((assess >= RELAPSE_AT_LEAST) & run.active[weeks]).any(axis=0), dtype=np.bool_)


# ------------------------------------------------------------------ STAR*D follow-up


def _stard_followup(params: SimParams, n: int, seed: int) -> list[Target]:
    """Relapse over 12 months of naturalistic follow-up, on continued treatment,
    by the number of steps needed (Rush 2006, Am J Psychiatry)."""
    follow = 52
    weeks = 4 * 14 + 6 + follow
    run = run_cohort(_stard_arm(seed), n, weeks, seed=seed, params=params,
                     settings=_settings(weeks), record=_RECORD)
    sev, level, wstep = run.column(S.SEV), run.column(S.LEVEL), run.column(S.W_STEP)
    valid = run.active
    assess = _assess(sev, params, seed + 2)
    baseline = assess[0]
    idx = np.arange(sev.shape[1])
    entered_at = np.full(len(idx), -1)
    steps = np.zeros(len(idx), dtype=int)
    remitted = np.zeros(len(idx), dtype=bool)
    for lvl in range(1, 5):
        on_level = (level == lvl) & (wstep <= 14) & valid
        exit_t = _last_index(on_level)
        seen = (exit_t >= 0) & (entered_at < 0) & (exit_t + follow < sev.shape[0])
        exit_score = np.where(seen, assess[np.maximum(exit_t, 0), idx], 99)
        # follow-up: still on this level (no next step) the week after its exit
        stays = seen & (level[np.minimum(exit_t + 1, sev.shape[0] - 1), idx] == lvl)
        well = stays & ((exit_score < 5) | (exit_score <= 0.5 * baseline))
        entered_at = np.where(well, exit_t, entered_at)
        steps = np.where(well, lvl, steps)
        remitted = np.where(well, exit_score < 5, remitted)
    # monthly assessments, as STAR*D's follow-up: (visits, patients) relapse and in-care flags
    rows = np.flatnonzero(entered_at >= 0)
    visits = entered_at[rows][None, :] + np.arange(4, follow + 1, 4)[:, None]
    seen = valid[visits, rows[None, :]]
    relapse_at = (assess[visits, rows[None, :]] >= RELAPSE_AT_LEAST) & seen

    def km(group: NDArray[np.bool_]) -> float:
        """Relapse by 12 months, Kaplan-Meier with leaving care as censoring: STAR*D's
        follow-up lost many patients, and a time-to-relapse estimate does not count
        them as well."""
        g = group[rows]
        at_risk = seen[:, g] & ~np.cumsum(np.vstack([np.zeros((1, int(g.sum())), dtype=bool), relapse_at[:-1, g]]),
                                         axis=0).astype(bool)
        # once censored, a patient stays out of the risk set
        at_risk &= np.cumprod(seen[:, g], axis=0).astype(bool)
        events = (relapse_at[:, g] & at_risk).sum(axis=1)
        n_risk = at_risk.sum(axis=1)
        survival = np.prod(1.0 - events / np.maximum(n_risk, 1))
        return float(1.0 - survival)

    one = (entered_at >= 0) & (steps == 1) & remitted
    more = (entered_at >= 0) & (steps >= 2) & remitted
    responders = (entered_at >= 0) & (steps == 1) & ~remitted
    r1, r2, rr = (km(g) for g in (one, more, responders))
    src = "STAR*D 12-month follow-up (Rush 2006)"
    return [
        Target("relapse_after_1_step", "relapse in 12 months, remitters after 1 step (reported 33.5 %)", 100 * r1,
               25, 42, "%", src, int(one.sum()), "strategy"),
        Target("relapse_after_2plus_steps", "relapse in 12 months, remitters after 2-4 steps (reported 42.9-50 %)",
               100 * r2, 37, 58, "%", src, int(more.sum()), "strategy"),
        Target("relapse_ratio_steps", "relapse ratio, remitters after 2-4 steps vs after 1 (reported ~1.4)",
               r2 / max(r1, 1e-9), 1.1, 2.0, "ratio", src, int(more.sum()), "strategy"),
        Target("relapse_responders_level1", "relapse in 12 months, level-1 responders not in remission "
               "(reported 58.6 %)", 100 * rr, 47, 70, "%", src, int(responders.sum()), "strategy"),
    ]


# ------------------------------------------------------------------ maintenance vs discontinuation


def _maintenance(params: SimParams, n: int, seed: int, *, run_in: int, every: int,
                 eligible: Callable[[NDArray[np.float64], NDArray[np.float64]], NDArray[np.bool_]],
                 ) -> tuple[float, float, int]:
    """Patients well on an antidepressant after ``run_in`` weeks of STAR*D-style care
    (no taper), randomised to continue or to taper and stop; relapse over 52 weeks."""
    run = run_cohort(_stard_arm(seed), n, run_in, seed=seed, params=params,
                     settings=_settings(run_in), record=(S.SEV,))
    state = run.final_state
    score = _assess(state[:, S.SEV], params, seed + 3)
    enrol = (state[:, S.DROPPED] == 0) & (state[:, S.DRUG_CLASS] >= 0) & eligible(state, score)
    state = state[enrol]
    follow = 52
    rates = []
    if not len(state):
        return float("nan"), float("nan"), 0
    for arm in (scripted({}), scripted({0: Action.TAPER_ANTIDEPRESSANT})):
        arm_run = run_from(state, arm, follow, rng=np.random.default_rng([seed, 11]), params=params,
                           settings=_settings(follow), record=(S.SEV, S.DRUG_CLASS))
        rates.append(float(_relapsed(arm_run, params, seed + 4, every).mean()))
    return rates[0], rates[1], int(enrol.sum())


def _maintenance_targets(params: SimParams, n: int, seed: int) -> list[Target]:
    # Geddes 2003: remitted patients randomised after acute and continuation
    # treatment, taking their medication (trials' continuation phases select
    # adherent patients); follow-up about a year; visits about monthly
    cont, stop, enrolled = _maintenance(
        params, n, seed, run_in=40, every=4,
        eligible=lambda s, score: (s[:, S.O_WELL] >= 26) & (score < 5) & (s[:, S.O_ADH] >= 0.6))
    geddes = "Geddes 2003 meta-analysis (31 trials)"
    # ANTLER (Lewis 2021): primary-care patients on long-term antidepressants
    # with two or more episodes, well enough to stop; a retrospective CIS-R at
    # 12/26/39/52 weeks covered the whole year, read here as monthly assessments
    a_cont, a_stop, a_enrolled = _maintenance(
        params, n, seed + 1, run_in=78, every=4,
        eligible=lambda s, score: (s[:, S.O_WELL] >= 26) & (s[:, S.PRIOR] >= 2) & (score < 10))
    antler = "ANTLER trial (Lewis 2021, NEJM)"
    return [
        Target("geddes_relapse_continue", "relapse, continued antidepressant (reported 18 %)", 100 * cont,
               12, 25, "%", geddes, enrolled, "strategy"),
        Target("geddes_relapse_stop", "relapse, switched to placebo (reported 41 %)", 100 * stop, 33, 50, "%",
               geddes, enrolled, "strategy"),
        Target("antler_relapse_continue", "relapse by 52 weeks, maintenance (reported 39 %)", 100 * a_cont,
               31, 47, "%", antler, a_enrolled, "strategy"),
        Target("antler_relapse_stop", "relapse by 52 weeks, discontinuation (reported 56 %)", 100 * a_stop,
               48, 64, "%", antler, a_enrolled, "strategy"),
    ]


# ------------------------------------------------------------------ second step after a failed SSRI


def _level1_nonremitters(params: SimParams, n: int, seed: int) -> NDArray[np.float64]:
    """STAR*D level 1 (citalopram, measurement-based dosing) for 12 weeks; those
    still on level 1, in care and not in remission enter level 2."""
    run = run_cohort(_stard_arm(seed), n, 12, seed=seed, params=params,
                     settings=_settings(12), record=(S.SEV,))
    state = run.final_state
    score = _assess(state[:, S.SEV], params, seed + 5)
    enrol = (state[:, S.DROPPED] == 0) & (state[:, S.LEVEL] == 1) & (state[:, S.DRUG_CLASS] >= 0) & (score >= 5)
    return state[enrol]


def _second_step(params: SimParams, state: NDArray[np.float64], first: Action, seed: int,
                 weeks: int = 12) -> CohortRun:
    arm = _then(first, _stard_arm(seed))
    return run_from(state, arm, weeks, rng=np.random.default_rng([seed, 13]), params=params,
                    settings=_settings(weeks), record=(S.SEV,))


def _weeks_to_remission(run: CohortRun, params: SimParams, seed: int) -> float:
    """Mean weeks to the first STAR*D visit with an assessment below 5, among remitters."""
    visits = [2, 4, 6, 9, 12]
    sev = run.column(S.SEV)
    assess = _assess(sev[visits], params, seed)
    remit = (assess < 5) & run.active[visits]
    first = np.where(remit.any(axis=0), np.asarray(visits)[remit.argmax(axis=0)], np.nan)
    return float(np.nanmean(first))


def _level2_targets(params: SimParams, n: int, seed: int) -> list[Target]:
    state = _level1_nonremitters(params, n, seed)
    within = _remitted_itt(_second_step(params, state, Action.SWITCH_WITHIN_CLASS, seed), params, seed + 6)
    across = _remitted_itt(_second_step(params, state, Action.SWITCH_CLASS, seed), params, seed + 6)
    ct_run = _second_step(params, state, Action.ADD_PSYCHOTHERAPY, seed)
    aug_run = _second_step(params, state, Action.AUGMENT, seed)
    ct, aug = _remitted_itt(ct_run, params, seed + 7), _remitted_itt(aug_run, params, seed + 7)
    time_ratio = _weeks_to_remission(ct_run, params, seed + 8) / _weeks_to_remission(aug_run, params, seed + 8)
    rush = "STAR*D level 2 switch (Rush 2006, NEJM: 26.6 % vs 25.5 / 25.0 %, no significant difference)"
    thase = "STAR*D level 2 (Thase 2007: 23.1 % vs 33.3 %, not significant; 55 vs 40 days)"
    enrolled = len(state)
    return [
        Target("switch_within_minus_across", "remission, switch within class minus across classes (pp)",
               100 * (within.mean() - across.mean()), -6, 6, "pp", rush, enrolled, "strategy"),
        Target("ct_minus_med_augmentation", "remission, cognitive therapy added minus medication augmentation (pp)",
               100 * (ct.mean() - aug.mean()), -16, 4, "pp", thase, enrolled, "strategy"),
        Target("ct_vs_med_augmentation_time", "weeks to remission, cognitive therapy added / medication augmentation",
               time_ratio, 1.1, 2.0, "ratio", thase, enrolled, "strategy"),
    ]


# ------------------------------------------------------------------ early medication change


def _emc_targets(params: SimParams, n: int, seed: int) -> list[Target]:
    """EMC trial (Tadić 2016): escitalopram non-improvers at day 14 (< 20 % fall),
    early change (venlafaxine at once, lithium at day 28 if still not improved)
    vs staying the course (escitalopram; venlafaxine at day 28 if no response);
    remission at day 56."""
    run = run_cohort(scripted({}), n, 2, seed=seed, params=params,
                     settings=EnvSettings(horizon=2, initial_treatment="ssri"), record=(S.SEV,),
                     eligible=rct_eligible)
    sev = run.column(S.SEV)
    baseline, day14 = _assess(sev[0], params, seed + 9), _assess(sev[-1], params, seed + 10)
    state = run.final_state[(day14 > 0.8 * baseline) & run.active[-1]]
    intake = state[:, S.O_PHQ0]

    def emc(obs: NDArray[np.float32], mask: NDArray[np.bool_], week: int) -> NDArray[np.int64]:
        phq = obs[:, 0]
        a = np.zeros(len(obs), dtype=np.int64)
        if week == 0:
            a[:] = Action.SWITCH_CLASS
        elif week == 2:  # day 28
            a[:] = np.where(phq > 0.8 * intake, Action.AUGMENT, Action.RAISE_DOSE)
        elif week == 4:
            a[:] = Action.RAISE_DOSE
        return as_protocol(mask, a)

    def tau(obs: NDArray[np.float32], mask: NDArray[np.bool_], week: int) -> NDArray[np.int64]:
        phq = obs[:, 0]
        a = np.zeros(len(obs), dtype=np.int64)
        if week == 2:  # day 28: non-responders switch to venlafaxine
            a[:] = np.where(phq > 0.5 * intake, Action.SWITCH_CLASS, Action.CONTINUE)
        elif week == 4:
            a[:] = Action.RAISE_DOSE
        return as_protocol(mask, a)

    rates = []
    for arm in (emc, tau):
        arm_run = run_from(state, arm, 6, rng=np.random.default_rng([seed, 17]), params=params,
                           settings=_settings(6), record=(S.SEV,))
        rates.append(float(_remitted_itt(arm_run, params, seed + 11).mean()))
    return [Target("emc_minus_tau", "remission at day 56, early medication change minus staying the course (pp)",
                   100 * (rates[0] - rates[1]), -2, 16, "pp",
                   "EMC trial (Tadić 2016: 24 % vs 16 %, p = 0.21)", len(state), "strategy")]


# ------------------------------------------------------------------ orderings


@dataclass(frozen=True)
class Ordering:
    """Outcomes of the strategies every clinician can rank, at one seed."""

    remission: dict[str, tuple[float, int]]  # strategy -> (rate, patients)
    value: dict[str, tuple[float, float]]  # strategy -> (mean return, its standard error)
    cost: dict[str, float]  # mean GBP per patient
    side_effects: dict[str, float]  # mean weekly side-effect burden while in care


def orderings_at(params: SimParams, n: int, seed: int, weeks: int = 26) -> Ordering:
    policies: list[Policy] = [StardPolicy(), RandomPolicy(), SwitchEveryTwoWeeksPolicy(), AddEverythingPolicy()]
    rem, val, cost, side = {}, {}, {}, {}
    for policy in policies:
        truth = rollout(policy, n, seed=seed, params=params, settings=EnvSettings(horizon=weeks))
        rem[policy.name] = (truth.remission.value, n)
        val[policy.name] = (truth.value.value, (truth.value.high - truth.value.value) / Z95)
        cost[policy.name] = truth.cost.value
        side[policy.name] = truth.side_effects.value
    return Ordering(rem, val, cost, side)


def _diff_lower(a: tuple[float, int], b: tuple[float, int]) -> float:
    """95 % lower bound of a difference of two independent rates, in percentage points."""
    (p, n), (q, m) = a, b
    return 100 * (p - q - Z95 * np.sqrt(p * (1 - p) / n + q * (1 - q) / m))


def _ordering_targets(params: SimParams, n: int, seed: int, seeds: int = 3) -> list[Target]:
    runs = [orderings_at(params, n, seed + 100 * i) for i in range(seeds)]
    src = "orderings every clinician expects (design.md)"
    low_rem = min(_diff_lower(r.remission["stard"], r.remission["random"]) for r in runs)
    low_val = min(r.value["stard"][0] - r.value["random"][0]
                  - Z95 * np.hypot(r.value["stard"][1], r.value["random"][1]) for r in runs)
    low_switch = min(_diff_lower(r.remission["stard"], r.remission["switch_every_2w"]) for r in runs)
    rr = max(r.remission["add_everything"][0] / max(r.remission["stard"][0], 1e-9) for r in runs)
    cost = min(r.cost["add_everything"] / max(r.cost["stard"], 1e-9) for r in runs)
    side = min(r.side_effects["add_everything"] / max(r.side_effects["stard"], 1e-9) for r in runs)
    what = f"lowest of {seeds} seeds"
    return [
        Target("stard_minus_random_remission", f"STAR*D-style minus random steps, remission at 26 weeks, 95 % lower "
               f"bound (pp, {what})", low_rem, 0, 100, "pp", src, n, "strategy", "low", 2.0),
        Target("stard_minus_random_return", f"STAR*D-style minus random steps, return, 95 % lower bound ({what})",
               low_val, 0, 100, "reward", src, n, "strategy", "low", 0.3),
        Target("stard_minus_switch2w_remission", f"STAR*D-style minus switching every 2 weeks, remission, 95 % lower "
               f"bound (pp, {what})", low_switch, 0, 100, "pp", src, n, "strategy", "low", 2.0),
        Target("add_everything_remission_ratio", f"add everything / STAR*D-style, remission ratio (highest of "
               f"{seeds} seeds; combined-treatment RR at most 1.35, Cuijpers 2020)", rr, 0, 1.35, "ratio", src, n,
               "strategy", "high", 0.05),
        Target("add_everything_cost_ratio", f"add everything / STAR*D-style, cost per patient ({what})", cost, 1.0,
               1000, "ratio", src, n, "strategy", "low", 0.1),
        Target("add_everything_side_effect_ratio", f"add everything / STAR*D-style, side-effect burden ({what})",
               side, 1.0, 1000, "ratio", src, n, "strategy", "low", 0.1),
    ]


def strategy_targets(params: SimParams, n: int, seed: int) -> list[Target]:
    """Every row of the strategy section, ``n`` simulated patients per trial."""
    return [
        *_stard_followup(params, n, seed),
        *_maintenance_targets(params, n, seed + 1),
        *_level2_targets(params, n, seed + 2),
        *_emc_targets(params, n, seed + 3),
        *_ordering_targets(params, max(n // 4, 200), seed + 4),
    ]
