"""Networks a policy bundle can rebuild from its ``bundle.json`` alone.

Agents train these modules; bundles store their weights; serving rebuilds
them here without importing ``agents`` (imports flow one way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

Activation = Literal["relu", "tanh", "elu"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}


@dataclass(frozen=True)
class NetworkSpec:
    """Architecture of an MLP head: inputs -> hidden layers -> ``n_out`` outputs.

    ``output`` says what the outputs mean: ``q_values`` (expected return of
    each action), ``logits`` (unnormalised action preferences),
    ``q_ensemble`` (``ensemble`` Q heads, for uncertainty) or ``q_bcq``
    (``n_out`` = 2 x actions: Q-values, then imitation logits whose
    relative probability must reach ``extra["threshold"]`` for an action to
    be chosen, as in discrete BCQ).
    """

    n_in: int
    n_out: int
    hidden: tuple[int, ...] = (256, 256)
    activation: Activation = "relu"
    output: Literal["q_values", "logits", "q_ensemble", "q_bcq"] = "q_values"
    ensemble: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_in < 1 or self.n_out < 1:
            raise ValueError(f"network needs positive input and output sizes, got {self.n_in} -> {self.n_out}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden layer sizes must be positive, got {self.hidden}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        if self.output not in ("q_values", "logits", "q_ensemble", "q_bcq"):
            raise ValueError(f"unknown network output {self.output!r}")
        if self.output == "q_bcq" and (self.n_out % 2 or not 0.0 <= float(self.extra.get("threshold", -1)) <= 1.0):
            raise ValueError("a q_bcq network needs an even n_out and extra['threshold'] in [0, 1]")
        if self.ensemble < 1:
            raise ValueError(f"ensemble must be at least 1, got {self.ensemble}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetworkSpec:
        allowed = {"n_in", "n_out", "hidden", "activation", "output", "ensemble", "extra"}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"network spec: unknown field(s) {sorted(unknown)}")
        try:
            return cls(**{**d, "hidden": tuple(int(h) for h in d.get("hidden", (256, 256)))})
        except TypeError as err:
            raise ValueError(f"network spec: {err}") from None


def mlp(n_in: int, n_out: int, hidden: Sequence[int], activation: Activation = "relu") -> nn.Sequential:
    layers: list[nn.Module] = []
    last = n_in
    for width in hidden:
        layers += [nn.Linear(last, width), _ACTIVATIONS[activation]()]
        last = width
    layers.append(nn.Linear(last, n_out))
    return nn.Sequential(*layers)


class PolicyNetwork(nn.Module):
    """Normalise observations, then one MLP (or an ensemble of them).

    The observation normalisation lives inside the module as buffers, so
    the weights file alone reproduces the policy's inputs exactly.
    """

    obs_mean: torch.Tensor
    obs_std: torch.Tensor

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("obs_mean", torch.zeros(spec.n_in))
        self.register_buffer("obs_std", torch.ones(spec.n_in))
        self.heads = nn.ModuleList(
            mlp(spec.n_in, spec.n_out, spec.hidden, spec.activation) for _ in range(spec.ensemble)
        )

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.obs_mean.copy_(mean)
        # constant features (std 0) pass through centred rather than exploding
        self.obs_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """(batch, n_in) -> (batch, n_out), or (ensemble, batch, n_out) for ``q_ensemble``."""
        x = (obs - self.obs_mean) / self.obs_std
        clip = self.spec.extra.get("clip_obs")
        if clip is not None:  # as stable-baselines3's VecNormalize does
            x = x.clamp(-float(clip), float(clip))
        if self.spec.output == "q_ensemble":
            return torch.stack([head(x) for head in self.heads])
        return self.heads[0](x)
