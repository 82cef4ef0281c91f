"""Shared config and training loop of the offline (logged-data) agents.

Each algorithm is a config dataclass plus an implementation of
``update(batch) -> metrics``; the loop, checkpoints and export to a policy
bundle are here. Action masks are respected everywhere: in the bootstrap
target (max over the next state's allowed actions), in every softmax, and
at action selection (the bundle's policy never puts mass on a blocked action).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm import tqdm

from agents.common.replay import Batch, TensorReplay, masked_argmax, masked_max
from policies.bundle import ActionSelection, BundleManifest, save_bundle
from policies.networks import NetworkSpec, PolicyNetwork

MetricsCallback = Callable[[int, dict[str, float]], None]


def resolve_device(device: str) -> torch.device:
    """``auto`` uses CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: {err}") from None


def adam(params: Any, lr: float, weight_decay: float = 0.0, decoupled: bool = False) -> torch.optim.Optimizer:
    """Adam (AdamW when ``decoupled``) with the fused kernel: one kernel for all parameters
    instead of several per tensor, worth 15-20 % of an update of these small networks on CPU."""
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=weight_decay, fused=True)


@dataclass
class OfflineConfig:
    """Options every offline agent shares (Hydra ``agent.*``)."""

    n_updates: int = 20_000
    batch_size: int = 256
    hidden: tuple[int, ...] = (256, 256)
    learning_rate: float = 3e-4
    gamma: float = 0.99
    target_update_interval: int = 500  # hard copy of the target network, in updates
    seed: int = 0
    device: str = "auto"
    torch_threads: int = 0  # 0: leave torch's default

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        for name in ("n_updates", "batch_size", "target_update_interval"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


class OfflineAgent:
    """Base of the offline agents: subclasses set ``algorithm`` and implement ``build`` and ``update``."""

    algorithm: ClassVar[str] = ""
    output: ClassVar[str] = "q_values"

    network: PolicyNetwork

    def __init__(self, config: OfflineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        if config.torch_threads > 0:
            torch.set_num_threads(config.torch_threads)
        #: the named features and actions of the data the agent learns from (set by :meth:`setup`)
        self.feature_names: tuple[str, ...] = ()
        self.action_names: tuple[str, ...] = ()
        self.updates_done = 0

    @property
    def ready(self) -> bool:
        """Whether :meth:`setup` has built the network."""
        return bool(self.feature_names)

    def setup(self, feature_names: Sequence[str], action_names: Sequence[str]) -> None:
        """Build the network for data with these named features and actions: sizes and names come
        from the data, never from the simulator's spec. Seeded here, so that the initial weights
        depend on the seed alone. Setting up again with other names is refused."""
        names = (tuple(str(n) for n in feature_names), tuple(str(n) for n in action_names))
        if not names[0] or not names[1]:
            raise ValueError("an agent needs at least one named feature and one named action")
        if self.ready:
            if names != (self.feature_names, self.action_names):
                raise ValueError(f"{self.algorithm} was set up for {len(self.feature_names)} features and "
                                 f"{len(self.action_names)} actions with other names; this data has "
                                 f"{len(names[0])} and {len(names[1])}")
            return
        self.feature_names, self.action_names = names
        torch.manual_seed(self.config.seed)
        self.network = PolicyNetwork(self.network_spec()).to(self.device)

    def prepare(self, replay: TensorReplay,
                stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Set up for ``replay``'s data and, before the first update, normalise observations by its
        mean and standard deviation (``stats`` when the caller has them already) and build the
        optimisers; a resumed agent keeps what its checkpoint restored."""
        self.setup(replay.feature_names, replay.action_names)
        if self.updates_done == 0:
            mean, std = stats if stats is not None else replay.obs_stats()
            self.network.set_normalization(mean, std)
            self.build()

    @property
    def n_actions(self) -> int:
        return len(self.action_names)

    def network_spec(self) -> NetworkSpec:
        return NetworkSpec(len(self.feature_names), self.n_actions, self.config.hidden,
                           output=self.output)  # type: ignore[arg-type]

    def selection(self) -> ActionSelection:
        """How the trained network picks actions in the bundle (greedy over allowed by default)."""
        return ActionSelection("greedy")

    def build(self) -> None:
        """Create optimisers and auxiliary networks (after the normalisation is set)."""
        raise NotImplementedError

    def update(self, batch: Batch) -> dict[str, float]:
        raise NotImplementedError

    # ------------------------------------------------------------------ loop

    def fit(
        self,
        replay: TensorReplay,
        n_updates: int | None = None,
        callback: MetricsCallback | None = None,
        log_every: int = 250,
        progress: bool = True,
        checkpoint: Callable[[int], None] | None = None,
        checkpoint_every: int = 0,
    ) -> dict[str, float]:
        """Run ``n_updates`` gradient updates (default: the config's), resuming where a
        checkpoint left off; returns the last logged metrics."""
        total = int(n_updates if n_updates is not None else self.config.n_updates)
        self.prepare(replay)
        last: dict[str, float] = {}
        sums: dict[str, float] = {}
        count = 0
        bar = tqdm(total=total, initial=self.updates_done, desc=f"training {self.algorithm}", unit="update",
                   disable=not progress, leave=False)
        while self.updates_done < total:
            metrics = self.update(replay.sample(self.config.batch_size))
            self.updates_done += 1
            count += 1
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
            if self.updates_done % log_every == 0 or self.updates_done == total:
                last = {key: value / count for key, value in sums.items()}
                if callback is not None:
                    callback(self.updates_done, last)
                sums, count = {}, 0
                bar.set_postfix({k: f"{v:.3g}" for k, v in list(last.items())[:2]})
            if checkpoint is not None and checkpoint_every and self.updates_done % checkpoint_every == 0:
                checkpoint(self.updates_done)
            bar.update(1)
        bar.close()
        return last

    # ------------------------------------------------------------------ export and checkpoints

    def export(self, path: str | Path, name: str, config: dict[str, Any] | None = None,
               data: dict[str, Any] | None = None, evaluation: dict[str, Any] | None = None,
               overwrite: bool = False) -> Path:
        manifest = BundleManifest(algorithm=self.algorithm, name=name, network=self.network.spec,
                                  selection=self.selection(), config=config or {"agent": self.config.to_dict()},
                                  data=data or {}, evaluation=evaluation or {},
                                  feature_names=list(self.feature_names), action_names=list(self.action_names))
        return save_bundle(path, self.network.cpu(), manifest, overwrite=overwrite)

    def state(self) -> dict[str, Any]:
        """Everything needed to resume: module and optimiser states, counters."""
        return {"updates_done": self.updates_done, "modules": {k: m.state_dict() for k, m in self.modules().items()},
                "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()},
                "names": {"features": list(self.feature_names), "actions": list(self.action_names)}}

    def load_state(self, state: dict[str, Any]) -> None:
        names = state.get("names")
        if names is not None:
            self.setup(names["features"], names["actions"])
        elif not self.ready:  # a checkpoint from before names were recorded: the caller knows the data
            raise ValueError("this checkpoint does not name its data's features and actions: set the agent up "
                             "for its data first (agent.setup)")
        self.build()
        for key, module in self.modules().items():
            module.load_state_dict(state["modules"][key])
        for key, opt in self.optimizers().items():
            opt.load_state_dict(state["optimizers"][key])
        self.updates_done = int(state["updates_done"])

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"network": self.network}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}


class QLearningAgent(OfflineAgent):
    """Masked double Q-learning with a hard-copied target network; CQL adds its penalty.

    The loss is a pure function of the networks' outputs (:meth:`loss_terms`), so that a sweep
    can train many members as one stacked model under ``torch.func.vmap``
    (:mod:`agents.offline.batched`) with the same arithmetic as a single run."""

    def build(self) -> None:
        self.target = copy.deepcopy(self.network).requires_grad_(False)
        self.optimizer = adam(self.network.parameters(), self.config.learning_rate)

    def loss_terms(self, q: torch.Tensor, next_q: torch.Tensor, next_q_target: torch.Tensor,
                   batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and its named terms from Q(obs), and, without gradient, the online and target
        networks' Q(next_obs). Tensors only (no ``.item()``): it must run under ``vmap``."""
        # double Q-learning: the online net picks among the next state's allowed
        # actions, the target net values the pick
        next_action = masked_argmax(next_q, batch.next_masks)
        next_value = next_q_target.gather(1, next_action[:, None]).squeeze(1)
        target = batch.rewards + self.config.gamma * (1.0 - batch.dones) * next_value
        q_taken = q.gather(1, batch.actions[:, None]).squeeze(1)
        td = torch.nn.functional.smooth_l1_loss(q_taken, target)
        return td, {"td_loss": td, "q_mean": q_taken.mean()}

    def update(self, batch: Batch) -> dict[str, float]:
        q = self.network(batch.obs)
        with torch.no_grad():
            next_q, next_q_target = self.network(batch.next_obs), self.target(batch.next_obs)
        loss, terms = self.loss_terms(q, next_q, next_q_target, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if (self.updates_done + 1) % self.config.target_update_interval == 0:
            self.target.load_state_dict(self.network.state_dict())
        return {key: float(value.detach()) for key, value in terms.items()}

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"network": self.network, "target": self.target}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"q": self.optimizer}


__all__ = ["OfflineAgent", "OfflineConfig", "QLearningAgent", "masked_max", "resolve_device"]
