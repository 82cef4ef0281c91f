"""Fairness: values per subgroup (a partition of the episodes, gaps named, small groups flagged)
and demographic parity of recommendations (digital-only care to patients without access)."""

import numpy as np
import pytest

from envs.spec import FEATURE_INDEX, N_ACTIONS, N_FEATURES, Action
from evaluation.fairness import (
    CARE_CLASSES,
    episode_groups,
    fairness_report,
    fqe_estimate,
    recommendation_parity,
    subgroup_values,
    take_episodes,
)
from evaluation.ope import estimate, target_probabilities
from offline_data.dataset import Episodes, LoggedDataset
from offline_data.frame import LogFrame
from policies.base import check_inputs, restrict_to_mask
from policies.baselines import make_baseline

DIGITAL = [Action.ADD_DIGITAL_GUIDED, Action.ADD_DIGITAL_UNGUIDED]


def synthetic_episodes(n=200, length=4, seed=0, block_digital_without_access=False, lengths=None):
    """Uniform-random behaviour over allowed actions; every action allowed unless digital is
    blocked for patients without access. Reward 1 per week for women, 0 for men (plus noise 0)."""
    rng = np.random.default_rng(seed)
    obs = np.zeros((n, length, N_FEATURES), dtype=np.float32)
    sex = rng.integers(0, 2, n)
    age = rng.choice(4, n, p=[0.3, 0.3, 0.3, 0.1])
    access = (rng.random(n) < 0.3).astype(int) ^ 1  # about 30 % without access
    obs[:, :, FEATURE_INDEX["sex"]] = sex[:, None]
    obs[:, :, FEATURE_INDEX["age_band"]] = age[:, None]
    obs[:, :, FEATURE_INDEX["digital_access"]] = access[:, None]
    obs[:, :, FEATURE_INDEX["weeks_in_care"]] = np.arange(length)[None, :]
    lengths = np.full(n, length) if lengths is None else np.asarray(lengths)
    valid = np.arange(length)[None, :] < lengths[:, None]
    mask = np.ones((n, length, N_ACTIONS), dtype=bool)
    if block_digital_without_access:
        for a in DIGITAL:
            mask[access == 0, :, a] = False
    mask &= valid[..., None]
    behaviour = np.where(mask, 1.0, 0.0)
    behaviour /= np.maximum(behaviour.sum(axis=2, keepdims=True), 1)
    action = np.zeros((n, length), dtype=np.int64)
    bp = np.ones((n, length), dtype=np.float32)
    for e in range(n):
        for t in range(lengths[e]):
            action[e, t] = rng.choice(N_ACTIONS, p=behaviour[e, t])
            bp[e, t] = behaviour[e, t, action[e, t]]
    reward = np.where(valid, (sex == 0)[:, None].astype(np.float32), 0.0).astype(np.float32)
    return Episodes(
        obs=obs * valid[..., None], action=action, reward=reward, mask=mask, behavior_prob=bp,
        terminated=np.zeros((n, length), dtype=bool),
        truncated=valid & (np.arange(length)[None] == lengths[:, None] - 1),
        t=np.where(valid, np.arange(length)[None, :], -1), valid=valid, lengths=lengths.astype(np.int64),
        patient_id=np.array([f"p{e}" for e in range(n)], dtype=object), episode_id=np.arange(n, dtype=np.int64))


class DigitalWithoutAccess:
    """Steers patients without digital access to unguided digital CBT (where the mask allows it);
    continues everyone else."""

    name = "digital_without_access"

    def action_probs(self, obs, mask):
        obs, mask = check_inputs(obs, mask)
        probs = np.zeros(mask.shape)
        no_access = obs[:, FEATURE_INDEX["digital_access"]] == 0
        probs[no_access, Action.ADD_DIGITAL_UNGUIDED] = 1.0
        probs[~no_access, Action.CONTINUE] = 1.0
        return restrict_to_mask(probs, mask)


class Uniform:
    name = "uniform"

    def action_probs(self, obs, mask):
        obs, mask = check_inputs(obs, mask)
        return mask / mask.sum(axis=1, keepdims=True)


