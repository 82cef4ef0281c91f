import tempfile

import numpy as np
import pytest
import torch

from agents import make_agent
from envs import dynamics as D
from envs.params import EnvSettings
from policies import load

ONLINE = ["ppo", "a2c", "dqn", "maskable_ppo"]


@pytest.fixture(scope="module")
def observations(params):
    state = D.initial_state(64, params, EnvSettings(), np.random.default_rng(0))
    return D.observe_and_mask(state)


@pytest.mark.parametrize("name", ONLINE)
def test_export_reproduces_the_sb3_policy_exactly(tmp_path, observations, name, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where SB3 would put its own log folder
    extra = {"learning_starts": 0, "buffer_size": 2000} if name == "dqn" else {"n_steps": 64}
    agent = make_agent(name, {"total_timesteps": 256, "n_envs": 2, "hidden": [16, 16], "device": "cpu",
                              "algo_kwargs": extra})
    agent.fit(progress=False)
    assert list(scratch.glob("SB3-*")) == []  # training leaves no SB3-<time> log folders behind
    obs, mask = observations
    policy = load(agent.export(tmp_path / name, name=name))
    normalised = torch.as_tensor(agent.vec_env.normalize_obs(obs.copy()), dtype=torch.float32)
    with torch.no_grad():
        if name == "dqn":
            expected = agent.model.policy.q_net(normalised).numpy()
        else:
            expected = agent.model.policy.get_distribution(normalised).distribution.logits.numpy()
            expected = expected - expected.max(axis=1, keepdims=True)
    got = policy.outputs(obs)
    if name != "dqn":  # logits are defined up to a constant
        got = got - got.max(axis=1, keepdims=True)
    assert np.allclose(got, expected, atol=1e-5)
    probs = policy.action_probs(obs, mask)
    assert np.all(probs[~mask] == 0.0)
