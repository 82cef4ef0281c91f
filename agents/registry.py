"""One registry from the Hydra name (``agent=<name>``) to an algorithm.

Adding an algorithm is one file that calls :func:`register` and one config
in ``configs/agent/``. Each entry is a config dataclass and a factory, as in
d3rlpy and SB3.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["offline", "online"]


@dataclass(frozen=True)
class AgentEntry:
    name: str
    kind: Kind
    config_cls: type
    build: Callable[[Any], Any]
    description: str


AGENTS: dict[str, AgentEntry] = {}


def register(name: str, kind: Kind, config_cls: type, description: str) -> Callable[[Callable[[Any], Any]], Any]:
    """Decorator for an algorithm's factory: ``build(config) -> agent``."""

    def decorate(build: Callable[[Any], Any]) -> Callable[[Any], Any]:
        if name in AGENTS:
            raise ValueError(f"agent {name!r} is registered twice")
        AGENTS[name] = AgentEntry(name, kind, config_cls, build, description)
        return build

    return decorate


def _load_all() -> None:
    # importing the algorithm modules registers them
    import agents.offline
    import agents.online  # noqa: F401


def entry(name: str) -> AgentEntry:
    _load_all()
    try:
        return AGENTS[name]
    except KeyError:
        raise ValueError(f"unknown agent {name!r}; expected one of {', '.join(sorted(AGENTS))}") from None


def make_config(name: str, values: Mapping[str, Any] | None = None) -> Any:
    """The algorithm's config dataclass from (Hydra) values; unknown keys are named."""
    cls = entry(name).config_cls
    values = dict(values or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - fields
    if unknown:
        raise ValueError(f"agent {name!r}: unknown option(s) {sorted(unknown)}; expected some of {sorted(fields)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"agent {name!r}: {err}") from None


def make_agent(name: str, values: Mapping[str, Any] | None = None) -> Any:
    return entry(name).build(make_config(name, values))


def available() -> list[str]:
    _load_all()
    return sorted(AGENTS)
