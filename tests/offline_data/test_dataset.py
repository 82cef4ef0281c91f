import numpy as np
import pytest

from envs import dynamics as D
from envs.params import EnvSettings, load_params
from offline_data import generate as G
from offline_data.dataset import LoggedDataset, load_dataset, split_by_patient
from offline_data.io import write_table
from policies.base import sample_actions
from policies.baselines import make_baseline

PATIENTS, HORIZON, SEED = 70, 9, 11


def simulate_by_hand(policy_name, epsilon):
    """The generator's recipe written out step by step: what the patients saw and did."""
    params, settings = load_params(), EnvSettings(horizon=HORIZON)
    policy = make_baseline(policy_name, epsilon)
    rng, policy_rng = G.chunk_generators(SEED, 0)
    state = D.initial_state(PATIENTS, params, settings, rng)
    obs, mask = D.observe_and_mask(state)
    rows = {key: [[] for _ in range(PATIENTS)] for key in ("obs", "action", "prob", "reward", "mask", "term", "sev")}
    for _ in range(HORIZON):
        in_care = np.flatnonzero(state[:, D.S.DROPPED] == 0)
        actions, probs = sample_actions(policy, obs[in_care], mask[in_care], policy_rng)
        full = np.zeros(PATIENTS, dtype=np.int64)
        full[in_care] = actions
        result = D.step(state, full, params, settings, rng)
        for j, i in enumerate(in_care):
            rows["obs"][i].append(obs[i])
            rows["action"][i].append(actions[j])
            rows["prob"][i].append(probs[j])
            rows["reward"][i].append(result.reward[i])
            rows["mask"][i].append(mask[i])
            rows["term"][i].append(result.terminated[i])
            rows["sev"][i].append(state[i, D.S.SEV])
        state, obs, mask = result.state, result.obs, result.mask
    return {key: np.concatenate([np.asarray(r) for r in per_patient]) for key, per_patient in rows.items()}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("round_trip")
    paths = {}
    for suffix in ("parquet", "csv"):
        paths[suffix] = folder / f"log.{suffix}"
        G.generate(paths[suffix], policy="stard", epsilon=0.2, patients=PATIENTS, seed=SEED,
                   settings=EnvSettings(horizon=HORIZON))
    return paths


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_round_trip_is_exact(written, fmt):
    truth = simulate_by_hand("stard", 0.2)
    data = load_dataset(written[fmt])
    t = data.transitions()
    assert data.n_patients == PATIENTS and len(t) == len(truth["action"])
    assert t.obs.dtype == np.float32 and t.action.dtype == np.int64 and t.mask.dtype == bool
    assert t.reward.dtype == np.float32 and t.behavior_prob.dtype == np.float32 and t.done.dtype == bool
    # rows come grouped by patient in simulation order (episode_id = patient index)
    assert np.array_equal(np.unique(data.frame.episode_id[data.starts[:-1]]), np.arange(PATIENTS))
    assert np.array_equal(t.obs, truth["obs"])
    assert np.array_equal(t.action, truth["action"])
    assert np.array_equal(t.reward, truth["reward"].astype(np.float32))
    assert np.array_equal(t.mask, truth["mask"])
    assert np.array_equal(data.frame.behavior_prob, truth["prob"])  # float64 in the file: exact
    assert np.array_equal(t.behavior_prob, truth["prob"].astype(np.float32))
    assert np.array_equal(t.terminated, truth["term"])
    assert np.array_equal(data.frame.true_phq9, truth["sev"].astype(np.float32))


def test_transitions_chain_within_episodes(written):
    data = load_dataset(written["parquet"])
    t = data.transitions()
    last = np.zeros(len(t), dtype=bool)
    last[data.starts[1:] - 1] = True
    assert np.array_equal(t.done, last)
    inner = np.flatnonzero(~last)
    assert np.array_equal(t.next_obs[inner], t.obs[inner + 1])
    assert np.array_equal(t.next_mask[inner], t.mask[inner + 1])
    assert np.array_equal(t.episode[inner], t.episode[inner + 1])
    assert np.array_equal(t.next_obs[last], t.obs[last])  # no logged successor: a placeholder, never bootstrapped
    assert np.array_equal(t.terminated | t.truncated, last)


