import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from envs.params import EnvSettings
from envs.rules import action_mask
from envs.spec import FEATURE_INDEX, ITEM9_REFERRAL_THRESHOLD, Action
from offline_data import generate as G
from offline_data.dataset import load_dataset
from offline_data.io import read_metadata
from policies.baselines import make_baseline


@pytest.mark.parametrize(("policy", "epsilon"), [("stard", 0.1), ("usual_care", 0.3), ("random", 1.0)])
def test_behavior_prob_is_the_policys_probability_of_the_logged_action(tmp_path, policy, epsilon):
    out = tmp_path / f"{policy}.parquet"
    G.generate(out, policy=policy, epsilon=epsilon, patients=80, seed=5, settings=EnvSettings(horizon=10))
    t = load_dataset(out).transitions()
    probs = make_baseline(policy, epsilon).action_probs(t.obs, t.mask)
    np.testing.assert_allclose(t.behavior_prob, probs[np.arange(len(t)), t.action].astype(np.float32), rtol=1e-7)
    assert np.all(t.behavior_prob > 0) and np.all(t.behavior_prob <= 1)
    if policy != "random":
        assert len(np.unique(t.behavior_prob)) > 2  # exploration gives graded probabilities, not just 1.0
    meta = read_metadata(out)
    assert meta["behavior_policy"] == {"name": policy, "epsilon": epsilon}
    assert meta["behavior_prob_estimated"] is False


def test_one_row_per_week_in_care_with_terminated_and_truncated(small_frame):
    f = small_frame
    starts = f.episode_starts()
    horizon = 12
    assert len(starts) - 1 == 60
    for e in range(len(starts) - 1):
        rows = slice(starts[e], starts[e + 1])
        t = f.t[rows]
        assert t.tolist() == list(range(len(t)))  # every week from intake until leaving or the horizon
        assert np.array_equal(f.obs[rows, FEATURE_INDEX["weeks_in_care"]], t)
        flags = f.terminated[rows] | f.truncated[rows]
        assert not flags[:-1].any() and flags[-1]
        if len(t) < horizon:
            assert f.terminated[rows][-1]  # left care before the horizon
        else:
            assert f.truncated[rows][-1] != f.terminated[rows][-1]
    assert f.terminated.any() and f.truncated.any()
    assert not (f.terminated & f.truncated).any()


def test_logged_actions_are_allowed_and_follow_the_item9_rule(small_frame):
    f = small_frame
    assert np.array_equal(f.allowed, action_mask(f.obs))
    assert f.allowed[np.arange(len(f)), f.action].all()
    urgent = f.obs[:, FEATURE_INDEX["phq9_item9"]] >= ITEM9_REFERRAL_THRESHOLD
    assert np.all(f.action[urgent & f.allowed[:, Action.REFER_SPECIALIST]] == Action.REFER_SPECIALIST)


def test_ids_are_pseudonymous_unique_and_episode_ids_file_wide(tmp_path):
    out = tmp_path / "d.parquet"
    G.generate(out, policy="stard", epsilon=0.1, patients=50, seed=1, chunk_size=20, settings=EnvSettings(horizon=4))
    data = load_dataset(out)
    ids = data.patient_ids()
    assert len(ids) == 50 and all(re.fullmatch(r"sim-[0-9a-f]{16}", i) for i in ids)
    assert sorted(np.unique(data.frame.episode_id).tolist()) == list(range(50))
    assert pq.ParquetFile(out).num_row_groups == 3  # one per chunk of 20, 20, 10
    assert data.n_patients == data.n_episodes == 50


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    kwargs = dict(policy="usual_care", epsilon=0.2, patients=40, settings=EnvSettings(horizon=6))
    a, b, c = tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.parquet"
    G.generate(a, seed=9, **kwargs)
    G.generate(b, seed=9, **kwargs)
    G.generate(c, seed=10, **kwargs)
    assert a.read_bytes() == b.read_bytes()
    assert not np.array_equal(load_dataset(a).frame.obs, load_dataset(c).frame.obs)


def test_metadata_records_provenance(tmp_path):
    out = tmp_path / "m.parquet"
    settings = EnvSettings(horizon=5, missingness=0.5, observation_noise=1.5, heterogeneity=0.5)
    G.generate(out, policy="stard", epsilon=0.1, patients=10, seed=3, settings=settings)
    meta = read_metadata(out)
    assert meta["schema_version"] == 1 and meta["source"] == "simulator" and meta["seed"] == 3
    assert meta["env_settings"]["missingness"] == 0.5 and meta["env_settings"]["horizon"] == 5
    assert meta["sim_params"]["path"] == "envs/params/default.yaml"
    assert re.fullmatch(r"[0-9a-f]{64}", meta["sim_params"]["sha256"])
    assert meta["generation"]["chunk_size"] == G.DEFAULT_CHUNK_SIZE
    assert "carepath_version" in meta


def test_true_phq9_is_the_hidden_severity_and_can_be_left_out(tmp_path, small_frame):
    assert small_frame.true_phq9 is not None
    observed = small_frame.obs[:, FEATURE_INDEX["phq9"]]
    fresh = small_frame.obs[:, FEATURE_INDEX["mask_phq9"]] == 1
    # observed = true + noise (SD ~2.5): close on average, not equal
    assert abs(float(np.mean(observed[fresh] - small_frame.true_phq9[fresh]))) < 1.0
    assert not np.array_equal(observed[fresh], small_frame.true_phq9[fresh])
    out = tmp_path / "no_truth.parquet"
    G.generate(out, policy="stard", epsilon=0.1, patients=5, seed=0, include_true_phq9=False,
               settings=EnvSettings(horizon=3))
    assert "true_phq9" not in pq.read_schema(out).names
    assert load_dataset(out).episodes().true_phq9 is None


def test_failed_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    out = tmp_path / "sub" / "fail.parquet"
    real = G.simulate_chunk
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash in the second chunk")
        return real(*args, **kwargs)

    monkeypatch.setattr(G, "simulate_chunk", failing)
    with pytest.raises(RuntimeError, match="second chunk"):
        G.generate(out, policy="stard", epsilon=0.1, patients=30, seed=0, chunk_size=10,
                   settings=EnvSettings(horizon=3))
    assert list(out.parent.iterdir()) == []

    # an existing file is only replaced by a complete one
    out.write_bytes(b"previous")
    calls.clear()
    with pytest.raises(RuntimeError):
        G.generate(out, policy="stard", epsilon=0.1, patients=30, seed=0, chunk_size=10,
                   settings=EnvSettings(horizon=3))
    assert out.read_bytes() == b"previous" and list(out.parent.iterdir()) == [out]


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown baseline policy"):
        G.generate(tmp_path / "x.parquet", policy="magic", epsilon=0.1, patients=5, seed=0)
    with pytest.raises(ValueError, match="epsilon"):
        G.generate(tmp_path / "x.parquet", policy="stard", epsilon=1.5, patients=5, seed=0)
    with pytest.raises(ValueError, match=r"\.parquet or \.csv"):
        G.generate(tmp_path / "x.txt", policy="stard", epsilon=0.1, patients=5, seed=0)
    assert list(tmp_path.iterdir()) == []
