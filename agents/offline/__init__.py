"""Offline agents (logged data), written in torch. Importing this registers them."""

from agents.offline import bc, bcq, cql, dqn

__all__ = ["bc", "bcq", "cql", "dqn"]
