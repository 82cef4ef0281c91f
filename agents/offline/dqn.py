"""Offline DQN / fitted Q iteration: masked double Q-learning on logged data, no penalty.

The baseline every conservative method is measured against: without a
penalty, Q-values of actions the logging policy rarely took are extrapolated
and often overestimated.
"""

from __future__ import annotations

from dataclasses import dataclass

from agents.offline.base import OfflineConfig, QLearningAgent
from agents.registry import register


@dataclass
class DQNConfig(OfflineConfig):
    pass


class OfflineDQN(QLearningAgent):
    algorithm = "dqn_offline"


@register("dqn_offline", "offline", DQNConfig, "offline DQN (fitted Q iteration with a target network)")
def build(config: DQNConfig) -> OfflineDQN:
    return OfflineDQN(config)
