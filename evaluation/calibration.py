"""Calibration of the simulator against published trial figures.

Each target of the design's calibration table is measured by re-running the
trial that produced it inside the simulator: STAR*D's four levels under the
measurement-based-care algorithm, placebo-controlled and psychotherapy
trials on a trial-eligible population, digital CBT programmes. Outcomes use
trial-style assessments (the true severity measured with PHQ-9 noise, never
missing) and dropouts count as in the source: last observation carried
forward in STAR*D, non-responders in the meta-analyses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import NDArray

from envs import dynamics as D
from envs.cohort import ActionFn, CohortRun, run_cohort
from envs.params import EnvSettings, SimParams, load_params
from envs.spec import Action
from policies.base import Policy, sample_actions
from policies.baselines import STARD_VISITS, StardPolicy

S = D.S


@dataclass(frozen=True)
class Target:
    """One row of the calibration table."""

    key: str
    quantity: str
    value: float
    low: float
    high: float
    unit: str
    source: str
    n: int  # patients the figure rests on
    section: str = "protocol"  # "protocol": one protocol's path; "strategy": comparisons of strategies
    # A one-sided target (an ordering) only has to clear one edge of its band:
    # "low" (value >= low) or "high" (value <= high); ``scale`` is the margin
    # the fit aims for beyond that edge, in the target's unit.
    one_sided: str = ""
    scale: float = 0.0

    def __post_init__(self) -> None:
        # plain floats: values computed with numpy must serialise as JSON
        object.__setattr__(self, "value", float(self.value))

    @property
    def inside(self) -> bool:
        return bool(self.low <= self.value <= self.high)

    def as_dict(self) -> dict[str, object]:
        # JSON has no NaN: a figure that could not be computed (no one enrolled) is null
        value = self.value if np.isfinite(self.value) else None
        return {**asdict(self), "value": value, "inside": self.inside}


@dataclass(frozen=True)
class CalibrationSizes:
    """Simulated patients per protocol: enough that every band is not luck
    (binomial standard error under 1 percentage point for the rates)."""

    stard: int = 20_000
    rct: int = 24_000  # before trial eligibility (about half enrol)
    digital: int = 8_000
    strategy: int = 24_000  # per strategy trial (a quarter per arm of the orderings)


def _assess(sev: NDArray[np.floating], params: SimParams, seed: int) -> NDArray[np.float64]:
    """Trial assessments: PHQ-9 with measurement noise, rounded, never missing."""
    rng = np.random.default_rng(seed)
    noise = params.measurement.phq9_noise_sd * rng.standard_normal(sev.shape)
    return np.clip(np.round(sev + noise), 0, 27)


def _last_index(rows: NDArray[np.bool_]) -> NDArray[np.int64]:
    """Per column, the last row index where ``rows`` is true (-1 if none)."""
    t = rows.shape[0]
    flipped = rows[::-1].argmax(axis=0)
    return np.where(rows.any(axis=0), t - 1 - flipped, -1)


def _safe_refer(mask: NDArray[np.bool_], actions: NDArray[np.int64]) -> NDArray[np.int64]:
    """Trials refer a patient with suicidal thoughts whatever the arm."""
    return np.where(mask[np.arange(len(mask)), actions], actions, int(Action.REFER_SPECIALIST))


def as_protocol(mask: NDArray[np.bool_], actions: NDArray[np.int64]) -> NDArray[np.int64]:
    """A trial arm's planned actions as given: a blocked step becomes continue, and
    a patient with suicidal thoughts is referred whatever the arm."""
    allowed = np.where(mask[np.arange(len(mask)), actions], actions, int(Action.CONTINUE))
    return _safe_refer(mask, allowed)


def policy_arm(policy: Policy, rng: np.random.Generator) -> ActionFn:
    """A trial arm that follows ``policy``, sampling its actions with ``rng``."""

    def act(obs: NDArray[np.float32], mask: NDArray[np.bool_], week: int) -> NDArray[np.int64]:
        return sample_actions(policy, obs, mask, rng)[0]

    return act


def scripted(schedule: dict[int, Action]) -> ActionFn:
    """A trial arm: ``schedule[week]`` is done at that week, otherwise continue."""

    def act(obs: NDArray[np.float32], mask: NDArray[np.bool_], week: int) -> NDArray[np.int64]:
        return as_protocol(mask, np.full(len(obs), int(schedule.get(week, Action.CONTINUE)), dtype=np.int64))

    return act


def rct_eligible(state: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Typical antidepressant-trial inclusion (Zimmerman 2015; Wisniewski 2009):
    at least moderately severe (PHQ-9 >= 14 at screening), episode not chronic,
    at most three prior episodes."""
    return (state[:, S.O_PHQ] >= 14) & (state[:, S.CHRON] == 0) & (state[:, S.PRIOR] <= 3)


