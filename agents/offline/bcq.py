"""Discrete batch-constrained Q-learning (Fujimoto et al. 2019, discrete BCQ).

One network with two heads: Q-values and an imitation model G(a|s) of the
logging policy. Q may only choose (in its bootstrap target and at serving)
among allowed actions whose G(a|s) / max_a G(a|s) reaches ``threshold``:
actions the data barely supports are never picked.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from agents.common.replay import Batch, masked_argmax
from agents.offline.base import OfflineAgent, OfflineConfig, adam
from agents.registry import register
from policies.networks import NetworkSpec


@dataclass
class BCQConfig(OfflineConfig):
    # Relative imitation probability G(a|s) / max G an action needs to be chosen. Logs of
    # a near-deterministic protocol with epsilon exploration support the other actions at
    # about epsilon / n_allowed of the mode (~0.01 at epsilon 0.1): the usual 0.3 would
    # only ever allow the protocol's own choice.
    threshold: float = 0.005
    imitation_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")


class DiscreteBCQ(OfflineAgent):
    algorithm = "bcq"
    output = "q_bcq"
    config: BCQConfig

    def network_spec(self) -> NetworkSpec:
        return NetworkSpec(len(self.feature_names), 2 * self.n_actions, self.config.hidden, output="q_bcq",
                           extra={"threshold": self.config.threshold})

    def build(self) -> None:
        self.target = copy.deepcopy(self.network).requires_grad_(False)
        self.optimizer = adam(self.network.parameters(), self.config.learning_rate)

    def _plausible(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        log_rel = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=1)
        log_rel = log_rel - log_rel.max(dim=1, keepdim=True).values
        return mask & (log_rel >= torch.log(torch.tensor(max(self.config.threshold, 1e-12))))

    def update(self, batch: Batch) -> dict[str, float]:
        out = self.network(batch.obs)
        a = self.n_actions
        q, logits = out[:, :a], out[:, a:]
        with torch.no_grad():
            next_out = self.network(batch.next_obs)
            allowed = self._plausible(next_out[:, a:], batch.next_masks)
            next_action = masked_argmax(next_out[:, :a], allowed)
            next_q = self.target(batch.next_obs)[:, :a].gather(1, next_action[:, None]).squeeze(1)
            target = batch.rewards + self.config.gamma * (1.0 - batch.dones) * next_q
        q_taken = q.gather(1, batch.actions[:, None]).squeeze(1)
        td = torch.nn.functional.smooth_l1_loss(q_taken, target)
        imitation = torch.nn.functional.cross_entropy(logits.masked_fill(~batch.masks, float("-inf")), batch.actions)
        loss = td + self.config.imitation_weight * imitation
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if (self.updates_done + 1) % self.config.target_update_interval == 0:
            self.target.load_state_dict(self.network.state_dict())
        return {"td_loss": float(td.detach()), "imitation_loss": float(imitation.detach()),
                "q_mean": float(q_taken.detach().mean())}

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"network": self.network, "target": self.target}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"q": self.optimizer}


@register("bcq", "offline", BCQConfig, "discrete batch-constrained Q-learning (BCQ)")
def build(config: BCQConfig) -> DiscreteBCQ:
    return DiscreteBCQ(config)
