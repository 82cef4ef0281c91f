"""Estimated behaviour probabilities for logs that do not record them.

Importance-sampling estimators need the probability the logging clinician
(or policy) gave each logged action. Real logs rarely have it, so it is
estimated with a multinomial logistic model of the action given the
observation, restricted to the actions allowed that week and renormalised.
The restriction is part of the model (:class:`MaskedLogit`: the softmax runs
over allowed actions only, when fitting too), which is why this is a small
L-BFGS fit of our own rather than scikit-learn's ``LogisticRegression``: that
one can only renormalise after fitting, and then cannot represent even a
policy that is uniform over the allowed actions.

Clinical policies act on thresholds (PHQ-9 >= 10, week 12 of a step), which a
linear model in raw features misses. The design matrix therefore one-hot
encodes every feature whose values are few whole numbers (weeks, scores,
levels: found from the data, not from a list), standardises the others and
adds which actions are allowed. The model is fitted on a random sample of at
most ``max_fit_rows`` rows (more rows cost time, hardly accuracy) and checked
on held-out rows; the calibration report
says how far predicted frequencies are from observed ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import sparse
from scipy.optimize import minimize

from envs.spec import ACTION_NAMES, N_ACTIONS, N_FEATURES

#: Floor of an estimated probability: the schema needs (0, 1], and a weight
#: 1/p above a million is noise anyway.
MIN_PROB = 1e-6
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
class ActionCalibration:
    action: str
    observed: int
    observed_share: float
    mean_predicted: float


@dataclass(frozen=True)
class CalibrationReport:
    """How well the estimated probabilities match what was logged."""

    rows: int
    fit_rows: int
    held_out_rows: int
    log_loss: float  # mean -log p(logged action), all rows
    held_out_log_loss: float | None  # the same on rows not used to fit
    uniform_log_loss: float  # baseline: uniform over allowed actions
    max_share_gap: float  # max over actions of |observed share - mean predicted|
    actions: list[ActionCalibration]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = ["behaviour model calibration (multinomial logistic, restricted to allowed actions)",
                 f"{'action':<22} {'observed':>10} {'share':>8} {'predicted':>10}"]
        for a in self.actions:
            lines.append(f"{a.action:<22} {a.observed:>10,} {a.observed_share:>8.3f} {a.mean_predicted:>10.3f}")
        held = "n/a" if self.held_out_log_loss is None else f"{self.held_out_log_loss:.3f}"
        lines.append(f"log loss {self.log_loss:.3f} (held-out {held}; uniform over allowed actions "
                     f"{self.uniform_log_loss:.3f}); largest share gap {self.max_share_gap:.3f}; fitted on "
                     f"{self.fit_rows:,} of {self.rows:,} rows")
        return "\n".join(lines)


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


def estimate_behavior_probs(
    obs: NDArray[np.float32],
    allowed: NDArray[np.bool_],
    action: NDArray[np.int64],
    *,
    max_fit_rows: int = 50_000,
    held_out_rows: int = 50_000,
    seed: int = 0,
) -> tuple[NDArray[np.float64], NDArray[np.float64], CalibrationReport]:
    """(probability of every action (n, n_actions), of the logged action (n,), report).

    Every logged action must be allowed in its row (the validator checks this).
    """
    n = len(action)
    if obs.shape != (n, N_FEATURES) or allowed.shape != (n, N_ACTIONS):
        raise ValueError(f"expected obs (n, {N_FEATURES}) and allowed (n, {N_ACTIONS}) for {n} actions")
    if not allowed[np.arange(n), action].all():
        raise ValueError("every logged action must be allowed in its row to estimate behaviour probabilities")
    order = np.random.default_rng(seed).permutation(n)
    n_held = min(held_out_rows, n // 5)  # small logs still get an honest check
    n_fit = min(max_fit_rows, n - n_held)
    fit_rows = np.sort(order[:n_fit])
    held = np.sort(order[n_fit:n_fit + n_held])
    encoder = Encoder.fit(obs[fit_rows])
    model = _fit_regularised(encoder, obs, allowed, action, fit_rows, held)
    probs = np.empty((n, N_ACTIONS))
    for start in range(0, n, _PREDICT_BLOCK):
        block = slice(start, start + _PREDICT_BLOCK)
        probs[block] = model.predict(encoder.transform(obs[block], allowed[block]), allowed[block])
    chosen = np.clip(probs[np.arange(n), action], MIN_PROB, 1.0)
    return probs, chosen, _report(probs, chosen, allowed, action, len(fit_rows), held)


#: L2 penalties tried, strongest first; each fit starts from the previous one.
L2_PATH = (1e-1, 1e-2, 1e-3, 1e-4)


def _fit_regularised(encoder: Encoder, obs: NDArray[np.float32], allowed: NDArray[np.bool_],
                     action: NDArray[np.int64], fit_rows: NDArray[np.int64], held: NDArray[np.int64]) -> MaskedLogit:
    """The penalty is chosen on held-out rows: with a few thousand rows and a few
    hundred inputs per action a weak penalty overfits, with a million it does not.
    Walks ``L2_PATH`` from strong to weak and stops when held-out log loss worsens."""
    x = encoder.transform(obs[fit_rows], allowed[fit_rows])
    if len(held) == 0:
        return MaskedLogit.fit(x, allowed[fit_rows], action[fit_rows], l2=1e-2)
    x_held = encoder.transform(obs[held], allowed[held])
    best: MaskedLogit | None = None
    best_loss = np.inf
    previous: MaskedLogit | None = None
    for l2 in L2_PATH:
        previous = MaskedLogit.fit(x, allowed[fit_rows], action[fit_rows], l2=l2, start=previous)
        p = previous.predict(x_held, allowed[held])[np.arange(len(held)), action[held]]
        loss = float(-np.log(np.clip(p, MIN_PROB, 1.0)).mean())
        if loss >= best_loss:
            break
        best, best_loss = previous, loss
    assert best is not None
    return best


def restrict_to_allowed(probs: NDArray[np.float64], allowed: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Zero the blocked actions and renormalise (uniform over allowed where nothing is left)."""
    p = np.where(allowed, probs, 0.0)
    total = p.sum(axis=1, keepdims=True)
    uniform = allowed / np.maximum(allowed.sum(axis=1, keepdims=True), 1)
    return np.where(total > 0, p / np.where(total > 0, total, 1.0), uniform)


def _report(probs: NDArray[np.float64], chosen: NDArray[np.float64], allowed: NDArray[np.bool_],
            action: NDArray[np.int64], fit_rows: int, held: NDArray[np.int64]) -> CalibrationReport:
    n = len(action)
    counts = np.bincount(action, minlength=N_ACTIONS)
    mean_pred = probs.mean(axis=0)
    rows = [ActionCalibration(name, int(counts[a]), float(counts[a] / n), float(mean_pred[a]))
            for a, name in enumerate(ACTION_NAMES)]
    uniform = -np.log(1.0 / allowed.sum(axis=1))
    return CalibrationReport(
        rows=n,
        fit_rows=fit_rows,
        held_out_rows=len(held),
        log_loss=float(-np.log(chosen).mean()),
        held_out_log_loss=float(-np.log(chosen[held]).mean()) if len(held) else None,
        uniform_log_loss=float(uniform.mean()),
        max_share_gap=float(np.abs(counts / n - mean_pred).max()),
        actions=rows,
    )
