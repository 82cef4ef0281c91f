"""Pure, batched patient-response dynamics.

The state of ``n`` patients is one float64 array of shape (n, N_STATE) whose
columns are named by :class:`S`. :func:`initial_state` and :func:`step` take
the state, the calibrated :class:`~envs.params.SimParams`, the user's
:class:`~envs.params.EnvSettings` and an explicit ``numpy.random.Generator``
and return new arrays: nothing is mutated in place, nothing is global, so the
gym.Env and the VectorEnv are thin shells and a rollout is reproducible from
its seed.

Each step draws one fixed block of normals and one of uniforms from the
generator, whatever the parameters and actions, so runs with the same seed
share their noise (common random numbers: the calibration objective stays
smooth in the parameters). The per-patient update is then a deterministic
function of (state, action, noise), compiled with numba: numpy calls on
one-patient arrays cost about a microsecond each, and a single gym.Env step
would otherwise spend ~1 ms in interpreter overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

import numba
import numpy as np
from numpy.typing import NDArray
from scipy.special import ndtri

from envs.params import EnvSettings, SimParams
from envs.rules import N_RULES, blocking_rules, rule_hits_scalar
from envs.spec import (
    ACTION_NAMES,
    DRUG_CLASSES,
    FEATURE_NAMES,
    MASK_PREFIX,
    MASKABLE_FEATURES,
    MAX_DOSE_LEVEL,
    MAX_TREATMENT_LEVEL,
    N_ACTIONS,
    N_FEATURES,
    Action,
)

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]
Noise = NDArray[np.float32]

N_CLASSES = len(DRUG_CLASSES)

#: The reward's cost weight is per this many GBP (reward_weights["cost"]).
COST_UNIT = 100.0


class S(IntEnum):
    """Columns of the state array."""

    # hidden clinical state
    SEV = 0  # true severity, PHQ-9 scale
    ANX = 1  # true anxiety, GAD-7 scale
    SEV0 = 2  # severity at intake
    ANX0 = 3
    NAT = 4  # untreated target severity (natural course)
    CHRON = 5  # chronic episode (0/1)
    TR = 6  # treatment-resistant (0/1)
    U_CLASS = 7  # 7..10: responsiveness latent per drug class, N(0,1)
    FAILS = 11  # failed steps so far
    R_DRUG = 12  # responder to the current drug (0/1)
    R_AUG = 13
    R_PSY = 14
    R_DIG = 15
    ADH_PROP = 16  # adherence propensity
    SE_SENS = 17  # side-effect sensitivity
    ENG_BASE = 18  # engagement propensity
    ENG = 19  # engagement with care
    DIG_ENG = 20  # engagement with the digital programme (habituates)
    DROP_PROP = 21  # dropout log-odds offset
    SUIC = 22  # suicidality propensity
    SIDE_EFF = 23  # true side-effect burden (0-10)
    ADH = 24  # true share of doses taken
    IN_REM = 25  # currently in remission (0/1)
    DROPPED = 26  # left care (0/1): terminal
    DIG_DROPOUTS = 27  # digital programmes discontinued so far
    # demographics (observed)
    DIG_ACCESS = 28
    AGE_BAND = 29
    SEX = 30
    PRIOR = 31
    # treatment
    DRUG_CLASS = 32  # -1 none, else index into DRUG_CLASSES
    DOSE = 33
    W_DRUG = 34
    W_DOSE = 35
    AUG = 36
    W_AUG = 37
    PSY = 38
    W_PSY = 39
    DIG = 40  # 0 none, 1 guided, 2 unguided
    W_DIG = 41
    REF = 42
    W_REF = 43
    LEVEL = 44
    W_STEP = 45
    T = 46
    # what has been observed (carried forward when missing)
    O_PHQ = 47
    O_ITEM9 = 48
    O_GAD = 49
    O_WSM = 50  # weeks since PHQ-9 measurement
    O_PHQ_H1 = 51  # 51..54: observed PHQ-9 1..4 weeks ago (carried forward)
    O_SE = 55
    O_ADH = 56
    O_SLEEP = 57
    O_STEPS = 58
    M_PHQ = 59  # 59..65: fresh-this-week indicators, in MASKABLE_FEATURES order
    NS_RESP = 66  # responder to the non-specific effect of care (placebo responder, 0/1)
    O_PHQ0 = 67  # PHQ-9 observed at intake
    # Responder types, drawn at intake: the patient's latent response to each
    # treatment they could be offered (drug slot j of class c, augmentation,
    # psychotherapy, digital CBT), so a treatment tried under any policy meets
    # the same patient.
    Z_DRUG = 68  # 68..79: class c, slot j at 68 + DRUGS_PER_CLASS * c + j
    Z_AUG = 80
    Z_PSY = 81
    Z_DIG = 82
    TRIED = 83  # 83..86: drugs tried per class
    # long-term course and the cost of doing more (spec version 2)
    O_WELL = 87  # observed weeks in sustained remission (feature weeks_well)
    WELL = 88  # responded or remitted in this episode and not relapsed since: at risk of relapse
    WAIT_PSY = 89  # weeks this patient waits for psychotherapy to start once referred (drawn at intake)
    WAIT_REF = 90  # weeks this patient waits for specialist care to start
    W_OFF = 91  # weeks since the antidepressant was stopped (-1: never stopped)
    LAST_CLASS = 92  # drug class before a taper (-1: none), restarted on a re-challenge
    COST = 93  # cumulative cost of care so far (GBP, envs.params cost model)
    RELAPSES = 94  # relapses so far
    W_WELL = 95  # weeks since the patient became well (WELL)
    NUDGES = 96  # recent engagement nudges (decaying count): repeated prompts lose effect
    N_STATE = 97


N_STATE = int(S.N_STATE)

# Module-level ints are compile-time constants inside numba kernels.
SEV, ANX, SEV0, ANX0, NAT, CHRON, TR, U_CLASS = (int(S.SEV), int(S.ANX), int(S.SEV0), int(S.ANX0),
                                                 int(S.NAT), int(S.CHRON), int(S.TR), int(S.U_CLASS))
FAILS, R_DRUG, R_AUG, R_PSY, R_DIG = int(S.FAILS), int(S.R_DRUG), int(S.R_AUG), int(S.R_PSY), int(S.R_DIG)
ADH_PROP, SE_SENS, ENG_BASE, ENG, DIG_ENG = (int(S.ADH_PROP), int(S.SE_SENS), int(S.ENG_BASE),
                                             int(S.ENG), int(S.DIG_ENG))
DROP_PROP, SUIC, SIDE_EFF, ADH, IN_REM = (int(S.DROP_PROP), int(S.SUIC), int(S.SIDE_EFF), int(S.ADH),
                                          int(S.IN_REM))
DROPPED, DIG_DROPOUTS = int(S.DROPPED), int(S.DIG_DROPOUTS)
DIG_ACCESS, AGE_BAND, SEX, PRIOR = int(S.DIG_ACCESS), int(S.AGE_BAND), int(S.SEX), int(S.PRIOR)
DRUG_CLASS, DOSE, W_DRUG, W_DOSE, AUG, W_AUG = (int(S.DRUG_CLASS), int(S.DOSE), int(S.W_DRUG),
                                                int(S.W_DOSE), int(S.AUG), int(S.W_AUG))
PSY, W_PSY, DIG, W_DIG, REF, W_REF = (int(S.PSY), int(S.W_PSY), int(S.DIG), int(S.W_DIG), int(S.REF),
                                      int(S.W_REF))
LEVEL, W_STEP, T, NS_RESP, O_PHQ0 = int(S.LEVEL), int(S.W_STEP), int(S.T), int(S.NS_RESP), int(S.O_PHQ0)
Z_DRUG, Z_AUG, Z_PSY, Z_DIG, TRIED = int(S.Z_DRUG), int(S.Z_AUG), int(S.Z_PSY), int(S.Z_DIG), int(S.TRIED)
O_WELL, WELL, WAIT_PSY, WAIT_REF, W_OFF = int(S.O_WELL), int(S.WELL), int(S.WAIT_PSY), int(S.WAIT_REF), int(S.W_OFF)
LAST_CLASS, COST, RELAPSES, W_WELL = int(S.LAST_CLASS), int(S.COST), int(S.RELAPSES), int(S.W_WELL)
NUDGES = int(S.NUDGES)
DRUGS_PER_CLASS = 3
O_PHQ, O_ITEM9, O_GAD, O_WSM, O_PHQ_H1 = (int(S.O_PHQ), int(S.O_ITEM9), int(S.O_GAD), int(S.O_WSM),
                                          int(S.O_PHQ_H1))
O_SE, O_ADH, O_SLEEP, O_STEPS, M_PHQ = (int(S.O_SE), int(S.O_ADH), int(S.O_SLEEP), int(S.O_STEPS),
                                        int(S.M_PHQ))
A_CONTINUE, A_RAISE, A_WITHIN, A_CLASS, A_AUGMENT = 0, 1, 2, 3, 4
A_PSY, A_DIG_GUIDED, A_DIG_UNGUIDED, A_NUDGE, A_REFER, A_TAPER = 5, 6, 7, 8, 9, 10
assert [int(a) for a in Action] == list(range(11))

# Noise drawn every step (fixed shapes: common random numbers).
# normals: 0 severity, 1 anxiety, 2-8 measurement (see _measure)
# uniforms: 0 spontaneous remission, 1 relapse, 2 digital dropout, 3 care dropout,
#           4-8 measurement
N_NORMAL = 9
N_UNIFORM = 9
_MEASURE_NORMAL = 2
_MEASURE_UNIFORM = 4

# Where each observation feature comes from in the state (phq9_change_4w is computed).
_FEATURE_SOURCE: dict[str, int] = {
    "phq9": O_PHQ,
    "phq9_item9": O_ITEM9,
    "phq9_at_intake": O_PHQ0,
    "gad7": O_GAD,
    "weeks_since_measurement": O_WSM,
    "treatment_level": LEVEL,
    "weeks_on_step": W_STEP,
    "dose_level": DOSE,
    "weeks_on_dose": W_DOSE,
    "on_psychotherapy": PSY,
    "on_digital": DIG,
    "on_augmentation": AUG,
    "in_specialist_care": REF,
    "side_effect_burden": O_SE,
    "adherence": O_ADH,
    "engagement": ENG,
    "weeks_in_care": T,
    "age_band": AGE_BAND,
    "sex": SEX,
    "prior_episodes": PRIOR,
    "digital_access": DIG_ACCESS,
    "weeks_well": O_WELL,
    "sleep_hours": O_SLEEP,
    "daily_steps": O_STEPS,
}
for _i, _name in enumerate(MASKABLE_FEATURES):
    _FEATURE_SOURCE[MASK_PREFIX + _name] = M_PHQ + _i
_OBS_POSITIONS = np.array([i for i, f in enumerate(FEATURE_NAMES) if f in _FEATURE_SOURCE], dtype=np.int64)
_OBS_STATE_COLS = np.array([_FEATURE_SOURCE[FEATURE_NAMES[i]] for i in _OBS_POSITIONS], dtype=np.int64)
CHANGE_POS = FEATURE_NAMES.index("phq9_change_4w")
assert len(_OBS_POSITIONS) == N_FEATURES - 1


class KernelParams(NamedTuple):
    """SimParams and EnvSettings flattened for the compiled kernel."""

    # response
    tr_factor: float
    z_drug: float
    rho_class: float
    per_fail: float
    drug_resp: float
    drug_partial: float
    class_effect: tuple[float, ...]
    dose_factor: tuple[float, ...]
    tau_drug: float
    z_aug: float
    aug_resp: float
    aug_partial: float
    tau_aug: float
    z_psy: float
    psy_resp: float
    psy_partial: float
    tau_psy: float
    z_dig: float
    dig_resp: float
    dig_partial: float
    tau_dig: float
    spec_effect: float
    tau_spec: float
    ns_prob: float
    ns_resp: float
    ns_partial: float
    ns_chronic: float
    tau_ns: float
    # course
    rate: float
    proc_sd: float
    anx_proc_sd: float
    sr_hazard: float
    sr_factor: float
    relapse: float
    relapse_treated: float
    relapse_per_prior: float
    remission: float
    # tolerability
    class_se: tuple[float, ...]
    aug_se: float
    se_tau: float
    se_persist: float
    adh_loss: float
    adh_full: float
    # engagement
    eng_revert: float
    eng_loss: float
    nudge: float
    hab_unguided: float
    hab_guided: float
    dig_start: float
    dig_drop_unguided: float
    dig_drop_guided: float
    support: float
    # dropout
    drop_base: float
    drop_se: float
    drop_noimp: float
    drop_diseng: float
    drop_fails: float
    # measurement
    phq_sd: float
    gad_sd: float
    resp_logit: float
    resp_eng: float
    resp_sev: float
    se_report: float
    adh_report: float
    i9_base: float
    i9_sev: float
    i9_thresholds: tuple[float, ...]
    i9_spec: float
    wear_p: float
    sleep_mean: float
    sleep_sev: float
    sleep_sd: float
    steps_mean: float
    steps_sev: float
    steps_sd: float
    # settings
    obs_noise: float
    missingness: float
    wearables: float
    w_improve: float
    w_remission: float
    w_side: float
    w_dropout: float
    w_cost: float
    w_invalid: float
    costs: tuple[float, ...]
    # long-term course (spec version 2)
    relapse_per_fail: float
    relapse_resid: float
    resolution_rate: float
    resolved_share: float
    well_share: float
    # the cost of doing more
    disc_se: float
    disc_tau: float
    complexity_adh: float
    drop_change: float
    drop_burden: float
    weekly_costs: tuple[float, ...]
    psy_course: float
    dig_course: float
    relapse_unresolved: float
    nondrug_resist: float
    relapse_grace: float
    adh_decline_well: float
    psy_support: float
    nudge_habituation: float
    nudge_memory: float

# Offsets of each KernelParams field in the flat parameter array the kernel reads
# (tuple fields take consecutive slots). Checked against KernelParams below.
K_TR_FACTOR = 0
K_Z_DRUG = 1
K_RHO_CLASS = 2
K_PER_FAIL = 3
K_DRUG_RESP = 4
K_DRUG_PARTIAL = 5
K_CLASS_EFFECT = 6
K_DOSE_FACTOR = 10
K_TAU_DRUG = 14
K_Z_AUG = 15
K_AUG_RESP = 16
K_AUG_PARTIAL = 17
K_TAU_AUG = 18
K_Z_PSY = 19
K_PSY_RESP = 20
K_PSY_PARTIAL = 21
K_TAU_PSY = 22
K_Z_DIG = 23
K_DIG_RESP = 24
K_DIG_PARTIAL = 25
K_TAU_DIG = 26
K_SPEC_EFFECT = 27
K_TAU_SPEC = 28
K_NS_PROB = 29
K_NS_RESP = 30
K_NS_PARTIAL = 31
K_NS_CHRONIC = 32
K_TAU_NS = 33
K_RATE = 34
K_PROC_SD = 35
K_ANX_PROC_SD = 36
K_SR_HAZARD = 37
K_SR_FACTOR = 38
K_RELAPSE = 39
K_RELAPSE_TREATED = 40
K_RELAPSE_PER_PRIOR = 41
K_REMISSION = 42
K_CLASS_SE = 43
K_AUG_SE = 47
K_SE_TAU = 48
K_SE_PERSIST = 49
K_ADH_LOSS = 50
K_ADH_FULL = 51
K_ENG_REVERT = 52
K_ENG_LOSS = 53
K_NUDGE = 54
K_HAB_UNGUIDED = 55
K_HAB_GUIDED = 56
K_DIG_START = 57
K_DIG_DROP_UNGUIDED = 58
K_DIG_DROP_GUIDED = 59
K_SUPPORT = 60
K_DROP_BASE = 61
K_DROP_SE = 62
K_DROP_NOIMP = 63
K_DROP_DISENG = 64
K_DROP_FAILS = 65
K_PHQ_SD = 66
K_GAD_SD = 67
K_RESP_LOGIT = 68
K_RESP_ENG = 69
K_RESP_SEV = 70
K_SE_REPORT = 71
K_ADH_REPORT = 72
K_I9_BASE = 73
K_I9_SEV = 74
K_I9_THRESHOLDS = 75
K_I9_SPEC = 78
K_WEAR_P = 79
K_SLEEP_MEAN = 80
K_SLEEP_SEV = 81
K_SLEEP_SD = 82
K_STEPS_MEAN = 83
K_STEPS_SEV = 84
K_STEPS_SD = 85
K_OBS_NOISE = 86
K_MISSINGNESS = 87
K_WEARABLES = 88
K_W_IMPROVE = 89
K_W_REMISSION = 90
K_W_SIDE = 91
K_W_DROPOUT = 92
K_W_COST = 93
K_W_INVALID = 94
K_COSTS = 95
K_RELAPSE_PER_FAIL = 106
K_RELAPSE_RESID = 107
K_RESOLUTION_RATE = 108
K_RESOLVED_SHARE = 109
K_WELL_SHARE = 110
K_DISC_SE = 111
K_DISC_TAU = 112
K_COMPLEXITY_ADH = 113
K_DROP_CHANGE = 114
K_DROP_BURDEN = 115
K_WEEKLY_COSTS = 116  # drug, augmentation, psychotherapy, guided digital, unguided digital, specialist
K_PSY_COURSE = 122
K_DIG_COURSE = 123
K_RELAPSE_UNRESOLVED = 124
K_NONDRUG_RESIST = 125
K_RELAPSE_GRACE = 126
K_ADH_DECLINE_WELL = 127
K_PSY_SUPPORT = 128
K_NUDGE_HABITUATION = 129
K_NUDGE_MEMORY = 130
N_KERNEL_PARAMS = 131


def _z(prob: float) -> float:
    """N(0,1) threshold above which a latent draw responds with probability ``prob``."""
    return float(ndtri(1.0 - min(max(prob, 1e-9), 1.0 - 1e-9)))


def kernel_params(params: SimParams, settings: EnvSettings) -> FloatArray:
    """SimParams and EnvSettings as the flat float64 array the kernel reads."""
    return _flatten(_named_kernel_params(params, settings))


def _flatten(k: KernelParams) -> FloatArray:
    flat: list[float] = []
    names = KernelParams._fields
    for i, (name, value) in enumerate(zip(names, k, strict=True)):
        offset = globals()[f"K_{name.upper()}"]
        end = globals()[f"K_{names[i + 1].upper()}"] if i + 1 < len(names) else N_KERNEL_PARAMS
        values = value if isinstance(value, tuple) else (value,)
        if offset != len(flat) or len(values) != end - offset:
            raise ValueError(f"simulator parameter {name!r} must have {end - offset} value(s), got {value!r}")
        flat.extend(values)
    if len(flat) != N_KERNEL_PARAMS:
        raise AssertionError("kernel parameter layout is stale")
    return np.asarray(flat, dtype=np.float64)


def _named_kernel_params(params: SimParams, settings: EnvSettings) -> KernelParams:
    r, c, t, e, d, m = (params.response, params.course, params.tolerability, params.engagement,
                        params.dropout, params.measurement)
    costs = params.costs
    w = settings.reward_weights
    return KernelParams(
        r.resistant_effect_factor, _z(r.drug_responder_prob), r.within_class_correlation,
        r.resistance_per_failed_step, r.drug_effect_responder, r.drug_effect_partial,
        tuple(r.class_effect), tuple(r.dose_factor), r.onset_tau_drug,
        _z(r.augment_responder_prob), r.augment_effect_responder, r.augment_effect_partial,
        r.onset_tau_augment,
        _z(r.psychotherapy_responder_prob), r.psychotherapy_effect_responder,
        r.psychotherapy_effect_partial, r.onset_tau_psychotherapy,
        _z(r.digital_responder_prob), r.digital_effect_responder, r.digital_effect_partial,
        r.onset_tau_digital, r.specialist_effect, r.onset_tau_specialist,
        r.nonspecific_responder_prob, r.nonspecific_effect_responder, r.nonspecific_effect_partial,
        r.nonspecific_chronic_factor, r.onset_tau_nonspecific,
        c.approach_rate, c.process_noise_sd, c.anxiety_process_noise_sd,
        c.spontaneous_remission_hazard, c.spontaneous_remission_factor, c.relapse_hazard,
        c.relapse_hazard_on_treatment, c.relapse_hazard_per_prior_episode, c.remission_threshold,
        tuple(t.class_side_effects), t.augment_side_effects, t.side_effect_habituation_tau,
        t.side_effect_persistent_share, t.adherence_loss_per_side_effect, t.adherence_full_effect,
        e.revert_rate, e.loss_when_not_improving, e.nudge_boost, e.habituation_unguided,
        e.habituation_guided, e.digital_start_engagement, e.digital_dropout_base_unguided,
        e.digital_dropout_base_guided, e.human_support,
        d.base_logit, d.side_effect_coef, d.no_improvement_coef, d.disengagement_coef, d.failed_step_coef,
        m.phq9_noise_sd, m.gad7_noise_sd, m.response_logit, m.response_engagement_coef,
        m.response_severity_coef, m.side_effect_report_prob, m.adherence_report_prob,
        m.item9_base, m.item9_severity_coef, tuple(m.item9_thresholds), m.specialist_item9_reduction,
        m.wearable_observed_prob, m.sleep_mean, m.sleep_severity_coef, m.sleep_noise_sd,
        m.steps_mean, m.steps_severity_coef, m.steps_noise_sd,
        float(settings.observation_noise), float(settings.missingness), float(settings.wearables),
        w["improvement"], w["remission"], w["side_effects"], w["dropout"], w["cost"], w["invalid_action"],
        tuple({**costs.action_costs(), **settings.action_costs}[name] for name in ACTION_NAMES),
        c.relapse_per_failed_step, c.relapse_residual_coef, c.episode_resolution_rate, c.resolved_share,
        c.well_response_share,
        t.discontinuation_side_effects, t.discontinuation_tau, t.complexity_adherence_loss,
        d.change_coef, d.burden_coef,
        (costs.weekly_drug, costs.weekly_augmentation, costs.weekly_psychotherapy, costs.weekly_digital_guided,
         costs.weekly_digital_unguided, costs.weekly_specialist),
        costs.psychotherapy_course_weeks, costs.digital_course_weeks,
        c.relapse_unresolved_coef, r.nondrug_resistance_weight, c.relapse_grace_weeks,
        t.adherence_decline_when_well, e.psychotherapy_support_share, e.nudge_habituation, e.nudge_memory,
    )


# --------------------------------------------------------------------------- kernel


@numba.njit(cache=True, error_model="numpy")
def _onset(weeks: float, tau: float) -> float:
    return 1.0 - math.exp(-weeks / tau)


@numba.njit(cache=True, error_model="numpy")
def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@numba.njit(cache=True, error_model="numpy")
def _clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


@numba.njit(cache=True, error_model="numpy")
def _se_fade(weeks: float, k: FloatArray) -> float:
    """Share of a drug's side effects left ``weeks`` after it started: early ones fade."""
    return k[K_SE_PERSIST] + (1.0 - k[K_SE_PERSIST]) * math.exp(-weeks / k[K_SE_TAU])


