"""SHAP rationale for each suggested action, over the named features.

shap's :class:`~shap.PermutationExplainer` against a small background (the
k-means centres of the data the policy was prepared on, stored in the bundle):
with 32 features the Exact explainer would need 2^32 coalitions, while a
permutation explanation is exact in one respect that matters here, local
accuracy: along each permutation the contributions telescope, so for every
action the values add up to ``score(x) - base value`` (float32 round-off
aside), however few permutations are drawn. The model explained is the
policy's score for every action at once (one call explains them all).

The explainer is built and run once before its first answer (:meth:`Explainer.warm`):
shap compiles its numba kernels on the first call, which takes seconds (one of
them at every start: it cannot be cached). :class:`BackgroundExplainer` does that
in a thread, so a server answers ``/healthz`` and unexplained requests at once and
only a request asking for a rationale in the first seconds waits for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from envs.spec import FEATURE_NAMES, N_FEATURES
from policies.networks import PolicyNetwork
from serving.patient import describe_feature

ScoreFn = Callable[[NDArray[np.float64]], NDArray[np.float64]]

#: shap's numba kernels on our path whose compiled code can be kept on disk between processes
#: (shap does not ask for it). ``_build_fixed_*_output`` cannot: it takes the link function as an
#: argument, whose numba type differs in every process, so it compiles at each start (~6 s).
_CACHEABLE_SHAP_KERNELS = (("shap.maskers._tabular", ("_delta_masking", "_single_delta_mask")),)

#: shap draws permutations from numpy's global generator, and its constructors reseed it: one lock
#: for every explainer in the process, so that a policy warming up in the background cannot reseed
#: it while another policy explains a request (the same request must get the same rationale).
_SHAP_LOCK = threading.Lock()


def _cache_shap_kernels() -> None:
    """Turn on numba's on-disk cache for :data:`_CACHEABLE_SHAP_KERNELS`: a few seconds off every
    start-up after the first. Best effort: where the cache cannot be written, nothing changes."""
    import importlib

    for module_name, names in _CACHEABLE_SHAP_KERNELS:
        try:
            module = importlib.import_module(module_name)
            for name in names:
                kernel = getattr(module, name)
                if not kernel.signatures:  # not compiled yet in this process
                    kernel.enable_caching()
        except (ImportError, AttributeError, RuntimeError, OSError):
            continue




@dataclass(frozen=True)
class Contribution:
    """One feature's SHAP value for one action, with the feature in words."""

    feature: str
    value: float
    shap: float
    text: str


@dataclass(frozen=True)
class Explanation:
    """SHAP values (F, A) and base values (A,) for one observation."""

    values: NDArray[np.float64]
    base_values: NDArray[np.float64]
    scores: NDArray[np.float64]

    def top(self, action: int, obs: NDArray[np.floating], k: int = 5) -> list[Contribution]:
        """The ``k`` largest contributions to ``action``'s score, largest magnitude first."""
        column = self.values[:, action]
        order = np.argsort(-np.abs(column), kind="stable")[:k]
        return [Contribution(FEATURE_NAMES[i], float(obs[i]), float(column[i]),
                             describe_feature(FEATURE_NAMES[i], obs)) for i in order]


def _checked_background(background: NDArray[np.floating], permutations: int,
                        n_features: int = N_FEATURES) -> NDArray[np.float64]:
    """The background as float64 (k, F); ValueError naming what is wrong with it or with ``permutations``."""
    out = np.asarray(background, dtype=np.float64)
    if out.ndim != 2 or out.shape[1] != n_features or len(out) == 0:
        raise ValueError(f"SHAP background must have shape (k, {n_features}), got {out.shape}")
    if permutations < 1:
        raise ValueError(f"SHAP permutations must be at least 1, got {permutations}")
    return out


