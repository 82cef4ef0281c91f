"""Policies: the protocol, baseline clinical policies and (later) policy bundles."""

from policies.base import Policy, greedy_actions, sample_actions
from policies.baselines import BASELINES, RandomPolicy, StardPolicy, UsualCarePolicy, make_baseline

__all__ = [
    "BASELINES",
    "Policy",
    "RandomPolicy",
    "StardPolicy",
    "UsualCarePolicy",
    "greedy_actions",
    "make_baseline",
    "sample_actions",
]
