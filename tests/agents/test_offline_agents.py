import json

import numpy as np
import pytest
import torch

from agents import available, make_agent, make_config
from agents.common.replay import TensorReplay, masked_argmax, masked_logsumexp, masked_max, replay_from_transitions
from envs import dynamics as D
from envs.params import EnvSettings
from envs.spec import ACTION_NAMES, FEATURE_NAMES, N_ACTIONS, N_FEATURES, Action
from policies import StardPolicy, load
from policies.base import sample_actions
from policies.bundle import BundleError

OFFLINE = ["bc", "bcq", "cql", "dqn_offline"]


@pytest.fixture(scope="module")
def replay(params):
    """2,000 simulated patients x 12 weeks under STAR*D with epsilon 0.3."""
    settings = EnvSettings(horizon=12)
    rng, policy_rng = np.random.default_rng(0), np.random.default_rng(1)
    policy = StardPolicy(epsilon=0.3)
    k = D.kernel_params(params, settings)
    state = D.initial_state(2000, params, settings, rng, k)
    obs, mask = D.observe_and_mask(state)
    rows = {key: [] for key in ("obs", "a", "r", "next_obs", "done", "mask", "next_mask")}
    alive = np.ones(len(state), dtype=bool)
    for t in range(12):
        a, _ = sample_actions(policy, obs, mask, policy_rng)
        res = D.step(state, a, params, settings, rng, k)
        done = res.terminated | (t == 11)
        for key, value in (("obs", obs), ("a", a), ("r", res.reward), ("next_obs", res.obs), ("done", done),
                           ("mask", mask), ("next_mask", res.mask)):
            rows[key].append(value[alive])
        alive = alive & ~res.terminated
        state, obs, mask = res.state, res.obs, res.mask
    arrays = {key: np.concatenate(value) for key, value in rows.items()}
    return TensorReplay(arrays["obs"], arrays["a"], arrays["r"], arrays["next_obs"], arrays["done"],
                        arrays["mask"], arrays["next_mask"], seed=0, feature_names=FEATURE_NAMES,
                        action_names=ACTION_NAMES)


def test_registry_lists_the_offline_agents_and_names_bad_options():
    assert set(OFFLINE) <= set(available())
    with pytest.raises(ValueError, match="unknown agent 'sac'"):
        make_config("sac")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['alpah'\]"):
        make_config("cql", {"alpah": 1.0})
    with pytest.raises(ValueError, match="gamma must be in"):
        make_config("cql", {"gamma": 1.5})


def test_masked_helpers_never_pick_a_blocked_action():
    q = torch.tensor([[5.0, 1.0, 9.0], [0.0, -1.0, -2.0]])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    assert masked_max(q, mask).tolist() == [5.0, -1.0]
    assert masked_argmax(q, mask).tolist() == [0, 1]
    expected = torch.logsumexp(torch.tensor([5.0, 1.0]), 0)
    assert torch.isclose(masked_logsumexp(q, mask)[0], expected)


def test_replay_refuses_a_logged_action_its_mask_blocks():
    obs = np.zeros((2, 3), dtype=np.float32)
    mask = np.ones((2, N_ACTIONS), dtype=bool)
    mask[1, 4] = False
    with pytest.raises(ValueError, match="row 1 logs action 4"):
        TensorReplay(obs, np.array([0, 4]), np.zeros(2), obs, np.zeros(2), mask, mask)


@pytest.mark.parametrize("name", OFFLINE)
def test_agent_trains_exports_and_never_chooses_a_blocked_action(tmp_path, replay, name):
    agent = make_agent(name, {"n_updates": 300, "hidden": [64, 64], "batch_size": 128, "device": "cpu"})
    seen = []
    metrics = agent.fit(replay, callback=lambda step, m: seen.append(step), log_every=100, progress=False)
    assert seen == [100, 200, 300] and all(np.isfinite(v) for v in metrics.values())
    policy = load(agent.export(tmp_path / name, name=f"{name}-test"))
    obs = replay.obs[:3000].numpy()
    mask = replay.masks[:3000].numpy()
    probs = policy.action_probs(obs, mask)
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert np.all(probs[~mask] == 0.0)
    item9 = obs[:, 1] >= 2
    if item9.any():
        assert np.all(probs[item9, Action.REFER_SPECIALIST] == 1.0)


def test_behaviour_cloning_recovers_the_logging_policy(replay):
    agent = make_agent("bc", {"n_updates": 800, "hidden": [64, 64], "device": "cpu"})
    agent.fit(replay, progress=False)
    obs, mask = replay.obs[:4000].numpy(), replay.masks[:4000].numpy()
    from policies.bundle import ActionSelection, BundleManifest, BundlePolicy

    clone = BundlePolicy(BundleManifest("bc", "bc", agent.network.spec, ActionSelection("softmax")), agent.network)
    truth = StardPolicy(epsilon=0.3).action_probs(obs, mask)
    learnt = clone.action_probs(obs, mask)
    total_variation = 0.5 * np.abs(truth - learnt).sum(axis=1).mean()
    assert total_variation < 0.2