@numba.njit(cache=True, error_model="numpy")
def _specialist_started(s: FloatArray) -> bool:
    """In specialist care and past the wait for it."""
    return s[REF] > 0 and s[W_REF] > 0


@numba.njit(cache=True, error_model="numpy")
def _row_hits(s: FloatArray, hits: BoolArray) -> None:
    """The clinical rules of envs.rules, read from what this patient's observation shows."""
    rule_hits_scalar(s[O_ITEM9], s[DOSE], s[W_DOSE], s[W_STEP], s[AUG], s[PSY], s[DIG], s[DIG_ACCESS],
                     s[REF], s[O_WELL], hits)


@numba.njit(cache=True, error_model="numpy")
def _observe_row(s: FloatArray, cols: IntArray, positions: IntArray, obs: NDArray[np.float32]) -> None:
    for j in range(cols.shape[0]):
        obs[positions[j]] = s[cols[j]]
    obs[CHANGE_POS] = s[O_PHQ] - s[O_PHQ_H1 + 3]


@numba.njit(cache=True, error_model="numpy")
def _blocked_bits(hits: BoolArray, blocks: IntArray) -> int:
    """Bit a is set when some applying rule blocks action a."""
    bits = 0
    for r in range(hits.shape[0]):
        if hits[r]:
            bits |= blocks[r]
    return bits


