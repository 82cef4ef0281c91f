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

from envs.spec import ACTION_NAMES, N_ACTIONS, N_FEATURES
from policies.behaviour_model import BehaviourModel, Encoder, MaskedLogit

#: Floor of an estimated probability: the schema needs (0, 1], and a weight
#: 1/p above a million is noise anyway.
MIN_PROB = 1e-6


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


def fit_behaviour_model(
    obs: NDArray[np.float32],
    allowed: NDArray[np.bool_],
    action: NDArray[np.int64],
    *,
    max_fit_rows: int = 50_000,
    held_out_rows: int = 50_000,
    seed: int = 0,
) -> tuple[BehaviourModel, CalibrationReport]:
    """The behaviour model of a log and its calibration report (see :func:`estimate_behavior_probs`)."""
    behaviour, _, _, report = _fit_with_probs(obs, allowed, action, max_fit_rows, held_out_rows, seed)
    return behaviour, report


def _fit_with_probs(obs: NDArray[np.float32], allowed: NDArray[np.bool_], action: NDArray[np.int64],
                    max_fit_rows: int, held_out_rows: int, seed: int,
                    ) -> tuple[BehaviourModel, NDArray[np.float64], NDArray[np.float64], CalibrationReport]:
    """The model, its probabilities of every action and of the logged one on every row, and the report."""
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
    behaviour = BehaviourModel(encoder, _fit_regularised(encoder, obs, allowed, action, fit_rows, held))
    probs = behaviour.action_probs(obs, allowed)
    chosen = np.clip(probs[np.arange(n), action], MIN_PROB, 1.0)
    return behaviour, probs, chosen, _report(probs, chosen, allowed, action, len(fit_rows), held)


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
    _, probs, chosen, report = _fit_with_probs(obs, allowed, action, max_fit_rows, held_out_rows, seed)
    return probs, chosen, report


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
