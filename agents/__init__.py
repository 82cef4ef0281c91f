"""Agents: offline (torch, logged data) and online (stable-baselines3, simulator), one registry."""

from agents.registry import AGENTS, available, entry, make_agent, make_config, register

__all__ = ["AGENTS", "available", "entry", "make_agent", "make_config", "register"]