@numba.njit(cache=True, error_model="numpy")
def _mask_row(s: FloatArray, hits: BoolArray, blocks: IntArray, mask: BoolArray) -> None:
    _row_hits(s, hits)
    bits = _blocked_bits(hits, blocks)
    for a in range(mask.shape[0]):
        mask[a] = (bits >> a) & 1 == 0


@numba.njit(cache=True, error_model="numpy")
def _observe_kernel(
    state: FloatArray, cols: IntArray, positions: IntArray, blocks: IntArray,
    obs: NDArray[np.float32], mask: BoolArray,
) -> None:
    hits = np.zeros(N_RULES, dtype=np.bool_)
    for i in range(state.shape[0]):
        _observe_row(state[i], cols, positions, obs[i])
        _mask_row(state[i], hits, blocks, mask[i])


@numba.njit(cache=True, error_model="numpy")
def _responds(z: float, threshold: float, s: FloatArray, k: FloatArray, resistance_weight: float) -> float:
    """1 when the latent draw ``z`` clears the responder threshold, raised by every
    failed step (``resistance_weight`` scales the shift for non-drug treatments)."""
    return 1.0 if z > threshold + resistance_weight * k[K_PER_FAIL] * s[FAILS] else 0.0


@numba.njit(cache=True, error_model="numpy")
def _drug_responder(s: FloatArray, k: FloatArray, again: bool = False) -> float:
    """Responder to a newly started drug: class latent + this drug's latent vs a
    threshold that rises with every failed step (treatment resistance builds up).
    ``again``: the drug last tried in this class is restarted (its own latent)."""
    cls = int(s[DRUG_CLASS])
    if again:
        slot = int(s[TRIED + cls] - 1.0) % DRUGS_PER_CLASS
    else:
        slot = int(s[TRIED + cls]) % DRUGS_PER_CLASS
        s[TRIED + cls] += 1.0
    z = s[Z_DRUG + DRUGS_PER_CLASS * cls + slot]
    latent = math.sqrt(k[K_RHO_CLASS]) * s[U_CLASS + cls] + math.sqrt(1.0 - k[K_RHO_CLASS]) * z
    return _responds(latent, k[K_Z_DRUG], s, k, 1.0)


