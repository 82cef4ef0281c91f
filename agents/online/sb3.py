"""PPO, A2C, DQN (stable-baselines3) and MaskablePPO (sb3-contrib) on the simulator.

Training runs on vectorised copies of ``CarePath-Depression-v0`` with
observation normalisation (VecNormalize). The trained policy is exported to
a plain :class:`~policies.networks.PolicyNetwork` (weights copied layer by
layer, the normalisation statistics and clip included), so a bundle never
needs SB3 or pickle to run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize

from agents.offline.base import MetricsCallback, resolve_device
from agents.registry import register
from envs.env import CarePathEnv
from envs.spec import N_ACTIONS, N_FEATURES
from policies.bundle import ActionSelection, BundleManifest, save_bundle
from policies.networks import NetworkSpec, PolicyNetwork

Algo = Literal["ppo", "a2c", "dqn", "maskable_ppo"]


@dataclass
class OnlineConfig:
    """Options of the online agents (Hydra ``agent.*``); ``algo_kwargs`` go to the SB3 class."""

    total_timesteps: int = 200_000
    n_envs: int = 8
    vec_env: Literal["dummy", "subproc"] = "dummy"
    hidden: tuple[int, ...] = (64, 64)
    learning_rate: float = 3e-4
    gamma: float = 0.99
    normalize_obs: bool = True
    seed: int = 0
    device: str = "auto"
    env: dict[str, Any] = field(default_factory=dict)  # CarePathEnv kwargs
    algo_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.total_timesteps < 1 or self.n_envs < 1:
            raise ValueError("total_timesteps and n_envs must be positive")
        if self.vec_env not in ("dummy", "subproc"):
            raise ValueError(f"vec_env must be 'dummy' or 'subproc', got {self.vec_env!r}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


class _Reporter(BaseCallback):
    """Passes finished episodes' returns and SB3's own train/* values to our callback."""

    def __init__(self, callback: MetricsCallback | None, every: int) -> None:
        super().__init__()
        self.report, self.every = callback, every
        self.returns: list[float] = []

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", []):
            if "episode" in info:
                self.returns.append(float(info["episode"]["r"]))
        if self.report is not None and self.num_timesteps % self.every < self.training_env.num_envs and self.returns:
            metrics = {"episode_return": float(np.mean(self.returns[-100:]))}
            for key, value in self.logger.name_to_value.items():
                if key.startswith("train/"):
                    metrics[key.removeprefix("train/")] = float(value)
            self.report(self.num_timesteps, metrics)
        return True


class OnlineAgent:
    algorithm: ClassVar[Algo]

    def __init__(self, config: OnlineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.vec_env = self._make_env()
        self.model = self._make_model()
        # Our callback reads SB3's logged values and reports them (TensorBoard, train.log). Without a
        # logger of its own, SB3 makes an empty tempdir/SB3-<time> folder on every learn() and leaves it.
        self.model.set_logger(Logger(folder=None, output_formats=[]))

    def _make_env(self) -> VecNormalize | Any:
        cls = SubprocVecEnv if self.config.vec_env == "subproc" else DummyVecEnv
        env = make_vec_env(CarePathEnv, n_envs=self.config.n_envs, seed=self.config.seed, vec_env_cls=cls,
                           env_kwargs={"invalid_action": "penalize", **self.config.env})
        if self.config.normalize_obs:
            return VecNormalize(env, norm_obs=True, norm_reward=False, clip_obs=10.0, gamma=self.config.gamma)
        return env

    def _make_model(self) -> BaseAlgorithm:
        raise NotImplementedError

    def fit(self, callback: MetricsCallback | None = None, log_every: int = 2048, progress: bool = True) -> None:
        self.model.learn(total_timesteps=self.config.total_timesteps, callback=_Reporter(callback, log_every),
                         progress_bar=progress)

    def to_network(self) -> PolicyNetwork:
        """The trained policy as a plain torch module (logits, or Q-values for DQN)."""
        raise NotImplementedError

    def _normalised(self, spec_extra: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        if isinstance(self.vec_env, VecNormalize):
            rms: Any = self.vec_env.obs_rms  # one RunningMeanStd: the observation is a flat Box
            mean = torch.as_tensor(rms.mean, dtype=torch.float32)
            std = torch.sqrt(torch.as_tensor(rms.var, dtype=torch.float32) + self.vec_env.epsilon)
            return mean, std, {**spec_extra, "clip_obs": float(self.vec_env.clip_obs)}
        return torch.zeros(N_FEATURES), torch.ones(N_FEATURES), spec_extra

    def export(self, path: str | Path, name: str, config: dict[str, Any] | None = None,
               data: dict[str, Any] | None = None, evaluation: dict[str, Any] | None = None,
               overwrite: bool = False) -> Path:
        network = self.to_network()
        manifest = BundleManifest(algorithm=self.algorithm, name=name, network=network.spec,
                                  selection=ActionSelection("greedy"),
                                  config=config or {"agent": self.config.to_dict()}, data=data or {},
                                  evaluation=evaluation or {})
        return save_bundle(path, network, manifest, overwrite=overwrite)


def _linears(module: Any) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def _copy_mlp(target: torch.nn.Module, linears: list[torch.nn.Linear]) -> None:
    ours = _linears(target)
    if len(ours) != len(linears):
        raise ValueError(f"cannot export: {len(linears)} linear layers into a network of {len(ours)}")
    with torch.no_grad():
        for mine, theirs in zip(ours, linears, strict=True):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)


class _ActorCritic(OnlineAgent):
    """PPO, A2C, MaskablePPO: the actor (mlp_extractor.policy_net + action_net) becomes logits."""

    def _policy_kwargs(self) -> dict[str, Any]:
        return {"net_arch": {"pi": list(self.config.hidden), "vf": list(self.config.hidden)},
                "activation_fn": torch.nn.Tanh}

    def to_network(self) -> PolicyNetwork:
        policy: Any = self.model.policy
        linears = [*_linears(policy.mlp_extractor.policy_net), policy.action_net]
        mean, std, extra = self._normalised({})
        network = PolicyNetwork(NetworkSpec(N_FEATURES, N_ACTIONS, self.config.hidden, "tanh", "logits",
                                            extra=extra))
        network.set_normalization(mean, std)
        _copy_mlp(network.heads[0], linears)
        return network


class PPOAgent(_ActorCritic):
    algorithm = "ppo"

    def _make_model(self) -> BaseAlgorithm:
        from stable_baselines3 import PPO

        return PPO("MlpPolicy", self.vec_env, learning_rate=self.config.learning_rate, gamma=self.config.gamma,
                   policy_kwargs=self._policy_kwargs(), seed=self.config.seed, device=self.device, verbose=0,
                   **self.config.algo_kwargs)


class A2CAgent(_ActorCritic):
    algorithm = "a2c"

    def _make_model(self) -> BaseAlgorithm:
        from stable_baselines3 import A2C

        return A2C("MlpPolicy", self.vec_env, learning_rate=self.config.learning_rate, gamma=self.config.gamma,
                   policy_kwargs=self._policy_kwargs(), seed=self.config.seed, device=self.device, verbose=0,
                   **self.config.algo_kwargs)


class MaskablePPOAgent(_ActorCritic):
    """Masks come from the env's ``action_masks()`` (our ``info["action_mask"]``)."""

    algorithm = "maskable_ppo"

    def _make_model(self) -> BaseAlgorithm:
        from sb3_contrib import MaskablePPO

        return MaskablePPO("MlpPolicy", self.vec_env, learning_rate=self.config.learning_rate,
                           gamma=self.config.gamma, policy_kwargs=self._policy_kwargs(), seed=self.config.seed,
                           device=self.device, verbose=0, **self.config.algo_kwargs)


class DQNAgent(OnlineAgent):
    algorithm = "dqn"

    def _make_model(self) -> BaseAlgorithm:
        from stable_baselines3 import DQN

        return DQN("MlpPolicy", self.vec_env, learning_rate=self.config.learning_rate, gamma=self.config.gamma,
                   policy_kwargs={"net_arch": list(self.config.hidden)}, seed=self.config.seed,
                   device=self.device, verbose=0, **self.config.algo_kwargs)

    def to_network(self) -> PolicyNetwork:
        policy: Any = self.model.policy
        linears = _linears(policy.q_net.q_net)
        mean, std, extra = self._normalised({})
        network = PolicyNetwork(NetworkSpec(N_FEATURES, N_ACTIONS, self.config.hidden, "relu", "q_values",
                                            extra=extra))
        network.set_normalization(mean, std)
        _copy_mlp(network.heads[0], linears)
        return network


_BUILDERS: dict[str, tuple[type[OnlineAgent], str]] = {
    "ppo": (PPOAgent, "PPO (stable-baselines3) on the simulator"),
    "a2c": (A2CAgent, "A2C (stable-baselines3) on the simulator"),
    "dqn": (DQNAgent, "DQN (stable-baselines3) on the simulator"),
    "maskable_ppo": (MaskablePPOAgent, "MaskablePPO (sb3-contrib), action masks from the simulator"),
}


def _factory(cls: type[OnlineAgent]) -> Callable[[OnlineConfig], OnlineAgent]:
    return lambda config: cls(config)


for _name, (_cls, _description) in _BUILDERS.items():
    register(_name, "online", OnlineConfig, _description)(_factory(_cls))