def test_episodes_are_padded_with_lengths(written):
    data = load_dataset(written["parquet"])
    t, ep = data.transitions(), data.episodes()
    assert ep.obs.shape == (PATIENTS, HORIZON, t.obs.shape[1]) and ep.mask.shape[:2] == (PATIENTS, HORIZON)
    assert ep.lengths.sum() == len(t) and ep.lengths.max() == HORIZON and ep.lengths.min() < HORIZON
    assert np.array_equal(ep.valid.sum(axis=1), ep.lengths)
    assert np.array_equal(ep.obs[ep.valid], t.obs)
    assert np.array_equal(ep.action[ep.valid], t.action)
    assert np.array_equal(ep.behavior_prob[ep.valid], t.behavior_prob)
    pad = ~ep.valid
    assert np.all(ep.obs[pad] == 0) and np.all(ep.behavior_prob[pad] == 1) and not ep.mask[pad].any()
    assert np.all(ep.t[pad] == -1) and np.all(ep.reward[pad] == 0)
    short = int(np.argmin(ep.lengths))
    assert ep.terminated[short, ep.lengths[short] - 1]
    assert ep.true_phq9 is not None and np.isnan(ep.true_phq9[pad]).all()


def test_split_by_patient_is_disjoint_complete_and_reproducible(written):
    data = load_dataset(written["parquet"])
    parts = split_by_patient(data, {"train": 0.6, "validation": 0.2, "test": 0.2}, seed=4)
    ids = {name: set(part.patient_ids()) for name, part in parts.items()}
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    assert ids["train"] | ids["validation"] | ids["test"] == set(data.patient_ids())
    assert [len(v) for v in ids.values()] == [42, 14, 14]
    assert sum(p.n_rows for p in parts.values()) == data.n_rows
    again = split_by_patient(load_dataset(written["parquet"]), {"train": 0.6, "validation": 0.2, "test": 0.2}, seed=4)
    assert {name: set(p.patient_ids()) for name, p in again.items()} == ids
    other = split_by_patient(data, {"train": 0.6, "validation": 0.2, "test": 0.2}, seed=5)
    assert set(other["test"].patient_ids()) != ids["test"]
    # each part is a dataset with intact episodes
    for part in parts.values():
        t = part.transitions()
        assert t.done.sum() == part.n_episodes


def test_split_depends_on_patients_not_row_order(written, tmp_path):
    data = load_dataset(written["parquet"])
    starts = data.starts
    episodes = np.random.default_rng(0).permutation(len(starts) - 1)
    rows = np.concatenate([np.arange(starts[e], starts[e + 1]) for e in episodes])
    shuffled = tmp_path / "shuffled.parquet"
    write_table(shuffled, data.frame.take(rows).to_arrow(data.metadata))
    reloaded = load_dataset(shuffled)
    assert not np.array_equal(reloaded.frame.obs, data.frame.obs)
    a = split_by_patient(data, seed=1)
    b = split_by_patient(reloaded, seed=1)
    assert {k: set(v.patient_ids()) for k, v in a.items()} == {k: set(v.patient_ids()) for k, v in b.items()}


def test_bad_split_fractions_are_refused(written):
    data = load_dataset(written["parquet"])
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_patient(data, {"train": 0.7, "test": 0.2})
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        split_by_patient(data, {"train": 1.5, "test": -0.5})


def test_a_dataset_needs_behaviour_probabilities(small_frame):
    import dataclasses

    with pytest.raises(ValueError, match="behavior_prob is missing"):
        LoggedDataset(dataclasses.replace(small_frame, behavior_prob=None))