@numba.njit(cache=True, error_model="numpy")
def _apply_action(s: FloatArray, a: int, k: FloatArray) -> None:
    """Start, stop or change treatment as action ``a`` says (in place on a row copy)."""
    if a == A_CLASS and s[DRUG_CLASS] < 0 and s[LAST_CLASS] >= 0:
        # re-challenge after a taper: restart the class that worked; not a new step
        s[DRUG_CLASS] = s[LAST_CLASS]
        s[DOSE] = 1.0
        s[W_DOSE] = 0.0
        s[W_DRUG] = 0.0
        s[R_DRUG] = _drug_responder(s, k, True)
        return
    if a == A_TAPER:
        # taper and stop the antidepressant (and any augmenting agent)
        s[LAST_CLASS] = s[DRUG_CLASS]
        s[DRUG_CLASS] = -1.0
        s[DOSE] = 0.0
        s[W_DOSE] = 0.0
        s[W_DRUG] = 0.0
        s[R_DRUG] = 0.0
        s[AUG] = 0.0
        s[R_AUG] = 0.0
        s[W_OFF] = 0.0
        return
    if a == A_RAISE:
        s[DOSE] = min(s[DOSE] + 1.0, MAX_DOSE_LEVEL)
        s[W_DOSE] = 0.0
    elif a == A_WITHIN or a == A_CLASS or a == A_AUGMENT or a == A_PSY:
        # a new step; the one before failed unless the patient was in remission
        s[FAILS] += 1.0 - s[IN_REM]
        s[LEVEL] = min(s[LEVEL] + 1.0, MAX_TREATMENT_LEVEL)
        s[W_STEP] = 0.0
        if a == A_WITHIN or a == A_CLASS:
            if a == A_CLASS:
                # starting a first drug is a "switch" from none to the first class
                s[DRUG_CLASS] = 0.0 if s[DRUG_CLASS] < 0 else (s[DRUG_CLASS] + 1.0) % N_CLASSES
                s[AUG] = 0.0  # a class switch replaces the regimen
            s[DOSE] = 1.0
            s[W_DOSE] = 0.0
            s[W_DRUG] = 0.0
            s[R_DRUG] = _drug_responder(s, k)
        elif a == A_AUGMENT:
            s[AUG] = 1.0
            s[W_AUG] = 0.0
            s[R_AUG] = _responds(s[Z_AUG], k[K_Z_AUG], s, k, 1.0)
        else:
            s[PSY] = 1.0
            s[W_PSY] = -s[WAIT_PSY]  # referred now, therapy starts after this patient's wait
            # treatment resistance is general: failed drug steps lower the chance of
            # responding to psychotherapy too (STAR*D level 2: cognitive therapy
            # remitted no more often than medication, Thase 2007)
            s[R_PSY] = _responds(s[Z_PSY], k[K_Z_PSY], s, k, k[K_NONDRUG_RESIST])
    elif a == A_DIG_GUIDED or a == A_DIG_UNGUIDED:
        s[DIG] = 1.0 if a == A_DIG_GUIDED else 2.0
        s[W_DIG] = 0.0
        s[DIG_ENG] = max(s[ENG], k[K_DIG_START])
        s[R_DIG] = _responds(s[Z_DIG], k[K_Z_DIG], s, k, k[K_NONDRUG_RESIST])
    elif a == A_NUDGE:
        # repeated prompts lose their effect: the boost shrinks with recent nudges
        boost = k[K_NUDGE] / (1.0 + k[K_NUDGE_HABITUATION] * s[NUDGES])
        s[NUDGES] += 1.0
        s[ENG] += boost * (1.0 - s[ENG])
        if s[DIG] > 0:
            s[DIG_ENG] += boost * (1.0 - s[DIG_ENG])
    elif a == A_REFER:
        if s[REF] == 0:
            s[REF] = 1.0
            s[W_REF] = -s[WAIT_REF]  # specialist care starts after this patient's wait


