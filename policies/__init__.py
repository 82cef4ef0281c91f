"""Policies: the protocol, baseline clinical policies and policy bundles (``policies.load``)."""

from policies.base import Policy, greedy_actions, sample_actions
from policies.baselines import BASELINES, RandomPolicy, StardPolicy, UsualCarePolicy, make_baseline
from policies.bundle import BundleError, BundlePolicy, load

__all__ = [
    "BASELINES",
    "BundleError",
    "BundlePolicy",
    "Policy",
    "RandomPolicy",
    "StardPolicy",
    "UsualCarePolicy",
    "greedy_actions",
    "load",
    "make_baseline",
    "sample_actions",
]
