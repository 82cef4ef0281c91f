"""Discrete conservative Q-learning (Kumar et al. 2020, the CQL(H) variant).

TD loss plus ``alpha * (logsumexp_a Q(s, a) - Q(s, a_logged))``: Q-values of
actions the data does not support are pushed down. The logsumexp runs over
the actions allowed at ``s`` only, so blocked actions neither gain nor lose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agents.common.replay import Batch, masked_logsumexp
from agents.offline.base import OfflineConfig, QLearningAgent
from agents.registry import register


@dataclass
class CQLConfig(OfflineConfig):
    # Weight of the conservative penalty. The penalty is in Q units, so it must be
    # small next to the gap between actions' Q-values: our rewards are 0.1-0.5 a
    # week and those gaps a few tenths, and the Atari default of 1.0 (clipped
    # rewards, Q in the tens) pins every choice to the logging policy's mode.
    alpha: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha < 0:
            raise ValueError(f"alpha must be non-negative, got {self.alpha}")


class DiscreteCQL(QLearningAgent):
    algorithm = "cql"
    config: CQLConfig

    def loss_terms(self, q: torch.Tensor, next_q: torch.Tensor, next_q_target: torch.Tensor,
                   batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        td, terms = super().loss_terms(q, next_q, next_q_target, batch)
        q_taken = q.gather(1, batch.actions[:, None]).squeeze(1)
        penalty = (masked_logsumexp(q, batch.masks) - q_taken).mean()
        terms["cql_penalty"] = penalty
        return td + self.config.alpha * penalty, terms


@register("cql", "offline", CQLConfig, "discrete conservative Q-learning (CQL)")
def build(config: CQLConfig) -> DiscreteCQL:
    return DiscreteCQL(config)