def test_parity_shows_a_policy_that_steers_patients_without_access_to_digital_care():
    episodes = synthetic_episodes()
    groups = episode_groups(episodes)
    probs = target_probabilities(DigitalWithoutAccess(), episodes)
    parity = recommendation_parity(episodes, probs, groups, policy="steerer")
    assert parity.classes == CARE_CLASSES
    assert parity.rate("digital_access", "no digital access", "digital") == pytest.approx(1.0)
    assert parity.rate("digital_access", "digital access", "digital") == pytest.approx(0.0)
    assert parity.rate("digital_access", "digital access", "continue") == pytest.approx(1.0)
    assert parity.digital.no_access == pytest.approx(1.0) and parity.digital.access == pytest.approx(0.0)
    assert parity.digital.no_access_allowed == pytest.approx(1.0)  # these synthetic masks allow it
    gap = next(g for g in parity.gaps if g.column == "digital_access" and g.care_class == "digital")
    assert gap.gap == pytest.approx(1.0)
    assert (gap.highest, gap.lowest) == ("no digital access", "digital access")
    assert any("steerer recommends digital-only care" in w and "without digital access" in w
               for w in parity.warnings)
    # rows of every group sum to 1 over the classes; logged shares too
    for row in parity.rows:
        assert sum(row.recommended.values()) == pytest.approx(1.0)
        assert sum(row.logged.values()) == pytest.approx(1.0)


def test_parity_is_zero_when_the_mask_blocks_digital_care_without_access():
    episodes = synthetic_episodes(block_digital_without_access=True)
    groups = episode_groups(episodes)
    for policy in (DigitalWithoutAccess(), Uniform()):
        parity = recommendation_parity(episodes, target_probabilities(policy, episodes), groups)
        assert parity.digital.no_access == 0.0
        assert parity.digital.no_access_allowed == 0.0
        assert parity.rate("digital_access", "no digital access", "digital") == 0.0
        assert not parity.warnings
    uniform = recommendation_parity(episodes, target_probabilities(Uniform(), episodes), groups)
    assert uniform.digital.access == pytest.approx(2 / N_ACTIONS)


def test_subgroup_values_partition_the_episodes_and_name_the_gap():
    episodes = synthetic_episodes(n=300, lengths=np.r_[np.full(150, 4), np.full(150, 2)])
    groups = episode_groups(episodes)
    probs = target_probabilities(Uniform(), episodes)  # the behaviour policy: every weight is 1
    fqe_x = np.linspace(0, 1, len(episodes))
    values = subgroup_values(episodes, probs, groups, estimators=("is", "wis", "fqe"), fqe_initial_values=fqe_x,
                             n_boot=200, min_episodes=30)
    overall = estimate("is", episodes, probs).value
    for column in ("sex", "age_band", "digital_access"):
        rows = values.of(column)
        index = np.concatenate([groups.members(column, r.group) for r in rows])
        assert sorted(index.tolist()) == list(range(len(episodes)))  # a partition
        assert sum(r.n_episodes for r in rows) == len(episodes)
        assert sum(r.share for r in rows) == pytest.approx(1.0)
        # IS is a mean over episodes, so the group values average back to the overall value
        assert sum(r.n_episodes * r.estimates["is"].value for r in rows) / len(episodes) == pytest.approx(overall)
        assert sum(r.n_episodes * r.estimates["fqe"].value for r in rows) / len(episodes) == pytest.approx(
            fqe_x.mean())
        for r in rows:
            assert r.estimates["is"].low <= r.estimates["is"].value <= r.estimates["is"].high
            assert r.estimates["fqe"].interval == "bootstrap"
    # women earn 1 a week and men 0: the sex gap is the mean length of women's episodes
    women = groups.members("sex", "female")
    gap = values.gap("sex", "wis")
    assert (gap.highest, gap.lowest) == ("female", "male")
    assert gap.gap == pytest.approx(episodes.lengths[women].mean())
    assert gap.intervals_overlap is False
    assert values.of("sex")[0].group == "female" and values.of("age_band")[-1].group == "60+"


def test_small_and_unidentifiable_groups_are_flagged_and_left_out_of_gaps():
    episodes = synthetic_episodes(n=120, seed=3)
    groups = episode_groups(episodes)
    counts = {r: len(groups.members("age_band", r)) for r in groups.order["age_band"]}
    assert counts["60+"] < 30 <= min(c for g, c in counts.items() if g != "60+")
    probs = target_probabilities(Uniform(), episodes)
    values = subgroup_values(episodes, probs, groups, estimators=("wis",), n_boot=100, min_episodes=30)
    small = next(r for r in values.of("age_band") if r.group == "60+")
    age_gap = values.gap("age_band", "wis")
    assert small.too_few and "60+" not in (age_gap.highest, age_gap.lowest) and age_gap.gap is not None
    assert any("60+" in e for e in age_gap.excluded)
    assert any("age_band = 60+" in w for w in values.warnings)

    # a policy that never takes the logged actions of men: men's estimates are unidentifiable
    probs = target_probabilities(Uniform(), episodes)
    men = groups.members("sex", "male")
    never = probs.copy()
    for e in men:
        for t in range(episodes.lengths[e]):
            row = np.zeros(N_ACTIONS)
            row[(episodes.action[e, t] + 1) % N_ACTIONS] = 1.0
            never[e, t] = row
    values = subgroup_values(episodes, never, groups, estimators=("wis",), n_boot=100)
    male = next(r for r in values.of("sex") if r.group == "male")
    assert not male.estimates["wis"].identifiable and np.isnan(male.estimates["wis"].value)
    gap = values.gap("sex", "wis")
    assert gap.gap is None and any("male (not identifiable)" in e for e in gap.excluded)


