import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs
from envs.env import CarePathEnv
from envs.spec import ACTION_NAMES, FEATURE_NAMES, N_ACTIONS, Action
from envs.vector_env import CarePathVectorEnv

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def test_checkers_pass():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checker warning is a failure too
        gym_check_env(gym.make(envs.ENV_ID).unwrapped, skip_render_check=True)
        sb3_check_env(CarePathEnv())


def test_contract_names_info_and_determinism():
    env = gym.make(envs.ENV_ID)
    assert env.unwrapped.feature_names == list(FEATURE_NAMES)
    assert env.unwrapped.action_names == list(ACTION_NAMES)
    obs, info = env.reset(seed=11)
    assert obs.shape == (len(FEATURE_NAMES),) and obs.dtype == np.float32
    assert info["action_mask"].dtype == bool and info["action_mask"].shape == (N_ACTIONS,)
    assert 0 <= info["true_phq9"] <= 27
    trajectory = [obs]
    for _ in range(10):
        obs, _, _, _, info = env.step(int(np.flatnonzero(info["action_mask"])[0]))
        trajectory.append(obs)
        assert set(info) >= {"action_mask", "true_phq9"}
    env2 = gym.make(envs.ENV_ID)
    obs2, info2 = env2.reset(seed=11)
    replay = [obs2]
    for _ in range(10):
        obs2, *_, info2 = env2.step(int(np.flatnonzero(info2["action_mask"])[0]))
        replay.append(obs2)
    assert all(np.array_equal(a, b) for a, b in zip(trajectory, replay, strict=True))


@pytest.mark.parametrize("bad", [N_ACTIONS, -1, 2.5, "raise_dose", None, np.array([1, 2])])
def test_action_outside_the_space_raises_valueerror_naming_it(bad):
    env = CarePathEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="outside the action space"):
        env.step(bad)


def test_masked_action_raise_or_penalize():
    strict = CarePathEnv(invalid_action="raise")
    strict.reset(seed=1)
    strict.unwrapped._state[0, envs.dynamics.S.O_ITEM9] = 0  # make sure continue is allowed
    with pytest.raises(ValueError, match="switch_class.*not allowed"):
        strict.step(Action.SWITCH_CLASS)  # week 0: too early to switch
    lenient = CarePathEnv(invalid_action="penalize")
    lenient.reset(seed=1)
    lenient._state[0, envs.dynamics.S.O_ITEM9] = 0
    *_, info = lenient.step(Action.SWITCH_CLASS)
    assert info["invalid_action"] is True


def test_time_limit_truncates_never_terminates():
    env = CarePathEnv(horizon=5, param_overrides={"dropout.base_logit": -30.0})
    _, info = env.reset(seed=2)
    for week in range(1, 6):
        _, _, terminated, truncated, info = env.step(int(np.flatnonzero(info["action_mask"])[0]))
        assert not terminated
        assert truncated == (week == 5)


def test_unknown_setting_is_named():
    with pytest.raises(ValueError, match="unknown environment setting.*colour"):
        CarePathEnv(colour="blue")
    with pytest.raises(ValueError, match="missingness"):
        CarePathEnv(missingness=-1)


def test_ansi_render_describes_the_week():
    env = CarePathEnv(render_mode="ansi")
    env.reset(seed=0)
    env.step(0)
    text = env.render()
    assert "week   1" in text and "PHQ-9 observed" in text and "last action continue" in text


def test_make_vec_native_and_next_step_autoreset():
    vec = gym.make_vec(envs.ENV_ID, num_envs=16, vectorization_mode="vector_entry_point", horizon=3)
    assert isinstance(vec.unwrapped, CarePathVectorEnv)
    obs, info = vec.reset(seed=0)
    assert obs.shape == (16, len(FEATURE_NAMES)) and info["action_mask"].shape == (16, N_ACTIONS)
    done_before = np.zeros(16, dtype=bool)
    for _ in range(8):
        actions = info["action_mask"].argmax(axis=1)
        obs, reward, terminated, truncated, info = vec.step(actions)
        # the step after an episode ended starts a new patient at week 0 with zero reward
        weeks = obs[:, FEATURE_NAMES.index("weeks_in_care")]
        assert np.all(weeks[done_before] == 0) and np.all(reward[done_before] == 0)
        assert not np.any((terminated | truncated)[done_before])
        done_before = terminated | truncated
        assert vec.observation_space.contains(obs)
    with pytest.raises(ValueError, match="expected 16 actions"):
        vec.step(np.zeros(3, dtype=np.int64))


def test_vector_env_matches_seeded_determinism():
    a, b = CarePathVectorEnv(num_envs=8), CarePathVectorEnv(num_envs=8)
    oa, _ = a.reset(seed=4)
    ob, _ = b.reset(seed=4)
    for _ in range(30):
        act = a.action_masks().argmax(axis=1)
        oa, ra, *_ = a.step(act)
        ob, rb, *_ = b.step(act)
        assert np.array_equal(oa, ob) and np.array_equal(ra, rb)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIG_DIR / "env").glob("*.yaml")))
def test_every_env_config_composes_and_runs(name):
    with initialize_config_dir(config_dir=str(CONFIG_DIR / "env"), version_base="1.3"):
        cfg = compose(config_name=name)
    kwargs = OmegaConf.to_container(cfg.kwargs, resolve=True)
    env = gym.make(cfg.id, **kwargs)
    obs, info = env.reset(seed=0)
    for _ in range(3):
        obs, *_ , info = env.step(int(np.flatnonzero(info["action_mask"])[-1]))
    assert env.observation_space.contains(obs)
