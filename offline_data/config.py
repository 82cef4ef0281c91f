"""Generation settings from a Hydra-style YAML of ``configs/data/`` and flags.

A data config is the ``data`` config group that ``train.py`` composes too, so
one file serves both: policy, epsilon, patients, seed, and

- ``env``: the simulator settings, by name of a ``configs/env/`` file (its
  ``kwargs``, with its own ``defaults`` list applied) or as a mapping of
  ``envs.params.EnvSettings`` fields plus ``params_path`` and
  ``param_overrides``. (``train.py`` takes them from its ``env`` group.)
- ``out``: where ``carepath data generate`` writes.
- ``path``, ``cache_dir``, ``split``, ``split_seed``: read by ``train.py``
  (an existing log to use, where generated logs are cached, the patient
  split); accepted and checked here, not used.

Files are read with OmegaConf, so ``${...}`` interpolations resolve as under
Hydra. Flags given on the command line win over the file, the file over the
built-in defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envs.params import EnvSettings
from offline_data.generate import DEFAULT_CHUNK_SIZE

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
_ENV_EXTRA = ("params_path", "param_overrides")
_SPLIT_KEYS = ("train", "validation", "test", "seed")


@dataclass
class GenerateConfig:
    """Everything ``carepath data generate`` needs (and what train.py adds)."""

    policy: str = "stard"
    epsilon: float = 0.1
    patients: int = 10_000
    seed: int = 0
    out: Path | None = None
    true_phq9: bool = True
    chunk_size: int = DEFAULT_CHUNK_SIZE
    env: dict[str, Any] = field(default_factory=dict)  # EnvSettings keyword arguments
    params_path: str | None = None
    param_overrides: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    description: str = ""
    # read by train.py only
    path: str | None = None
    cache_dir: str | None = None
    split: dict[str, float] = field(default_factory=dict)
    split_seed: int = 0

    def settings(self) -> EnvSettings:
        try:
            return EnvSettings(**self.env)
        except TypeError as err:
            raise ValueError(f"unknown environment setting: {err}") from None


def resolve_config(ref: str | Path, group: str = "data") -> Path:
    """A path, or a name in configs/<group>/ (``stard`` -> ``configs/data/stard.yaml``)."""
    path = Path(ref)
    if path.is_file():
        return path
    for folder in (Path.cwd() / "configs" / group, CONFIGS / group):
        for candidate in (folder / f"{ref}.yaml", folder / str(ref)):
            if candidate.is_file():
                return candidate
    names = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
    raise FileNotFoundError(f"{group} config {str(ref)!r} not found; expected a YAML path or one of "
                            f"{', '.join(names)} (in {CONFIGS / group})")


def _read_yaml(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OmegaConfBaseException, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable YAML config: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    return {str(k): v for k, v in raw.items()}


def load_config(ref: str | Path) -> GenerateConfig:
    """Read a data config; unknown keys are errors that name the file and key."""
    path = resolve_config(ref)
    raw = _read_yaml(path)
    if "defaults" in raw:
        raise ValueError(f"{path}: a defaults list needs Hydra composition (train.py); `carepath data generate` "
                         "reads one self-contained data config")
    return merge(GenerateConfig(), raw, str(path))


def load_env_config(ref: str | Path) -> dict[str, Any]:
    """The ``kwargs`` of a configs/env/ file, after the files of its ``defaults`` list."""
    path = resolve_config(ref, "env")
    raw = _read_yaml(path)
    kwargs: dict[str, Any] = {}
    for entry in raw.get("defaults") or []:
        if entry != "_self_":
            kwargs.update(load_env_config(path.parent / f"{entry}.yaml"))
    unknown = set(raw) - {"defaults", "id", "kwargs"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; expected id, defaults, kwargs")
    kwargs.update(raw.get("kwargs") or {})
    return kwargs


def merge(config: GenerateConfig, values: Mapping[Any, Any], where: str) -> GenerateConfig:
    """``config`` updated with ``values`` (a config file's mapping or the flags given)."""
    known = {f.name for f in dataclasses.fields(GenerateConfig)} - set(_ENV_EXTRA)
    updates: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"{where}: unknown setting {key!r}; expected one of {', '.join(sorted(known))}")
        if key == "env":
            env = dict(load_env_config(value) if isinstance(value, str) else value or {})
            for extra in _ENV_EXTRA:
                if extra in env:
                    updates[extra] = env.pop(extra)
            env_fields = {f.name for f in dataclasses.fields(EnvSettings)}
            unknown = set(env) - env_fields
            if unknown:
                raise ValueError(f"{where}: unknown env setting(s) {sorted(unknown)}; expected "
                                 f"{', '.join(sorted(env_fields | set(_ENV_EXTRA)))}")
            updates["env"] = {**config.env, **env}
        elif key == "split":
            split = dict(value or {})
            unknown = set(split) - set(_SPLIT_KEYS)
            if unknown:
                raise ValueError(f"{where}: unknown split key(s) {sorted(unknown)}; expected {', '.join(_SPLIT_KEYS)}")
            updates["split"] = split
        elif key == "out":
            updates["out"] = Path(value) if value is not None else None
        else:
            updates[key] = value
    merged = dataclasses.replace(config, **updates)
    merged.param_overrides = dict(merged.param_overrides or {})
    _check(merged, where)
    return merged


def _check(config: GenerateConfig, where: str) -> None:
    for name, low in (("patients", 1), ("seed", 0), ("chunk_size", 1), ("split_seed", 0)):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{where}: {name} must be an integer >= {low}, got {value!r}")
    if not isinstance(config.epsilon, int | float) or not 0.0 <= config.epsilon <= 1.0:
        raise ValueError(f"{where}: epsilon must be a number in [0, 1], got {config.epsilon!r}")
    if not isinstance(config.true_phq9, bool):
        raise ValueError(f"{where}: true_phq9 must be true or false, got {config.true_phq9!r}")
    fractions = {k: v for k, v in config.split.items() if k != "seed"}
    if fractions and abs(sum(fractions.values()) - 1.0) > 1e-9:
        raise ValueError(f"{where}: split fractions must sum to 1, got {fractions}")