def _stard_targets(params: SimParams, n: int, seed: int) -> list[Target]:
    act = policy_arm(StardPolicy(), np.random.default_rng(seed + 1))
    weeks = 4 * 14 + 6
    run = run_cohort(act, n, weeks, seed=seed, params=params, settings=EnvSettings(horizon=weeks),
                     record=(S.SEV, S.LEVEL, S.W_STEP, S.DROPPED))
    sev, level, wstep = run.column(S.SEV), run.column(S.LEVEL), run.column(S.W_STEP)
    valid = run.active  # in care at that week (the dropout week itself is not assessed)
    assess = _assess(sev, params, seed + 2)
    baseline = assess[0]

    rates: list[float] = []
    counts: list[int] = []
    attrition: list[float] = []
    level1_exit = None
    weeks_run = sev.shape[0] - 1
    for lvl in range(1, 5):
        on_level = (level == lvl) & (wstep <= 14) & valid
        entered = on_level.any(axis=0)
        exit_t = _last_index(on_level)
        idx = np.flatnonzero(entered)
        remitted = assess[exit_t[idx], idx] < 5
        rates.append(float(remitted.mean()))
        counts.append(len(idx))
        # left care while on this level: in care at the last week on it, gone the week after
        after = np.minimum(exit_t[idx] + 1, weeks_run)
        attrition.append(float((~valid[after, idx] & (exit_t[idx] < weeks_run)).mean()))
        if lvl == 1:
            level1_exit = exit_t
    assert level1_exit is not None
    all_idx = np.arange(sev.shape[1])
    exit1 = assess[level1_exit, all_idx]
    remission1 = exit1 < 5
    response1 = exit1 <= 0.5 * baseline

    # weeks to first remission at a scheduled level-1 visit, among level-1 remitters
    visit_rows = [w for w in STARD_VISITS if w <= 14]
    first_visit = np.full(len(all_idx), np.inf)
    for w in reversed(visit_rows):
        at_visit = (level == 1) & (wstep == w) & valid
        t = _last_index(at_visit)
        seen = t >= 0
        remit_here = np.zeros(len(all_idx), dtype=bool)
        remit_here[seen] = assess[t[seen], all_idx[seen]] < 5
        first_visit = np.where(remit_here, w, first_visit)
    remitters = remission1 & np.isfinite(first_visit)
    late_share = float((first_visit[remitters] > 8).mean())
    cumulative = 1.0 - float(np.prod([1.0 - r for r in rates]))

    trivedi = "STAR*D level 1 (Trivedi 2006)"
    rush = "STAR*D (Rush 2006)"
    out = [
        Target("remission_level1", "remission after first SSRI step (12-14 weeks)", 100 * remission1.mean(),
               28, 33, "%", trivedi, n),
        Target("response_level1", "response after first SSRI step", 100 * response1.mean(), 42, 52, "%",
               trivedi, n),
    ]
    reported = (36.8, 30.6, 13.7, 13.0)
    for lvl, (rate, count, rep) in enumerate(zip(rates, counts, reported, strict=True), start=1):
        tol = 6.0 if lvl <= 2 else 5.0
        out.append(Target(f"remission_level{lvl}_of4", f"remission at level {lvl} (reported {rep} %)",
                          100 * rate, rep - tol, rep + tol, "%", rush, count))
    out.append(Target("attrition_level1", "leaving care during level 1 (up to 14 weeks)", 100 * attrition[0],
                      21, 31, "%", "STAR*D level 1 (Warden 2007: 26 %)", n))
    out.append(Target("attrition_level2", "leaving care during level 2", 100 * attrition[1], 19, 29, "%",
                      "STAR*D level 2 (Warden 2009: 20 % augment, 27 % switch)", counts[1]))
    out.append(Target("cumulative_remission", "cumulative remission over 4 levels (reported 67 %)",
                      100 * cumulative, 55, 70, "%", rush, n))
    out.append(Target("late_remitters_level1", "share of level-1 remitters who remit after week 8",
                      100 * late_share, 30, 50, "%", trivedi, int(remitters.sum())))
    return out