class Explainer:
    """Permutation SHAP of ``score_fn`` (rows -> (n, A) scores) against ``background``."""

    def __init__(self, score_fn: ScoreFn, background: NDArray[np.floating], *, permutations: int = 1,
                 seed: int = 0) -> None:
        background = _checked_background(background, permutations)
        self.score_fn = score_fn
        self.background = background
        self.seed = seed
        # one permutation costs 2 * F + 1 evaluations of the model on the background: shap walks it
        # forward and back (an antithetic pair), which halves the estimate's variance; one pair is
        # the default because the model evaluations dominate a request's cost
        self.max_evals = permutations * (2 * N_FEATURES + 1)
        import shap  # seconds of imports (numba, scikit-learn): only where an explainer is built

        _cache_shap_kernels()
        with _SHAP_LOCK:
            masker = shap.maskers.Independent(background, max_samples=len(background))
            self._explainer = shap.PermutationExplainer(score_fn, masker, feature_names=list(FEATURE_NAMES),
                                                        seed=seed)

    def warm(self) -> None:
        """Run one explanation so shap's just-in-time compilation happens now, not on a request."""
        self.explain(self.background[0])

    def explain(self, obs: NDArray[np.floating]) -> Explanation:
        """SHAP values of every action's score; the same observation always gets the same values."""
        x = np.asarray(obs, dtype=np.float64).reshape(1, N_FEATURES)
        # shap draws its permutations from numpy's global generator: reseed it per call, under a
        # lock (the server answers from a thread pool), so an explanation is reproducible for audit
        with _SHAP_LOCK:
            np.random.seed(self.seed)  # noqa: NPY002 - shap reads the legacy global generator
            result = self._explainer(x, max_evals=self.max_evals, silent=True)
        values = np.asarray(result.values, dtype=np.float64)[0]  # (F, A)
        base = np.asarray(result.base_values, dtype=np.float64)[0]  # (A,)
        scores = np.asarray(self.score_fn(x), dtype=np.float64)[0]
        return Explanation(values=values, base_values=base, scores=scores)


class NetworkExplainer:
    """DeepLIFT's rescale rule through the policy's own network, against ``background``.

    This is what shap's :class:`~shap.DeepExplainer` computes for a chain of linear layers and
    elementwise activations (a test holds the two to 1e-8), vectorised over the background in
    numpy: shap's version runs one backward pass per action through hooks, ~80 ms a request on
    these machines against well under 1 ms here. For each background row ``b`` the multipliers
    telescope, so the values add up to ``f(x) - f(b)`` exactly ("summation to delta", Shrikumar
    2017); averaged over the background, to ``score - base value`` (float64 round-off only). For a
    linear network they are the exact Shapley values. Pure functions of the weights: no lock, no
    random generator, the same request always gets the same values, and no warm-up.
    """

    def __init__(self, network: PolicyNetwork, background: NDArray[np.floating]) -> None:
        spec = network.spec
        self.background = _checked_background(background, 1, spec.n_in)
        state = {k: v.detach().double().numpy() for k, v in network.state_dict().items()}
        self._mean, self._std = state["obs_mean"], state["obs_std"]
        clip = spec.extra.get("clip_obs")
        self._clip = float(clip) if clip is not None else None
        self._activation = spec.activation
        # per head, its linear layers as (weight (out, in), bias) in order
        linear = range(0, 2 * len(spec.hidden) + 1, 2)  # nn.Sequential: Linear, activation, Linear, ...
        self._heads = [[(state[f"heads.{h}.{i}.weight"], state[f"heads.{h}.{i}.bias"]) for i in linear]
                       for h in range(len(network.heads))]
        # which outputs the policy's scores are (PolicyNetwork -> BundlePolicy.outputs)
        self._n_scores = spec.n_out // 2 if spec.output == "q_bcq" else spec.n_out
        self._heads_averaged = len(self._heads) if spec.output == "q_ensemble" else 1
        # the background's pass through every head, and the base values, once: they never change
        self._base_pass = [self._forward(head, self._normalised(self.background)) for head in self._heads]
        base_sum = sum(zb[-1][:, : self._n_scores].mean(axis=0) for zb in self._base_pass)
        self._base_values = np.asarray(base_sum) / self._heads_averaged

    def warm(self) -> None:
        """Nothing to compile or build: kept so that every explainer has the same interface."""

    def _normalised(self, obs: NDArray[np.float64]) -> NDArray[np.float64]:
        """The network's normalised input (clipped in :meth:`_forward`)."""
        return (obs - self._mean) / self._std

    def _act(self, z: NDArray[np.float64]) -> NDArray[np.float64]:
        if self._activation == "relu":
            return np.maximum(z, 0.0)
        if self._activation == "tanh":
            return np.tanh(z)
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0.0)))  # elu, alpha 1 (torch's default)

    def _grad(self, z: NDArray[np.float64]) -> NDArray[np.float64]:
        if self._activation == "relu":
            return (z > 0).astype(np.float64)
        if self._activation == "tanh":
            return 1.0 - np.tanh(z) ** 2
        return np.where(z > 0, 1.0, np.exp(np.minimum(z, 0.0)))

    def _clipped(self, z: NDArray[np.float64]) -> NDArray[np.float64]:
        return z if self._clip is None else np.clip(z, -self._clip, self._clip)

    def _forward(self, head: list[tuple[NDArray[np.float64], NDArray[np.float64]]],
                 x: NDArray[np.float64]) -> list[NDArray[np.float64]]:
        """The normalised input ``x``, every pre-activation of ``head``, then the outputs."""
        zs = [x]
        a = self._clipped(x)
        for i, (w, b) in enumerate(head):
            z = a @ w.T + b
            zs.append(z)
            if i < len(head) - 1:
                a = self._act(z)
        return zs

    @staticmethod
    def _rescale(dy: NDArray[np.float64], dz: NDArray[np.float64], grad: NDArray[np.float64]) -> NDArray[np.float64]:
        """DeepLIFT multipliers dy/dz, the gradient where the difference is too small to divide
        (shap's threshold, 1e-6)."""
        small = np.abs(dz) <= 1e-6
        return np.where(small, grad, dy / np.where(small, 1.0, dz))

    def _head_values(self, zx: list[NDArray[np.float64]], zb: list[NDArray[np.float64]],
                     head: list[tuple[NDArray[np.float64], NDArray[np.float64]]]) -> NDArray[np.float64]:
        """(k, A, F): for each background row, each score's multipliers times the input difference."""
        k = len(zb[0])
        g = np.broadcast_to(head[-1][0][: self._n_scores], (k, self._n_scores, head[-1][0].shape[1]))
        for layer in range(len(head) - 2, -1, -1):
            z1, z0 = zx[layer + 1], zb[layer + 1]
            m = self._rescale(self._act(z1) - self._act(z0), z1 - z0, self._grad(z1))
            g = (g * m[:, None, :]) @ head[layer][0]
        x_in, b_in = zx[0], zb[0]
        if self._clip is not None:
            inside = (np.abs(x_in) < self._clip).astype(np.float64)
            g = g * self._rescale(self._clipped(x_in) - self._clipped(b_in), x_in - b_in, inside)[:, None, :]
        # the inputs are normalised already: (x - b) / std times d/d(normalised) is (x - b) times d/dx
        return g * (x_in - b_in)[:, None, :]

    def explain(self, obs: NDArray[np.floating]) -> Explanation:
        """DeepLIFT values of every action's score (F, A); they add up to score minus base value."""
        x = np.asarray(obs, dtype=np.float64).reshape(1, -1)
        if x.shape[1] != len(self._mean):
            raise ValueError(f"observation must have {len(self._mean)} features, got {x.shape[1]}")
        values = np.zeros((x.shape[1], self._n_scores))
        scores = np.zeros(self._n_scores)
        for head, zb in zip(self._heads, self._base_pass, strict=True):
            zx = self._forward(head, self._normalised(x))
            values += self._head_values(zx, zb, head).mean(axis=0).T
            scores += zx[-1][0, : self._n_scores]
        heads = self._heads_averaged
        return Explanation(values=values / heads, base_values=self._base_values.copy(), scores=scores / heads)