@numba.njit(cache=True, error_model="numpy")
def _treatment_factor(s: FloatArray, k: FloatArray) -> float:
    """Share of the untreated target severity left after all active treatments.

    Each treatment removes a share of what is left (effects saturate); each
    share is size x responsiveness x onset x adherence or engagement.
    """
    left = 1.0
    if s[DRUG_CLASS] >= 0:
        cls = int(s[DRUG_CLASS])
        adherence = min(s[ADH] / k[K_ADH_FULL], 1.0)
        size = k[K_DRUG_RESP] if s[R_DRUG] > 0 else k[K_DRUG_PARTIAL]
        left *= 1.0 - size * k[K_CLASS_EFFECT + cls] * k[K_DOSE_FACTOR + int(s[DOSE])] * adherence * _onset(
            s[W_DRUG], k[K_TAU_DRUG])
        if s[AUG] > 0:
            size = k[K_AUG_RESP] if s[R_AUG] > 0 else k[K_AUG_PARTIAL]
            left *= 1.0 - size * adherence * _onset(s[W_AUG], k[K_TAU_AUG])
    # Face-to-face and digital CBT are one psychological treatment delivered
    # two ways: when both run, the larger effect counts, they do not stack
    # (digital CBT is offered as an alternative or a step before therapy,
    # NICE NG222; Karyotaki 2021 found guided iCBT comparable to face-to-face)
    psychological = 0.0
    if s[PSY] > 0:  # works through attendance
        size = k[K_PSY_RESP] if s[R_PSY] > 0 else k[K_PSY_PARTIAL]
        psychological = size * min(s[ENG] / 0.7, 1.0) * _onset(max(s[W_PSY], 0.0), k[K_TAU_PSY])
    if s[DIG] > 0:  # works through engagement with the programme
        size = k[K_DIG_RESP] if s[R_DIG] > 0 else k[K_DIG_PARTIAL]
        psychological = max(psychological, size * s[DIG_ENG] * _onset(s[W_DIG], k[K_TAU_DIG]))
    left *= 1.0 - psychological
    if s[REF] > 0:
        left *= 1.0 - k[K_SPEC_EFFECT] * _onset(max(s[W_REF], 0.0), k[K_TAU_SPEC])
    size = k[K_NS_RESP] if s[NS_RESP] > 0 else k[K_NS_PARTIAL]
    nonspecific = size * (k[K_NS_CHRONIC] if s[CHRON] > 0 else 1.0) * _onset(s[T], k[K_TAU_NS])
    left *= 1.0 - nonspecific
    if s[TR] > 0:
        # a treatment-resistant patient gets a fraction of every effect, the
        # non-specific one included (placebo response is low in TRD trials)
        left = 1.0 - k[K_TR_FACTOR] * (1.0 - left)
    return left


@numba.njit(cache=True, error_model="numpy")
def _measure(s: FloatArray, k: FloatArray, nrm: Noise, unf: Noise, intake: bool) -> None:
    """Noisy, missing-not-at-random measurements; values carried forward when missing.

    ``nrm`` holds 7 normals (sleep, steps, PHQ-9, GAD-7, item 9, side effects,
    adherence) and ``unf`` 5 uniforms (questionnaire, side-effect report,
    adherence report, sleep, steps); at intake everything is observed.
    """
    noise = k[K_OBS_NOISE]
    if not intake:  # weekly history: H4 <- H3 <- H2 <- H1 <- current
        for j in range(3, 0, -1):
            s[O_PHQ_H1 + j] = s[O_PHQ_H1 + j - 1]
        s[O_PHQ_H1] = s[O_PHQ]
    p_answer = _sigmoid(k[K_RESP_LOGIT] + k[K_RESP_ENG] * (s[ENG] - 0.7) + k[K_RESP_SEV] * (s[SEV] - 14.0) / 10.0)
    questionnaire = intake or unf[0] >= _clip((1.0 - p_answer) * k[K_MISSINGNESS], 0.0, 1.0)
    on_drug = s[DRUG_CLASS] >= 0
    se_reported = on_drug and (intake or unf[1] >= _clip((1.0 - k[K_SE_REPORT]) * k[K_MISSINGNESS], 0.0, 1.0))
    adh_reported = on_drug and (intake or unf[2] >= _clip((1.0 - k[K_ADH_REPORT]) * k[K_MISSINGNESS], 0.0, 1.0))
    wear_p = _clip(1.0 - (1.0 - k[K_WEAR_P]) * k[K_MISSINGNESS], 0.0, 1.0) * k[K_WEARABLES] * (0.6 + 0.4 * s[ENG])
    sleep_seen = unf[3] < wear_p
    steps_seen = unf[4] < wear_p
    if questionnaire:
        phq = _clip(round(s[SEV] + noise * k[K_PHQ_SD] * nrm[2]), 0.0, 27.0)
        s[O_PHQ] = phq
        s[O_GAD] = _clip(round(s[ANX] + noise * k[K_GAD_SD] * nrm[3]), 0.0, 21.0)
        # specialist care lowers suicidality once it has started (not while waiting)
        in_specialist = 1.0 if _specialist_started(s) else 0.0
        latent = k[K_I9_BASE] + k[K_I9_SEV] * (s[SEV] - 14.0) + s[SUIC] - k[K_I9_SPEC] * in_specialist + nrm[4]
        item9 = 0.0
        for j in range(3):
            if latent > k[K_I9_THRESHOLDS + j]:
                item9 += 1.0
        s[O_ITEM9] = min(item9, phq)  # item 9 is part of the total
        s[O_WSM] = 0.0
        # sustained remission as a clinician reads it: counting from the first
        # PHQ-9 below 5, ended only by a PHQ-9 of 10 or more (one noisy 6 does not)
        if phq >= 10.0:
            s[O_WELL] = 0.0
        elif s[O_WELL] > 0 or phq < 5.0:
            s[O_WELL] += 1.0
    else:
        s[O_WSM] += 1.0
        if s[O_WELL] > 0:
            s[O_WELL] += 1.0
    if se_reported:
        s[O_SE] = _clip(round(s[SIDE_EFF] + noise * nrm[5]), 0.0, 10.0)
    if adh_reported:
        s[O_ADH] = _clip(s[ADH] + noise * 0.08 * nrm[6], 0.0, 1.0)
    if sleep_seen:
        sleep = k[K_SLEEP_MEAN] + k[K_SLEEP_SEV] * (s[SEV] - 14.0) + noise * k[K_SLEEP_SD] * nrm[0]
        s[O_SLEEP] = _clip(sleep, 2.0, 14.0)
    if steps_seen:
        steps = k[K_STEPS_MEAN] + k[K_STEPS_SEV] * (s[SEV] - 14.0) + noise * k[K_STEPS_SD] * nrm[1]
        s[O_STEPS] = _clip(steps, 0.0, 40.0)
    s[M_PHQ + 0] = questionnaire
    s[M_PHQ + 1] = questionnaire
    s[M_PHQ + 2] = questionnaire
    s[M_PHQ + 3] = se_reported
    s[M_PHQ + 4] = adh_reported
    s[M_PHQ + 5] = sleep_seen
    s[M_PHQ + 6] = steps_seen
    if intake:
        for j in range(4):
            s[O_PHQ_H1 + j] = s[O_PHQ]
        s[O_PHQ0] = s[O_PHQ]