def prompt_access(state: NDArray[np.float64]) -> None:
    """Efficacy trials start the therapy at randomisation: no waiting list."""
    state[:, S.WAIT_PSY] = 0.0
    state[:, S.WAIT_REF] = 0.0


def _rct(params: SimParams, n: int, seed: int, weeks: int, initial: str, schedule: dict[int, Action],
         record: tuple[D.S, ...] = (S.SEV, S.DROPPED)) -> CohortRun:
    settings = EnvSettings(horizon=weeks, initial_treatment=initial)  # type: ignore[arg-type]
    return run_cohort(scripted(schedule), n, weeks, seed=seed, params=params, settings=settings,
                      record=record, eligible=rct_eligible, setup=prompt_access)


def _responders_itt(run: CohortRun, params: SimParams, seed: int) -> NDArray[np.bool_]:
    """Response (>= 50 % reduction) at the end; dropouts count as non-responders."""
    assess = _assess(run.column(S.SEV), params, seed)
    return (assess[-1] <= 0.5 * assess[0]) & run.active[-1]


def _trial_targets(params: SimParams, n: int, seed: int) -> list[Target]:
    cipriani = "Cipriani 2018 network meta-analysis"
    drug = _rct(params, n, seed, 8, "ssri", {2: Action.RAISE_DOSE})
    placebo = _rct(params, n, seed, 8, "none", {})
    drug_resp = _responders_itt(drug, params, seed + 3)
    placebo_resp = _responders_itt(placebo, params, seed + 3)
    enrolled = drug.columns.shape[1]

    psy = _rct(params, n, seed, 12, "none", {0: Action.ADD_PSYCHOTHERAPY})
    usual = _rct(params, n, seed, 12, "none", {})
    # Hedges' g on the end-of-treatment scores, last observation carried forward
    end_psy = _assess(_locf_end(psy), params, seed + 4)
    end_usual = _assess(_locf_end(usual), params, seed + 5)
    pooled = np.sqrt((end_psy.var(ddof=1) + end_usual.var(ddof=1)) / 2)
    g = float((end_usual.mean() - end_psy.mean()) / pooled)

    drug12 = _rct(params, n, seed, 12, "ssri", {2: Action.RAISE_DOSE})
    combined = _rct(params, n, seed, 12, "ssri", {0: Action.ADD_PSYCHOTHERAPY, 2: Action.RAISE_DOSE})
    rr = _responders_itt(combined, params, seed + 6).mean() / _responders_itt(drug12, params, seed + 6).mean()
    return [
        Target("response_8w_drug", "8-week response, antidepressant", 100 * drug_resp.mean(), 52, 62, "%",
               cipriani, enrolled),
        Target("response_8w_placebo", "8-week response, placebo", 100 * placebo_resp.mean(), 38, 48, "%",
               cipriani, enrolled),
        Target("psychotherapy_g", "psychotherapy vs usual care effect size (Hedges' g)", g, 0.4, 0.7, "g",
               "Cuijpers meta-analyses", enrolled),
        Target("combined_rr", "combined drug + therapy vs drug alone, response risk ratio", float(rr), 1.15,
               1.35, "RR", "Cuijpers 2020", enrolled),
    ]


