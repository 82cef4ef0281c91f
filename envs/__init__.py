"""The depression-care simulator: pure batched dynamics and thin Gymnasium shells.

Importing ``envs`` registers ``CarePath-Depression-v0`` for ``gymnasium.make``
and ``gymnasium.make_vec(..., vectorization_mode="vector_entry_point")``.
"""

from gymnasium.envs.registration import register, registry

from envs.params import EnvSettings, SimParams, load_params
from envs.spec import ACTION_NAMES, FEATURE_NAMES, N_ACTIONS, N_FEATURES, Action

ENV_ID = "CarePath-Depression-v0"

if ENV_ID not in registry:
    # No max_episode_steps: the env truncates at its own (configurable) horizon.
    register(
        id=ENV_ID,
        entry_point="envs.env:CarePathEnv",
        vector_entry_point="envs.vector_env:CarePathVectorEnv",
    )

__all__ = [
    "ACTION_NAMES",
    "ENV_ID",
    "FEATURE_NAMES",
    "N_ACTIONS",
    "N_FEATURES",
    "Action",
    "EnvSettings",
    "SimParams",
    "load_params",
]
