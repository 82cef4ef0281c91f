"""Online agents (the simulator), from stable-baselines3 and sb3-contrib. Importing registers them."""

from agents.online import sb3

__all__ = ["sb3"]