def _locf_end(run: CohortRun) -> NDArray[np.float32]:
    """True severity at the last week each patient was in care."""
    sev = run.column(S.SEV)
    last = _last_index(run.active)
    return sev[last, np.arange(sev.shape[1])]


def _digital_targets(params: SimParams, n: int, seed: int) -> list[Target]:
    out = []
    for action, key, low, high, source in (
        (Action.ADD_DIGITAL_UNGUIDED, "dropout_digital_unguided", 26, 48, "Linardon 2020; Karyotaki 2017"),
        (Action.ADD_DIGITAL_GUIDED, "dropout_digital_guided", 8, 15, "Linardon 2020; Karyotaki 2017"),
    ):
        weeks = 10  # a typical programme length
        settings = EnvSettings(horizon=weeks, initial_treatment="none")
        run = run_cohort(scripted({0: action}), n, weeks, seed=seed, params=params, settings=settings,
                         record=(S.DIG_DROPOUTS, S.DROPPED),
                         eligible=lambda s: s[:, S.DIG_ACCESS] > 0)
        stopped = (run.column(S.DIG_DROPOUTS)[-1] > 0) | ~run.active[-1]
        kind = "unguided" if action == Action.ADD_DIGITAL_UNGUIDED else "human-guided"
        out.append(Target(key, f"dropout, {kind} digital CBT (10 weeks)", 100 * stopped.mean(), low, high, "%",
                          source, run.columns.shape[1]))
    return out


def _retest_target(params: SimParams, n: int, seed: int) -> Target:
    """Standard error of measurement from two assessments of the same true state."""
    rng = np.random.default_rng(seed)
    settings = EnvSettings()
    k = D.kernel_params(params, settings)
    state = D.initial_state(n, params, settings, rng, k)
    first = D.remeasure(state, settings, rng, k)[:, S.O_PHQ]
    second = D.remeasure(state, settings, rng, k)[:, S.O_PHQ]
    sem = float(np.std(first - second, ddof=1) / np.sqrt(2))
    return Target("phq9_retest_se", "PHQ-9 retest standard error", sem, 2, 3, "points",
                  "Kroenke 2001; Löwe 2004", n)


def calibrate(
    params: SimParams | None = None, sizes: CalibrationSizes | None = None, seed: int = 2026
) -> list[Target]:
    """Run every calibration protocol and return the table rows."""
    from evaluation.strategies import strategy_targets  # it builds on this module's helpers

    params = params if params is not None else load_params()
    sizes = sizes if sizes is not None else CalibrationSizes()
    return [
        *_stard_targets(params, sizes.stard, seed),
        *_trial_targets(params, sizes.rct, seed + 10),
        *_digital_targets(params, sizes.digital, seed + 20),
        _retest_target(params, sizes.digital, seed + 30),
        *strategy_targets(params, sizes.strategy, seed + 40),
    ]


def format_table(targets: list[Target]) -> str:
    """A plain-text table: quantity, simulated value, band, in/out, source."""
    header = f"{'quantity':<62} {'simulated':>10} {'target band':>14}  {'':4} source"
    lines: list[str] = []
    titles = {"protocol": "One protocol's path (STAR*D, trials, programmes)",
              "strategy": "Strategies compared as trials compared them"}
    for section in dict.fromkeys(t.section for t in targets):
        lines += ["", titles.get(section, section), header, "-" * len(header)]
        for t in (t for t in targets if t.section == section):
            value = f"{t.value:.1f} %" if t.unit == "%" else f"{t.value:.2f}"
            band = f"{t.low:g}-{t.high:g}" + (" %" if t.unit == "%" else "")
            lines.append(f"{t.quantity:<62} {value:>10} {band:>14}  {'in' if t.inside else 'OUT':4} {t.source}")
    inside = sum(t.inside for t in targets)
    lines.append(f"{inside}/{len(targets)} inside their bands")
    return "\n".join(lines)