def test_take_episodes_and_fqe_estimate():
    episodes = synthetic_episodes(n=20)
    part = take_episodes(episodes, np.array([3, 1]))
    assert part.obs.shape[0] == 2 and part.patient_id.tolist() == ["p3", "p1"]
    est = fqe_estimate(np.array([1.0, 2.0, 3.0, 4.0]), n_boot=200, seed=1)
    assert est.value == pytest.approx(2.5) and est.interval == "bootstrap" and est.low < 2.5 < est.high
    assert fqe_estimate(np.array([1.0]), n_boot=200).low is None


def test_simulated_data_block_digital_care_without_access():
    """On the simulator's masks the blocked-action case shows exactly zero, whatever the policy."""
    rng = np.random.default_rng(0)
    n, weeks = 60, 3
    from envs import dynamics as D
    from envs.params import EnvSettings, load_params

    params = load_params()
    state = D.initial_state(n, params, EnvSettings(), rng)
    obs, mask = D.observe_and_mask(state)
    assert (obs[:, FEATURE_INDEX["digital_access"]] == 0).any()
    episodes = Episodes(
        obs=np.repeat(obs[:, None], weeks, axis=1).astype(np.float32), action=np.zeros((n, weeks), dtype=np.int64),
        reward=np.zeros((n, weeks), dtype=np.float32), mask=np.repeat(mask[:, None], weeks, axis=1),
        behavior_prob=np.full((n, weeks), 0.5, dtype=np.float32), terminated=np.zeros((n, weeks), dtype=bool),
        truncated=np.zeros((n, weeks), dtype=bool), t=np.tile(np.arange(weeks), (n, 1)),
        valid=np.ones((n, weeks), dtype=bool), lengths=np.full(n, weeks), patient_id=np.arange(n).astype(object),
        episode_id=np.arange(n))
    groups = episode_groups(episodes)
    for policy in (make_baseline("random"), DigitalWithoutAccess()):
        parity = recommendation_parity(episodes, target_probabilities(policy, episodes), groups)
        assert parity.digital.no_access == 0.0 and parity.digital.no_access_allowed == 0.0
    assert recommendation_parity(episodes, target_probabilities(make_baseline("random"), episodes),
                                 groups).digital.access > 0


def test_extra_subgroup_columns_of_an_import_join_the_tables():
    # two patients x two weeks, plus an imported 'ethnicity' column (one value missing)
    rows = 4
    obs = np.zeros((rows, N_FEATURES), dtype=np.float32)
    obs[:, FEATURE_INDEX["sex"]] = [0, 0, 1, 1]
    frame = LogFrame(
        patient_ids=np.array(["a", "b"], dtype=object), patient_code=np.array([0, 0, 1, 1]),
        episode_id=np.array([0, 0, 1, 1]), t=np.array([0, 1, 0, 1]), obs=obs, action=np.zeros(rows, dtype=np.int64),
        behavior_prob=np.full(rows, 0.5), allowed=np.ones((rows, N_ACTIONS), dtype=bool),
        reward=np.zeros(rows, dtype=np.float32), terminated=np.zeros(rows, dtype=bool),
        truncated=np.array([False, True, False, True]),
        extra={"ethnicity": np.array(["x", "x", None, None], dtype=object)})
    groups = episode_groups(LoggedDataset(frame))
    assert groups.columns == ("sex", "age_band", "digital_access", "ethnicity")
    assert groups.labels["ethnicity"].tolist() == ["x", "missing"]
    assert groups.labels["sex"].tolist() == ["female", "male"]
    episodes = LoggedDataset(frame).episodes()
    report = fairness_report(episodes, target_probabilities(Uniform(), episodes), groups, estimators=("wis",),
                             n_boot=50)
    assert {r.group for r in report.parity.of("ethnicity")} == {"x", "missing"}
    assert all(r.too_few for r in report.parity.rows) and report.values is not None