class BackgroundExplainer:
    """An :class:`Explainer` built and warmed in a thread, started at once: ``explain`` waits for it.

    Unexplained requests never touch it, so a server is ready for them (and for ``/healthz``)
    seconds before shap has compiled; a failure to build is raised by every ``explain``."""

    def __init__(self, score_fn: ScoreFn, background: NDArray[np.floating], *, permutations: int = 1,
                 seed: int = 0) -> None:
        # checked here, in the caller's thread, so a bad bundle fails the start and not only the warm-up
        self.background = _checked_background(background, permutations)
        self._args: tuple[Any, ...] = (score_fn, self.background, permutations, seed)
        self._ready = threading.Event()
        self._explainer: Explainer | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._build, name="carepath-explainer-warm-up", daemon=True).start()

    def _build(self) -> None:
        score_fn, background, permutations, seed = self._args
        try:
            explainer = Explainer(score_fn, background, permutations=permutations, seed=seed)
            explainer.warm()
            self._explainer = explainer
        except BaseException as err:  # handed to every caller of explain
            self._error = err
        finally:
            self._ready.set()

    @property
    def ready(self) -> bool:
        """Built and warmed (False while warming, and after a failure)."""
        return self._ready.is_set() and self._error is None

    @property
    def failed(self) -> bool:
        return self._ready.is_set() and self._error is not None

    def wait(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def warm(self) -> None:
        self._ready.wait()
        self._check()

    def explain(self, obs: NDArray[np.floating]) -> Explanation:
        self._ready.wait()
        self._check()
        assert self._explainer is not None
        return self._explainer.explain(obs)

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the SHAP explainer could not be built: {self._error}") from self._error
