"""A behaviour policy as a model: multinomial logistic regression over the allowed actions.

The model of how logged clinicians chose (fitted in :mod:`offline_data.behavior`)
is also a policy: certified candidates mix a trained policy with it, so it
travels inside policy bundles and serving evaluates it. It lives here, before
``offline_data``, because a bundle rebuilds everything it serves from
``policies`` alone (design.md: import order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import sparse
from scipy.optimize import minimize

from envs.spec import N_ACTIONS, N_FEATURES

MAX_CATEGORIES = 32
_PREDICT_BLOCK = 65_536


@dataclass(frozen=True)
class Encoder:
    """Observation (+ allowed actions) -> design matrix."""

    categorical: list[int]  # feature indices one-hot encoded
    categories: list[NDArray[np.float32]]  # their values
    continuous: list[int]
    mean: NDArray[np.float64]
    scale: NDArray[np.float64]

    @classmethod
    def fit(cls, obs: NDArray[np.float32]) -> Encoder:
        categorical, categories, continuous = [], [], []
        for j in range(obs.shape[1]):
            values = np.unique(obs[:, j])
            if len(values) <= MAX_CATEGORIES and np.all(values == np.round(values)):
                if len(values) > 1:
                    categorical.append(j)
                    categories.append(values)
            else:
                continuous.append(j)
        x = obs[:, continuous].astype(np.float64)
        scale = x.std(axis=0)
        return cls(categorical, categories, continuous, x.mean(axis=0), np.where(scale > 0, scale, 1.0))

    def transform(self, obs: NDArray[np.float32], allowed: NDArray[np.bool_]) -> sparse.csr_matrix:
        """Sparse design matrix: standardised continuous features, one-hot
        categorical ones, allowed-action indicators (most entries are zero)."""
        n = len(obs)
        blocks = [sparse.csr_matrix((obs[:, self.continuous] - self.mean) / self.scale)]
        for j, values in zip(self.categorical, self.categories, strict=True):
            position = np.searchsorted(values, obs[:, j])
            known = (position < len(values)) & (values[np.minimum(position, len(values) - 1)] == obs[:, j])
            rows = np.flatnonzero(known)  # values unseen when fitting: all zero
            blocks.append(sparse.csr_matrix((np.ones(len(rows)), (rows, position[known])), shape=(n, len(values))))
        blocks.append(sparse.csr_matrix(allowed.astype(np.float64)))
        return sparse.hstack(blocks, format="csr")


@dataclass(frozen=True)
class MaskedLogit:
    """Multinomial logistic regression whose softmax runs over the allowed actions only.

    ``p(a | x) = exp(w_a . x + b_a) / sum over allowed a' of exp(w_a' . x + b_a')``:
    the restriction to allowed actions is part of the likelihood, not applied
    afterwards, so a policy that is uniform over whatever is allowed is
    represented exactly (equal weights), which a plain softmax fitted on all
    actions cannot do. Fitted by L-BFGS with a small L2 penalty.
    """

    weights: NDArray[np.float64]  # (n_inputs, n_actions)
    bias: NDArray[np.float64]  # (n_actions,)

    @classmethod
    def fit(cls, x: sparse.csr_matrix, allowed: NDArray[np.bool_], action: NDArray[np.int64], *,
            l2: float = 1e-3, max_iter: int = 200, start: MaskedLogit | None = None) -> MaskedLogit:
        n, d = x.shape
        onehot = np.zeros((n, N_ACTIONS))
        onehot[np.arange(n), action] = 1.0
        blocked = np.where(allowed, 0.0, -np.inf)

        def loss_and_grad(theta: NDArray[np.float64]) -> tuple[float, NDArray[np.float64]]:
            w = theta[: d * N_ACTIONS].reshape(d, N_ACTIONS)
            b = theta[d * N_ACTIONS:]
            logp = _log_softmax(x @ w + b + blocked)
            loss = -float(logp[np.arange(n), action].mean()) + 0.5 * l2 * float((w * w).sum())
            residual = (np.exp(logp) - onehot) / n
            grad_w = np.asarray(x.T @ residual) + l2 * w
            return loss, np.concatenate([grad_w.ravel(), residual.sum(axis=0)])

        theta0 = np.zeros(d * N_ACTIONS + N_ACTIONS) if start is None else np.concatenate(
            [start.weights.ravel(), start.bias])
        result = minimize(loss_and_grad, theta0, jac=True, method="L-BFGS-B",
                          options={"maxiter": max_iter, "ftol": 1e-8, "gtol": 1e-5})
        theta = result.x
        return cls(theta[: d * N_ACTIONS].reshape(d, N_ACTIONS), theta[d * N_ACTIONS:])

    def predict(self, x: sparse.csr_matrix, allowed: NDArray[np.bool_]) -> NDArray[np.float64]:
        return np.exp(_log_softmax(x @ self.weights + self.bias + np.where(allowed, 0.0, -np.inf)))


def _log_softmax(z: NDArray[np.float64]) -> NDArray[np.float64]:
    top = z.max(axis=1, keepdims=True)
    shifted = z - top
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


@dataclass
class BehaviourModel:
    """A fitted behaviour model as a policy: ``action_probs(obs, mask)`` over allowed actions.

    Certification serves mixtures of a trained policy and the estimated
    behaviour policy, so the model travels with the bundle: ``to_tensors`` /
    ``from_tensors`` give plain float and integer arrays (safetensors, no pickle).
    """

    encoder: Encoder
    model: MaskedLogit
    name: str = "behaviour model"

    def action_probs(self, obs: NDArray[np.floating], mask: NDArray[np.bool_]) -> NDArray[np.float64]:
        obs32 = np.asarray(obs, dtype=np.float32).reshape(-1, N_FEATURES)
        allowed = np.asarray(mask, dtype=bool).reshape(-1, N_ACTIONS)
        probs = np.empty((len(obs32), N_ACTIONS))
        for start in range(0, len(obs32), _PREDICT_BLOCK):
            block = slice(start, start + _PREDICT_BLOCK)
            probs[block] = self.model.predict(self.encoder.transform(obs32[block], allowed[block]), allowed[block])
        return probs

    def to_tensors(self) -> dict[str, NDArray[Any]]:
        e = self.encoder
        lengths = np.array([len(c) for c in e.categories], dtype=np.int64)
        values = np.concatenate(e.categories).astype(np.float32) if e.categories else np.zeros(0, np.float32)
        return {"categorical": np.asarray(e.categorical, dtype=np.int64), "category_values": values,
                "category_lengths": lengths, "continuous": np.asarray(e.continuous, dtype=np.int64),
                "mean": np.asarray(e.mean, dtype=np.float64), "scale": np.asarray(e.scale, dtype=np.float64),
                "weights": self.model.weights, "bias": self.model.bias}

    @classmethod
    def from_tensors(cls, t: dict[str, NDArray[Any]]) -> BehaviourModel:
        missing = sorted({"categorical", "category_values", "category_lengths", "continuous", "mean", "scale",
                          "weights", "bias"} - set(t))
        if missing:
            raise ValueError(f"behaviour model tensors lack {missing}")
        lengths = np.asarray(t["category_lengths"], dtype=np.int64)
        values = np.asarray(t["category_values"], dtype=np.float32)
        if int(lengths.sum()) != len(values) or len(lengths) != len(t["categorical"]):
            raise ValueError("behaviour model tensors: category lengths do not match the values")
        categories = list(np.split(values, np.cumsum(lengths)[:-1])) if len(lengths) else []
        encoder = Encoder([int(j) for j in t["categorical"]], categories, [int(j) for j in t["continuous"]],
                          np.asarray(t["mean"], dtype=np.float64), np.asarray(t["scale"], dtype=np.float64))
        n_inputs = len(encoder.continuous) + int(lengths.sum()) + N_ACTIONS
        weights = np.asarray(t["weights"], dtype=np.float64)
        bias = np.asarray(t["bias"], dtype=np.float64)
        if weights.shape != (n_inputs, N_ACTIONS) or bias.shape != (N_ACTIONS,):
            raise ValueError(f"behaviour model tensors: weights {weights.shape} and bias {bias.shape}, expected "
                             f"({n_inputs}, {N_ACTIONS}) and ({N_ACTIONS},)")
        if not (np.isfinite(weights).all() and np.isfinite(bias).all()):
            raise ValueError("behaviour model tensors hold NaN or infinite values")
        return cls(encoder, MaskedLogit(weights, bias))


__all__ = ["BehaviourModel", "Encoder", "MaskedLogit"]
