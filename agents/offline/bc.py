"""Behaviour cloning: the logging policy, learnt by masked softmax cross-entropy.

The softmax runs over the actions allowed at each state, so the cloned
policy never learns (or later puts) mass on a blocked action. Exported with
a temperature-1 softmax: a stochastic clone of a stochastic logging policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agents.common.replay import Batch
from agents.offline.base import OfflineAgent, OfflineConfig, adam
from agents.registry import register
from policies.bundle import ActionSelection


@dataclass
class BCConfig(OfflineConfig):
    weight_decay: float = 1e-4


class BehaviourCloning(OfflineAgent):
    algorithm = "bc"
    output = "logits"
    config: BCConfig

    def build(self) -> None:
        self.optimizer = adam(self.network.parameters(), self.config.learning_rate,
                              weight_decay=self.config.weight_decay, decoupled=True)

    def selection(self) -> ActionSelection:
        return ActionSelection("softmax", temperature=1.0)

    def update(self, batch: Batch) -> dict[str, float]:
        logits = self.network(batch.obs).masked_fill(~batch.masks, float("-inf"))
        loss = torch.nn.functional.cross_entropy(logits, batch.actions)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        accuracy = (logits.detach().argmax(dim=1) == batch.actions).float().mean()
        return {"bc_loss": float(loss.detach()), "accuracy": float(accuracy)}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"bc": self.optimizer}


@register("bc", "offline", BCConfig, "behaviour cloning (masked softmax)")
def build(config: BCConfig) -> BehaviourCloning:
    return BehaviourCloning(config)