def test_training_resumes_from_a_checkpoint_to_the_same_result(replay):
    """An interrupted run resumed from its checkpoint ends with the very same weights."""
    config = {"n_updates": 120, "hidden": [32], "batch_size": 64, "device": "cpu", "seed": 3}
    start = replay.generator.get_state()
    straight = make_agent("cql", config)
    straight.fit(replay, progress=False)

    replay.generator.set_state(start)
    interrupted = make_agent("cql", config)
    interrupted.fit(replay, n_updates=60, progress=False)
    checkpoint, sampler = interrupted.state(), replay.generator.get_state()
    resumed = make_agent("cql", config)
    resumed.load_state(checkpoint)
    replay.generator.set_state(sampler)
    resumed.fit(replay, progress=False)
    assert resumed.updates_done == 120
    for a, b in zip(straight.network.parameters(), resumed.network.parameters(), strict=True):
        assert torch.equal(a, b)


def test_replay_from_offline_data_transitions(replay):
    class T:
        obs = replay.obs.numpy()
        action = replay.actions.numpy()
        reward = replay.rewards.numpy()
        next_obs = replay.next_obs.numpy()
        done = replay.dones.numpy() > 0
        mask = replay.masks.numpy()
        next_mask = replay.next_masks.numpy()

    again = replay_from_transitions(T())
    assert again.n == replay.n and torch.equal(again.actions, replay.actions)


@pytest.mark.parametrize("name", ["cql", "bcq"])
def test_default_conservatism_still_finds_a_better_rarely_logged_action(tmp_path, name):
    """One-week episodes logged by a protocol that picks "continue" 90 % of the time and
    explores uniformly otherwise; a rarely logged action is worth 0.8 more, about what
    separates actions' returns in the simulator. The defaults must find it: a penalty or
    threshold tuned for Atari-scale Q-values pins the policy to the protocol's mode."""
    rng = np.random.default_rng(7)
    n = 60_000
    obs = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    actions = np.where(rng.random(n) < 0.9, 0, rng.integers(0, N_ACTIONS, n))
    better = int(Action.ADD_PSYCHOTHERAPY)
    rewards = np.where(actions == better, 1.0, np.where(actions == 0, 0.2, 0.0)) + rng.normal(0, 0.05, n)
    masks = np.ones((n, N_ACTIONS), dtype=bool)
    replay = TensorReplay(obs, actions, rewards.astype(np.float32), obs, np.ones(n), masks, masks, seed=0,
                          feature_names=FEATURE_NAMES, action_names=ACTION_NAMES)
    chosen = {}
    for label, options in (("default", {}), ("atari", {"cql": {"alpha": 1.0}, "bcq": {"threshold": 0.3}}[name])):
        agent = make_agent(name, {"n_updates": 3000, "hidden": [64, 64], "device": "cpu", "seed": 0, **options})
        agent.fit(replay, progress=False)
        policy = load(agent.export(tmp_path / label, name=name))
        chosen[label] = policy.action_probs(obs[:2000], masks[:2000]).argmax(axis=1)
    assert (chosen["default"] == better).mean() > 0.9
    assert (chosen["atari"] == 0).mean() > 0.9


@pytest.mark.parametrize("name", OFFLINE)
def test_agents_learn_from_any_named_data_and_serving_refuses_other_names(tmp_path, name):
    """Sizes and names come from the data, not from the simulator's spec: a log of 5 named
    features and 3 named actions trains every offline agent, and its bundle records those names.
    Loading it to serve depression care is refused, naming the field."""
    rng = np.random.default_rng(0)
    n = 2000
    obs = rng.normal(size=(n, 5)).astype(np.float32)
    masks = np.ones((n, 3), dtype=bool)
    actions = rng.integers(0, 3, n)
    replay = TensorReplay(obs, actions, (actions == 2).astype(np.float32), obs, np.ones(n), masks, masks,
                          feature_names=["hba1c", "bmi", "age", "sbp", "egfr"], action_names=["wait", "metformin",
                                                                                             "insulin"])
    agent = make_agent(name, {"n_updates": 50, "hidden": [16], "batch_size": 32, "device": "cpu"})
    agent.fit(replay, progress=False)
    assert agent.network.spec.n_in == 5 and agent.network.spec.n_out in (3, 6)
    bundle = agent.export(tmp_path / name, name=name)
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["feature_names"][0] == "hba1c" and manifest["action_names"] == ["wait", "metformin", "insulin"]
    with pytest.raises(BundleError, match="feature_names"):
        load(bundle)
    # the same agent cannot silently be fed data with other names
    with pytest.raises(ValueError, match="other names"):
        agent.setup(FEATURE_NAMES, ACTION_NAMES)
    # a checkpoint records the names, so a fresh agent resumes without being told them
    resumed = make_agent(name, {"n_updates": 50, "hidden": [16], "batch_size": 32, "device": "cpu"})
    resumed.load_state(agent.state())
    assert resumed.action_names == ("wait", "metformin", "insulin")


def test_replay_names_must_match_its_columns():
    obs = np.zeros((2, 3), dtype=np.float32)
    mask = np.ones((2, 2), dtype=bool)
    with pytest.raises(ValueError, match="2 feature names for 3 columns"):
        TensorReplay(obs, np.array([0, 1]), np.zeros(2), obs, np.zeros(2), mask, mask, feature_names=["a", "b"])