@numba.njit(cache=True, error_model="numpy")
def _start_first_drug(state: FloatArray, k: FloatArray) -> None:
    for i in range(state.shape[0]):
        state[i, R_DRUG] = _drug_responder(state[i], k)


@numba.njit(cache=True, error_model="numpy")
def _intake_kernel(state: FloatArray, normals: Noise, k: FloatArray) -> None:
    unf = np.zeros(5, dtype=np.float32)
    for i in range(state.shape[0]):
        _measure(state[i], k, normals[i], unf, True)


@numba.njit(cache=True, error_model="numpy")
def _step_kernel(
    state: FloatArray,
    actions: IntArray,
    normals: Noise,
    uniforms: Noise,
    k: FloatArray,
    blocks: IntArray,
    cols: IntArray,
    positions: IntArray,
    out: FloatArray,
    reward: FloatArray,
    invalid: BoolArray,
    obs: NDArray[np.float32],
    mask: BoolArray,
) -> None:
    hits = np.zeros(N_RULES, dtype=np.bool_)
    for i in range(state.shape[0]):
        s = out[i]
        s[:] = state[i]
        reward[i] = 0.0
        invalid[i] = False
        if s[DROPPED] == 0:  # patients who left care stay as they were
            invalid[i], reward[i] = _step_row(s, actions[i], normals[i], uniforms[i], k, blocks, hits)
        _observe_row(s, cols, positions, obs[i])
        _mask_row(s, hits, blocks, mask[i])


@numba.njit(cache=True, error_model="numpy")
def _step_row(
    s: FloatArray, a: int, nrm: Noise, unf: Noise, k: FloatArray, blocks: IntArray, hits: BoolArray
) -> tuple[bool, float]:
    """One patient, one week; returns (action was blocked, reward)."""
    _row_hits(s, hits)
    blocked = (_blocked_bits(hits, blocks) >> a) & 1 == 1
    if blocked:
        a = A_CONTINUE
    prev_sev = s[SEV]
    # a change of antidepressant brings new instructions, early side effects and
    # doubt: the week's dropout hazard rises (STAR*D level 2 lost more patients
    # on a switch, 27 %, than on an augmentation, 20 %: Warden 2009)
    med_change = a == A_WITHIN or a == A_CLASS or a == A_TAPER
    _apply_action(s, a, k)

    # time passes
    on_drug = s[DRUG_CLASS] >= 0
    s[T] += 1.0
    s[W_STEP] += 1.0
    if on_drug:
        s[W_DRUG] += 1.0
        s[W_DOSE] += 1.0
    s[W_AUG] += s[AUG]
    s[W_PSY] += s[PSY]
    s[W_DIG] += 1.0 if s[DIG] > 0 else 0.0
    s[W_REF] += s[REF]
    if s[W_OFF] >= 0:
        s[W_OFF] += 1.0
    s[NUDGES] *= k[K_NUDGE_MEMORY]
    psy_active = s[PSY] > 0 and s[W_PSY] > 0  # past the wait
    ref_active = _specialist_started(s)

    # natural course: spontaneous remission (not in chronic episodes)
    if s[CHRON] == 0 and unf[0] < k[K_SR_HAZARD]:
        s[NAT] = min(s[NAT], k[K_SR_FACTOR] * s[SEV0])
    # Long-term course. While a patient stays well the episode runs its course
    # (the untreated target falls), which is why guidelines continue treatment
    # for months after remission before a taper. The weekly relapse hazard is
    # lower while treatment continues (Geddes 2003), higher after more prior
    # episodes, more failed steps (STAR*D follow-up, Rush 2006) and more
    # residual symptoms (Judd 1998; Rush 2006: responders without remission).
    # Protection by continued treatment works through taking it: a drug protects
    # in proportion to adherence (Geddes 2003's trials enrolled adherent
    # patients); a course of CBT keeps protecting (Cuijpers 2013)
    protection = 1.0 if psy_active else (min(s[ADH] / k[K_ADH_FULL], 1.0) if on_drug else 0.0)
    if s[WELL] > 0:
        s[W_WELL] += 1.0
        # once well, many patients take fewer doses (Olfson 2006: 42 % stop within
        # a month; Sansone 2012: about half adherent at 6 months)
        s[ADH_PROP] -= k[K_ADH_DECLINE_WELL] * s[ADH_PROP]
    if s[WELL] > 0 and s[W_WELL] > k[K_RELAPSE_GRACE]:
        floor = k[K_RESOLVED_SHARE] * s[SEV0]
        # the episode resolves only in remission: residual symptoms mean an
        # incomplete recovery (Judd 1998; Paykel 1995)
        if s[NAT] > floor and s[IN_REM] > 0:
            s[NAT] += k[K_RESOLUTION_RATE] * (floor - s[NAT])
        # the unresolved share of the episode: relapse (the same episode
        # returning) is likeliest in the first months after remission (Frank 1991)
        unresolved = max(s[NAT] - floor, 0.0) / max(s[SEV0] - floor, 1e-6)
        base = k[K_RELAPSE] - (k[K_RELAPSE] - k[K_RELAPSE_TREATED]) * protection
        hazard = (base * (1.0 + k[K_RELAPSE_PER_PRIOR] * s[PRIOR])
                  * math.exp(k[K_RELAPSE_PER_FAIL] * s[FAILS] + k[K_RELAPSE_RESID] * s[SEV]
                             + k[K_RELAPSE_UNRESOLVED] * unresolved))
        if unf[1] < hazard:
            # a new episode: the untreated course returns, and so does the need
            # for a treatment that works (loss of the drug and placebo response)
            s[NAT] = s[SEV0]
            s[R_DRUG] = 0.0
            s[R_AUG] = 0.0
            s[NS_RESP] = 0.0
            s[WELL] = 0.0
            s[IN_REM] = 0.0
            s[RELAPSES] += 1.0

    # tolerability and adherence: side effects add across concurrent drugs, and
    # stopping a drug brings transient discontinuation symptoms
    side = 0.0
    if on_drug:
        # early side effects of an augmenting drug fade as a new drug's do
        side = (k[K_CLASS_SE + int(s[DRUG_CLASS])] * s[DOSE] / MAX_DOSE_LEVEL * _se_fade(s[W_DOSE], k)
                + k[K_AUG_SE] * s[AUG] * _se_fade(s[W_AUG], k))
    elif s[W_OFF] >= 0:
        side = k[K_DISC_SE] * math.exp(-s[W_OFF] / k[K_DISC_TAU])
    s[SIDE_EFF] = _clip(side * s[SE_SENS], 0.0, 10.0)
    # regimen complexity: every concurrent treatment beyond the first lowers adherence
    # (what the patient does now: waiting lists and finished courses are no burden)
    in_psy_course = psy_active and s[W_PSY] <= k[K_PSY_COURSE]
    in_dig_course = s[DIG] > 0 and s[W_DIG] <= k[K_DIG_COURSE]
    components = ((1.0 if on_drug else 0.0) + s[AUG] + (1.0 if in_psy_course else 0.0)
                  + (1.0 if in_dig_course else 0.0) + (1.0 if ref_active else 0.0))
    burden = max(components - 1.0, 0.0)
    s[ADH] = _clip(s[ADH_PROP] - k[K_ADH_LOSS] * s[SIDE_EFF] - k[K_COMPLEXITY_ADH] * burden, 0.0, 1.0)

    # engagement, digital habituation and programme dropout
    not_improving = s[T] > 4 and s[SEV] > 0.8 * s[SEV0]
    # human contact (guided digital CBT, specialist care) supports engagement;
    # psychotherapy a share of that (much of its contact shows in its own
    # effect, which works through attendance; STAR*D level 2 found cognitive
    # therapy no better than medication strategies, Thase 2007)
    human = 1.0 if (s[DIG] == 1 or ref_active) else (k[K_PSY_SUPPORT] if psy_active else 0.0)
    eng_target = min(s[ENG_BASE] + k[K_SUPPORT] * human, 1.0)
    s[ENG] = _clip(s[ENG] + k[K_ENG_REVERT] * (eng_target - s[ENG]) - k[K_ENG_LOSS] * not_improving, 0.0, 1.0)
    if s[DIG] > 0:
        guided = s[DIG] == 1
        s[DIG_ENG] *= 1.0 - (k[K_HAB_GUIDED] if guided else k[K_HAB_UNGUIDED])
        base = k[K_DIG_DROP_GUIDED] if guided else k[K_DIG_DROP_UNGUIDED]
        if unf[2] < base * (1.3 - s[DIG_ENG]):
            s[DIG] = 0.0
            s[DIG_ENG] = 0.0
            s[DIG_DROPOUTS] += 1.0

    # severity and anxiety move toward their treated targets
    factor = _treatment_factor(s, k)
    target = s[NAT] * factor
    s[SEV] = _clip(s[SEV] + k[K_RATE] * (target - s[SEV]) + k[K_PROC_SD] * nrm[0], 0.0, 27.0)
    anx_target = s[ANX0] * factor * s[NAT] / max(s[SEV0], 1.0)
    s[ANX] = _clip(s[ANX] + k[K_RATE] * (anx_target - s[ANX]) + k[K_ANX_PROC_SD] * nrm[1], 0.0, 21.0)
    s[IN_REM] = 1.0 if s[SEV] < k[K_REMISSION] else 0.0
    if s[WELL] == 0 and (s[IN_REM] > 0 or s[SEV] <= k[K_WELL_SHARE] * s[SEV0]):
        s[WELL] = 1.0  # remitted or responded: at risk of relapse once it has lasted
        s[W_WELL] = 0.0
    elif s[WELL] > 0 and s[SEV] > (k[K_WELL_SHARE] + 0.25) * s[SEV0]:
        # the response is clearly lost without a relapse event (an unstable
        # response, a drug stopped): no longer "well", so no relapse to come
        s[WELL] = 0.0
        s[W_WELL] = 0.0

    # leaving care: side effects, no improvement, disengagement, failed steps,
    # treatment burden and this week's change of medication
    logit = (k[K_DROP_BASE] + s[DROP_PROP] + k[K_DROP_SE] * s[SIDE_EFF] + k[K_DROP_NOIMP] * not_improving
             + k[K_DROP_DISENG] * (1.0 - s[ENG]) + k[K_DROP_FAILS] * s[FAILS] + k[K_DROP_BURDEN] * burden
             + (k[K_DROP_CHANGE] if med_change else 0.0))
    dropped = unf[3] < _sigmoid(logit)
    s[DROPPED] = 1.0 if dropped else 0.0

    _measure(s, k, nrm[_MEASURE_NORMAL:], unf[_MEASURE_UNIFORM:], False)

    # cost of care this week (GBP): the action's one-off cost plus every active
    # treatment's weekly cost (courses of therapy end after their sessions)
    cost = k[K_COSTS + a]
    if on_drug:
        cost += k[K_WEEKLY_COSTS]
    if s[AUG] > 0:
        cost += k[K_WEEKLY_COSTS + 1]
    if in_psy_course:
        cost += k[K_WEEKLY_COSTS + 2]
    if in_dig_course:
        cost += k[K_WEEKLY_COSTS + (3 if s[DIG] == 1 else 4)]
    if ref_active:
        cost += k[K_WEEKLY_COSTS + 5]
    s[COST] += cost

    reward = (
        k[K_W_IMPROVE] * (prev_sev - s[SEV])
        + k[K_W_REMISSION] * s[IN_REM]
        - k[K_W_SIDE] * s[SIDE_EFF]
        - k[K_W_DROPOUT] * dropped
        - k[K_W_COST] * cost / COST_UNIT
        - k[K_W_INVALID] * blocked
    )
    return blocked, reward


# --------------------------------------------------------------------------- public API


def _block_bits() -> IntArray:
    """Per rule, the blocked actions as a bit set (bit a = action a)."""
    from envs.rules import BLOCKS

    return (BLOCKS.astype(np.int64) << np.arange(N_ACTIONS, dtype=np.int64)).sum(axis=1)


_BLOCKS = _block_bits()
assert _BLOCKS.shape == (N_RULES,)


@dataclass(frozen=True)
class StepResult:
    """What one batched step returns (all arrays have n rows)."""

    state: FloatArray
    obs: NDArray[np.float32]  # observation of the new state
    mask: BoolArray  # actions allowed in the new state
    reward: FloatArray
    terminated: BoolArray  # left care this week (or before)
    invalid: BoolArray  # the action was blocked (replaced by continue and penalised)


def initial_state(
    n: int,
    params: SimParams,
    settings: EnvSettings,
    rng: np.random.Generator,
    kparams: FloatArray | None = None,
) -> FloatArray:
    """Sample ``n`` new patients at intake (week 0), with their intake assessment."""
    pop, resp = params.population, params.response
    k = kparams if kparams is not None else kernel_params(params, settings)
    het = settings.heterogeneity
    s = np.zeros((n, N_STATE))

    sev0 = pop.severity_mean + het * pop.severity_sd * rng.standard_normal(n)
    sev0 = np.clip(sev0, pop.severity_min, 27.0)
    s[:, SEV] = s[:, SEV0] = s[:, NAT] = sev0
    anx0 = pop.anxiety_slope * sev0 + het * pop.anxiety_sd * rng.standard_normal(n)
    s[:, ANX] = s[:, ANX0] = np.clip(anx0, 0.0, 21.0)
    s[:, CHRON] = rng.random(n) < pop.chronic_share
    s[:, TR] = rng.random(n) < resp.treatment_resistant_share
    s[:, NS_RESP] = rng.random(n) < resp.nonspecific_responder_prob
    s[:, U_CLASS : U_CLASS + N_CLASSES] = het * rng.standard_normal((n, N_CLASSES))
    s[:, PRIOR] = np.minimum(rng.poisson(pop.prior_episodes_mean, n), 5)
    s[:, AGE_BAND] = rng.choice(len(pop.age_band_probs), size=n, p=np.asarray(pop.age_band_probs))
    s[:, SEX] = rng.random(n) < pop.male_share
    access = np.where(s[:, AGE_BAND] == 3, pop.digital_access_over_60, pop.digital_access)
    s[:, DIG_ACCESS] = rng.random(n) < access

    def spread(draw: FloatArray, mean: float) -> FloatArray:
        # heterogeneity scales each trait's distance from its population mean
        return mean + het * (draw - mean)

    a, b = pop.adherence_beta
    s[:, ADH_PROP] = s[:, ADH] = spread(rng.beta(a, b, n), a / (a + b))
    s[:, SE_SENS] = np.exp(het * pop.side_effect_sensitivity_sd * rng.standard_normal(n))
    a, b = pop.engagement_beta
    s[:, ENG_BASE] = s[:, ENG] = spread(rng.beta(a, b, n), a / (a + b))
    s[:, DROP_PROP] = het * pop.dropout_propensity_sd * rng.standard_normal(n)
    s[:, SUIC] = het * 0.8 * rng.standard_normal(n)

    s[:, DRUG_CLASS] = -1.0
    s[:, LAST_CLASS] = -1.0
    s[:, W_OFF] = -1.0
    s[:, LEVEL] = 1.0
    # Waiting weeks once referred, one draw per patient (so arms of a trial and
    # patients of a batch stay independent): geometric, with the service's mean
    svc = params.services
    s[:, WAIT_PSY] = rng.geometric(1.0 / (svc.psychotherapy_wait_mean_weeks + 1.0), n) - 1.0
    s[:, WAIT_REF] = rng.geometric(1.0 / (svc.specialist_wait_mean_weeks + 1.0), n) - 1.0
    s[:, Z_DRUG : Z_DIG + 1] = rng.standard_normal((n, Z_DIG + 1 - Z_DRUG))
    if settings.initial_treatment == "ssri":
        s[:, DRUG_CLASS] = 0.0
        s[:, DOSE] = 1.0
        _start_first_drug(s, k)

    _intake_kernel(s, rng.standard_normal((n, N_NORMAL - _MEASURE_NORMAL), dtype=np.float32), k)
    return s


def observe_and_mask(s: FloatArray) -> tuple[NDArray[np.float32], BoolArray]:
    """Observation (FEATURE_NAMES order) and allowed actions of every patient."""
    n = len(s)
    obs = np.empty((n, N_FEATURES), dtype=np.float32)
    mask = np.empty((n, N_ACTIONS), dtype=np.bool_)
    _observe_kernel(np.ascontiguousarray(s), _OBS_STATE_COLS, _OBS_POSITIONS, _BLOCKS, obs, mask)
    return obs, mask


def observe(s: FloatArray) -> NDArray[np.float32]:
    """The observation vector of every patient, in FEATURE_NAMES order."""
    return observe_and_mask(s)[0]


def mask_from_state(s: FloatArray) -> BoolArray:
    """Allowed actions now, from what is observable (the rules of envs.rules)."""
    return observe_and_mask(s)[1]


def step(
    state: FloatArray,
    actions: Any,
    params: SimParams,
    settings: EnvSettings,
    rng: np.random.Generator,
    kparams: FloatArray | None = None,
) -> StepResult:
    """Advance every patient by one week under ``actions`` (shape (n,)).

    Patients who already left care come back unchanged with zero reward. A
    blocked action raises ``ValueError`` naming the rule, or, with
    ``settings.invalid_action == "penalize"``, counts as ``continue`` with a
    penalty. Pass ``kparams`` (from :func:`kernel_params`) to skip rebuilding it.
    """
    n = len(state)
    actions = np.asarray(actions)
    if actions.shape != (n,):
        raise ValueError(f"expected one action per patient, shape ({n},), got {actions.shape}")
    if actions.dtype.kind not in "iu":
        if actions.dtype.kind != "f" or not np.all(np.isfinite(actions) & (actions == np.round(actions))):
            raise ValueError(f"actions must be integers 0..{N_ACTIONS - 1}, got {actions!r}")
    if n and (actions.min() < 0 or actions.max() >= N_ACTIONS):
        bad = actions[(actions < 0) | (actions >= N_ACTIONS)][0]
        raise ValueError(f"action {bad} is outside the action space 0..{N_ACTIONS - 1}")
    k = kparams if kparams is not None else kernel_params(params, settings)
    return step_unchecked(state, actions.astype(np.int64, copy=False), settings, rng, k)


def step_unchecked(
    state: FloatArray, actions: IntArray, settings: EnvSettings, rng: np.random.Generator, k: FloatArray
) -> StepResult:
    """:func:`step` for callers that already validated ``actions`` (int64, in range,
    one per patient): the single-patient env, where the checks cost a fifth of a step."""
    n = len(state)
    # float32 noise: ~40 % cheaper to draw, and ample resolution for weekly noise
    normals = rng.standard_normal((n, N_NORMAL), dtype=np.float32)
    uniforms = rng.random((n, N_UNIFORM), dtype=np.float32)
    out = np.empty_like(state)
    reward = np.empty(n)
    invalid = np.empty(n, dtype=np.bool_)
    obs = np.empty((n, N_FEATURES), dtype=np.float32)
    mask = np.empty((n, N_ACTIONS), dtype=np.bool_)
    _step_kernel(np.ascontiguousarray(state), actions, normals, uniforms, k,
                 _BLOCKS, _OBS_STATE_COLS, _OBS_POSITIONS, out, reward, invalid, obs, mask)
    if settings.invalid_action == "raise" and invalid.any():
        row = int(np.flatnonzero(invalid)[0])
        name = ACTION_NAMES[int(actions[row])]
        rules = blocking_rules(observe(state[row : row + 1])[0])[name]
        raise ValueError(
            f"action {int(actions[row])} ({name}) is not allowed for patient row {row} now: "
            + "; ".join(r.description for r in rules)
        )
    return StepResult(state=out, obs=obs, mask=mask, reward=reward, terminated=out[:, DROPPED] > 0,
                      invalid=invalid)


def remeasure(state: FloatArray, settings: EnvSettings, rng: np.random.Generator,
              kparams: FloatArray) -> FloatArray:
    """The same patients assessed again (same true state, fresh measurement noise,
    nothing missing): for retest reliability and trial-style assessments."""
    s = np.ascontiguousarray(state).copy()
    _intake_kernel(s, rng.standard_normal((len(s), N_NORMAL - _MEASURE_NORMAL), dtype=np.float32), kparams)
    return s
