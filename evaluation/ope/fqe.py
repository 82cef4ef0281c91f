"""Fitted Q evaluation (FQE) of a stochastic target policy from logged data.

Le, Voloshin & Yue, "Batch Policy Learning under Constraints", ICML 2019
(FQE, their Algorithm 3): starting from ``Q_0 = 0``, iteration ``k`` regresses
``Q_k(s, a)`` on the targets ``r + gamma * (1 - done) * sum_a' pi_e(a'|s') Q_{k-1}(s', a')``
over the logged transitions; the value is ``sum_a pi_e(a|s_0) Q_K(s_0, a)``
averaged over the logged initial states.

Here:

- ``pi_e(.|s')`` is computed once for every transition (the policy is fixed),
  and everything lives in one packed tensor on the device; a minibatch is one
  ``torch.randint`` and one gather, as in :class:`agents.common.replay.TensorReplay`.
- Several fits (other policies, bootstrap resamples, seeds) train as one stacked
  model (:func:`fit_fqe_stacked`, :func:`fit_fqe_resampled`): one batched matrix
  product per layer for all of them, each fit still seeded, sampled and
  optimised as on its own. A resample is the positions of its rows in the one
  packed log, so K refits hold the log once and run the policy once.
- One network serves every week of the finite horizon: the observation holds
  ``weeks_in_care``, so the network can tell how much of the horizon is left.
  With ``gamma = 1`` the ``k``-th iterate is the ``k``-step value, so
  ``iterations`` must reach the longest episode (a warning says when not);
  since each regression is fitted only approximately, a margin of further
  iterations lets the estimate settle (the default 40 for the 26-week horizon).
- The network is warm-started from the previous iterate (only the frozen
  target network defines the regression targets), which is what makes a few
  hundred updates per iteration enough. ``Q_k`` is the average of the weights
  over the second half of iteration ``k`` (Polyak-Ruppert), which damps the SGD
  noise that would otherwise be passed on through every later target.
- Action masks: ``pi_e`` must be zero on blocked actions (the
  :class:`~policies.base.Policy` contract; a policy that breaks it is refused),
  and only actions with ``pi_e > 0`` enter the expectation (selected, not
  multiplied by zero), so untrained or non-finite outputs on blocked actions
  cannot leak into a target.
- Done transitions (the last of each episode, terminated or truncated) do not
  bootstrap.

Uncertainty: :attr:`FQEResult.initial_values` are per-episode estimates, so a
caller can bootstrap their mean; such an interval reflects only the spread of
initial states and treats the fitted Q-function as exact, i.e. it ignores
model (regression and extrapolation) error. :func:`refit_values` refits FQE
on bootstrap resamples of episodes, each with its own network seed, and
:func:`~evaluation.ope.intervals.refit_interval` turns their spread into an
interval that carries the sampling and fitting error too (not a bias every
refit shares, such as extrapolation to actions the log never took), at a
refit per resample.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from itertools import pairwise
from typing import Any, cast, overload

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from agents.offline.base import adam, resolve_device
from offline_data.dataset import Episodes, Transitions
from policies.base import Policy
from policies.networks import NetworkSpec, PolicyNetwork

#: Rows per call of the policy and per network pass outside training (bounds memory).
CHUNK = 65_536
#: Probability mass on a blocked action above this means the policy ignores its mask.
BLOCKED_MASS_TOL = 1e-6


@dataclass
class FQEConfig:
    """FQE options. The defaults (20,000 updates) fit 1 M transitions in under 120 s on two CPU cores.

    ``iterations`` should be at least the longest episode when ``gamma`` is 1
    (each iteration propagates value one week back). ``device`` ``auto`` uses
    CUDA when present.
    """

    iterations: int = 40
    updates_per_iteration: int = 500
    batch_size: int = 512
    hidden: tuple[int, ...] = (128, 128)
    learning_rate: float = 1e-3
    gamma: float = 1.0
    seed: int = 0
    device: str = "auto"
    # CPU threads while fitting (restored after). One: a 128-wide MLP on 512 rows
    # gains little from intra-op threads, and they stall badly when cores are shared.
    # 0 leaves torch's setting.
    torch_threads: int = 1

    def __post_init__(self) -> None:
        for name in ("iterations", "updates_per_iteration", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"FQE {name} must be a positive integer, got {value!r}")
        try:
            self.hidden = tuple(int(h) for h in self.hidden)
        except (TypeError, ValueError):
            raise ValueError(f"FQE hidden must be a sequence of layer sizes, got {self.hidden!r}") from None
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"FQE hidden layer sizes must be positive, got {self.hidden!r}")
        if not (isinstance(self.learning_rate, int | float) and np.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(f"FQE learning_rate must be a positive number, got {self.learning_rate!r}")
        if not (isinstance(self.gamma, int | float) and 0.0 < self.gamma <= 1.0):
            raise ValueError(f"FQE gamma must be in (0, 1], got {self.gamma!r}")
        if not isinstance(self.torch_threads, int) or self.torch_threads < 0:
            raise ValueError(f"FQE torch_threads must be a non-negative integer, got {self.torch_threads!r}")
        try:
            resolve_device(self.device)
        except ValueError as err:
            raise ValueError(f"FQE device: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


@dataclass(frozen=True)
class FQEResult:
    """A fitted Q-function of the target policy and the value it implies.

    ``value`` is the mean of ``initial_values``, one per episode:
    ``sum_a pi_e(a|s_0) Q(s_0, a)`` at its first logged step. Bootstrapping
    ``initial_values`` gives an interval that ignores model error (see the
    module docstring). ``history`` has, per iteration, the mean squared
    error against its targets over its second half (``loss``) and the value
    the iterate implies (``value``): a curve still moving at the end calls for
    more iterations.
    """

    value: float
    initial_values: NDArray[np.float64]  # (E,)
    network: PolicyNetwork
    config: FQEConfig
    policy: str
    history: list[dict[str, float]] = field(default_factory=list)

    def q_values(self, obs: NDArray[np.floating], mask: NDArray[np.bool_] | None = None) -> NDArray[np.float64]:
        """``Q(s, a)`` for each row of ``obs`` (n, F) -> (n, A); zero where ``mask`` blocks ``a``.

        Without a mask, blocked actions get the network's raw outputs, meaningless
        where the action was never logged.
        """
        q = _predict(self.network, np.asarray(obs, dtype=np.float32))
        if mask is not None:
            q = np.where(np.asarray(mask, dtype=bool), q, 0.0)
        return q

    def q_hat(self, episodes: Episodes) -> NDArray[np.float64]:
        """``Q(s_t, a)`` for padded episodes, (E, L, A), for doubly robust estimators.

        Zero on padded steps and on actions the step's mask blocks.
        """
        n_ep, length = episodes.valid.shape
        out = np.zeros((n_ep, length, self.network.spec.n_out))
        valid = episodes.valid
        out[valid] = self.q_values(episodes.obs[valid], episodes.mask[valid])
        return out


def fit_fqe(
    policy: Policy,
    data: Transitions | Episodes,
    config: FQEConfig | None = None,
    *,
    progress: bool = True,
) -> FQEResult:
    """Fit FQE for ``policy`` on logged ``data`` and estimate its value per episode.

    ``data`` follows :mod:`offline_data.dataset`'s conventions (the last
    transition of each episode is done; episodes start at their first row).
    """
    return _fit_stacked([(policy, data, config if config is not None else FQEConfig())], progress)[0]


def fit_fqe_stacked(
    fits: Sequence[tuple[Policy, Transitions | Episodes, FQEConfig]],
    *,
    progress: bool = True,
) -> list[FQEResult]:
    """Several FQE fits, each ``(policy, data, config)``, trained as one stacked model.

    The fits may differ in policy, data (a bootstrap resample, another log) and ``config.seed``;
    every other option must be equal (ValueError naming the one that is not). Each fit keeps what
    makes it that fit: its network is built and seeded as a fit on its own would be, it draws
    its own minibatches from its own seeded generator and has its own Adam moments, and the
    summed loss gives its weights the gradient of its own loss alone; so a fit's result does
    not depend on which others share the stack (a test holds it to round-off). What stacking
    buys is one batched matrix product per layer for all fits instead of one small launch each:
    these networks are small enough that a fit on its own is mostly framework overhead.
    """
    return _fit_stacked(fits, progress)


def _fit_stacked(fits: Sequence[tuple[Policy, Transitions | Episodes, FQEConfig]],
                 progress: bool) -> list[FQEResult]:
    """:func:`fit_fqe_stacked`; warnings point at the caller of the public function that called it."""
    config = _shared_config([c for _, _, c in fits])
    arrays = [_flatten(data) for _, data, _ in fits]
    if any(len(a["obs"]) == 0 for a in arrays):
        raise ValueError("FQE: no transitions to learn from")
    shapes = {(a["obs"].shape[1], a["mask"].shape[1]) for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"FQE fits stacked together must share feature and action counts, got {sorted(shapes)}")
    _warn_short_horizon(config, max(int(_run_lengths(a["episode"]).max()) for a in arrays), stacklevel=4)

    def pack(device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor], list[_Member]]:
        packed = [_pack(policy, a, c) for (policy, _, c), a in zip(fits, arrays, strict=True)]
        sizes = np.cumsum([0] + [len(rows) for rows, _ in packed])
        source = torch.as_tensor(np.concatenate([rows for rows, _ in packed])).to(device)
        positions = [torch.arange(int(a), int(b), device=device) for a, b in pairwise(sizes)]
        return source, positions, [member.to(device) for _, member in packed]

    return _fit_on(pack, config, progress)


def fit_fqe_resampled(
    policy: Policy,
    data: Transitions | Episodes,
    resamples: Sequence[tuple[np.random.Generator, FQEConfig]],
    *,
    progress: bool = True,
) -> list[FQEResult]:
    """FQE of ``policy`` refitted on bootstrap resamples of ``data``, as one stacked model.

    Refit ``k`` draws its resample with its generator exactly as :func:`resample_episodes` would
    (so one generator given for every refit draws them in turn) and is fitted with its config;
    each result is that of :func:`fit_fqe_stacked` on those resamples (to round-off; the
    too-few-iterations warning judges the whole log). ``pi_e`` is computed once on ``data``, and
    the log is held once: a resample is the positions of its rows in it.
    """
    config = _shared_config([c for _, c in resamples])
    arrays = _flatten(data)
    if len(arrays["obs"]) == 0:
        raise ValueError("FQE: no transitions to learn from")
    if isinstance(data, Episodes):  # resample_episodes draws every episode, even one with no step
        lengths = np.bincount(arrays["episode"], minlength=len(data))
    else:
        lengths = _run_lengths(arrays["episode"])
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    # where each episode's first state sits among the initial states (episodes with steps only)
    initial = np.cumsum(lengths > 0) - 1
    _warn_short_horizon(config, int(lengths.max()), stacklevel=3)

    def pack(device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor], list[_Member]]:
        rows, whole = _pack(policy, arrays, config)
        whole = whole.to(device)
        positions, members = [], []
        for generator, fit_config in resamples:
            chosen = generator.integers(0, len(lengths), size=len(lengths))
            taken = lengths[chosen]
            if taken.sum() == 0:
                raise ValueError("FQE: a resample drew only episodes without steps; no transitions to learn from")
            # the rows of the chosen episodes, in order: start of each, then its steps
            index = np.repeat(starts[chosen] - np.r_[0, np.cumsum(taken)[:-1]], taken) + np.arange(taken.sum())
            positions.append(torch.as_tensor(index, device=device))
            first = torch.as_tensor(initial[chosen[taken > 0]], device=device)
            members.append(replace(whole, init_obs=whole.init_obs[first], init_probs=whole.init_probs[first],
                                   seed=int(fit_config.seed)))
        return torch.as_tensor(rows).to(device), positions, members

    return _fit_on(pack, config, progress)


def _run_lengths(episode: NDArray[np.integer]) -> NDArray[np.int64]:
    """Lengths of the runs of equal episode ids, in order (one per episode)."""
    starts = np.flatnonzero(np.r_[True, episode[1:] != episode[:-1]])
    return np.diff(np.r_[starts, len(episode)])


def _shared_config(configs: Sequence[FQEConfig]) -> FQEConfig:
    """The options every stacked fit shares; ValueError naming one that differs but the seed."""
    if not configs:
        raise ValueError("FQE: no fits to run")
    shared = {k: v for k, v in configs[0].to_dict().items() if k != "seed"}
    for i, other in enumerate(configs[1:], start=1):
        differ = sorted(k for k, v in other.to_dict().items() if k != "seed" and shared[k] != v)
        if differ:
            raise ValueError(f"FQE fits stacked together must share every option but the seed; fit {i} differs "
                             f"from fit 0 in {', '.join(differ)}")
    return configs[0]


def _warn_short_horizon(config: FQEConfig, longest: int, stacklevel: int) -> None:
    """``stacklevel``: frames between this function and the user's call (the warning points there)."""
    if config.gamma == 1.0 and config.iterations < longest:
        warnings.warn(f"FQE iterations ({config.iterations}) < longest episode ({longest} steps): with gamma 1 the "
                      f"estimate is the value of the first {config.iterations} steps only", stacklevel=stacklevel)


#: Packs the fits' logged data on a device: every row once in one tensor, each fit's rows as
#: positions in it, and each fit's :class:`_Member`.
Packer = Callable[[torch.device], tuple[torch.Tensor, list[torch.Tensor], list["_Member"]]]


def _fit_on(pack: Packer, config: FQEConfig, progress: bool) -> list[FQEResult]:
    """Pack the fits' data on the device and fit them, under the config's thread count."""
    threads = torch.get_num_threads()
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    try:
        device = resolve_device(config.device)
        source, positions, members = pack(device)
        return _fit(source, positions, members, config, device, progress)
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Member:
    """One fit's first state of each episode, with ``pi_e`` there, its seed and its policy's name."""

    init_obs: torch.Tensor
    init_probs: torch.Tensor
    seed: int
    policy: str

    def to(self, device: torch.device) -> _Member:
        return replace(self, init_obs=self.init_obs.to(device), init_probs=self.init_probs.to(device))


def _pack(policy: Policy, arrays: dict[str, NDArray[Any]], config: FQEConfig) -> tuple[NDArray[np.float32], _Member]:
    """One fit's logged data, one float32 row per transition:
    ``[obs | next_obs | pi_e(.|s') | reward | gamma * (1 - done) | action]``, so that a minibatch
    is a single gather; and its :class:`_Member` (on the CPU)."""
    n, n_actions = arrays["mask"].shape
    # pi_e at every successor, once. Done rows never bootstrap, so their (copied or
    # even empty) next masks are not shown to the policy and their row stays zero.
    live = ~arrays["done"]
    next_probs = np.zeros((n, n_actions), dtype=np.float32)
    next_probs[live] = _policy_probs(policy, arrays["next_obs"][live], arrays["next_mask"][live])
    first = np.flatnonzero(np.r_[True, arrays["episode"][1:] != arrays["episode"][:-1]])
    init_probs = _policy_probs(policy, arrays["obs"][first], arrays["mask"][first])
    packed = np.concatenate([arrays["obs"], arrays["next_obs"], next_probs, arrays["reward"][:, None],
                             (config.gamma * live)[:, None], arrays["action"][:, None]], axis=1, dtype=np.float32)
    return packed, _Member(init_obs=torch.as_tensor(arrays["obs"][first], dtype=torch.float32),
                           init_probs=torch.as_tensor(init_probs), seed=int(config.seed),
                           policy=str(getattr(policy, "name", type(policy).__name__)))


class _StackedQ:
    """The members' Q-networks (:class:`PolicyNetwork`'s plain ReLU MLP, ``q_values``) as stacked
    weights: each layer is one batched matrix product over members, ``(K, B, in) -> (K, B, out)``."""

    def __init__(self, networks: Sequence[PolicyNetwork]) -> None:
        head = networks[0].heads[0]
        self.names = [name for name, module in head.named_modules() if isinstance(module, torch.nn.Linear)]
        self.mean = torch.stack([net.obs_mean for net in networks])[:, None, :]
        self.std = torch.stack([net.obs_std for net in networks])[:, None, :]
        self.params: list[torch.Tensor] = []  # weight (K, out, in), bias (K, out), layer by layer
        for name in self.names:
            layers = [net.heads[0].get_submodule(name) for net in networks]
            for key in ("weight", "bias"):
                self.params.append(torch.stack([getattr(layer, key).detach() for layer in layers]))

    def forward(self, params: Sequence[torch.Tensor], obs: torch.Tensor,
                members: slice = slice(None)) -> torch.Tensor:
        """Q-values of ``members`` (all by default) at ``obs``, (k, B, F) -> (k, B, A)."""
        x = (obs - self.mean[members]) / self.std[members]
        last = len(self.names) - 1
        for i in range(len(self.names)):
            weight, bias = params[2 * i][members], params[2 * i + 1][members]
            x = torch.baddbmm(bias[:, None, :], x, weight.transpose(1, 2))
            if i < last:
                x = torch.relu(x)
        return x

    def write(self, params: Sequence[torch.Tensor], k: int, network: PolicyNetwork) -> PolicyNetwork:
        """Member ``k``'s weights into its own ``network`` (the one it was built as)."""
        with torch.no_grad():
            for i, name in enumerate(self.names):
                layer = cast(torch.nn.Linear, network.heads[0].get_submodule(name))
                layer.weight.copy_(params[2 * i][k])
                layer.bias.copy_(params[2 * i + 1][k])
        return network.requires_grad_(False).eval()


def _fit(source: torch.Tensor, positions: list[torch.Tensor], members: list[_Member], config: FQEConfig,
         device: torch.device, progress: bool) -> list[FQEResult]:
    """Fit every member; member k's transitions are the rows ``source[positions[k]]``."""
    n_features = members[0].init_obs.shape[1]
    n_actions = members[0].init_probs.shape[1]
    networks, generators = [], []
    for member, rows in zip(members, positions, strict=True):
        # seeded as a fit on its own: the same initial weights and the same minibatches
        torch.manual_seed(member.seed)
        generators.append(torch.Generator(device=device).manual_seed(member.seed))
        network = PolicyNetwork(NetworkSpec(n_features, n_actions, config.hidden, output="q_values")).to(device)
        obs = source.index_select(0, rows)[:, :n_features]
        network.set_normalization(obs.mean(dim=0), obs.std(dim=0) if len(obs) > 1
                                  else torch.ones(n_features, device=device))
        del obs
        # Q_0 = 0: the first iteration regresses on the immediate reward alone
        last = [m for m in network.heads[0].modules() if isinstance(m, torch.nn.Linear)][-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
        networks.append(network)
    stack = _StackedQ(networks)
    params = [p.clone().requires_grad_(True) for p in stack.params]
    # ``average`` is the Polyak-Ruppert mean of the weights over the second half of each
    # iteration: the fitted Q_k (next target and final answer), with less SGD noise than
    # the last iterate, whose noise would otherwise compound over the horizon.
    average = [p.detach().clone() for p in params]
    optimizer = adam(params, config.learning_rate)

    # every member's row positions in one tensor: a step's minibatches are one small gather of
    # positions and one gather of rows
    sizes = [len(rows) for rows in positions]
    offsets = torch.as_tensor(np.r_[0, np.cumsum(sizes)[:-1]], device=device)[:, None]
    all_positions = torch.cat(positions)
    cols = np.cumsum([0, n_features, n_features, n_actions, 1, 1, 1]).tolist()
    obs_cols, next_cols, prob_cols = (slice(cols[i], cols[i + 1]) for i in range(3))
    reward_col, boot_col, action_col = cols[3], cols[4], cols[5]
    updates = config.updates_per_iteration
    tail_start = updates // 2

    def initial_values(k: int) -> torch.Tensor:
        member = members[k]
        q = torch.cat([stack.forward(average, member.init_obs[None, i:i + CHUNK], slice(k, k + 1))[0]
                       for i in range(0, len(member.init_obs), CHUNK)])
        return (q * member.init_probs).sum(dim=1)

    history: list[list[dict[str, float]]] = [[] for _ in members]
    policies = {member.policy for member in members}
    name = next(iter(policies)) if len(policies) == 1 else f"{len(policies)} policies"
    name += f" ({len(members)} fits)" if len(members) > 1 else ""
    bar = tqdm(range(config.iterations), desc=f"FQE {name}", unit="iteration", disable=not progress, leave=False)
    for _ in bar:
        target = [p.clone() for p in average]
        loss_sum = torch.zeros(len(members), device=device)
        for update in range(updates):
            idx = torch.stack([torch.randint(n, (config.batch_size,), device=device, generator=g)
                               for n, g in zip(sizes, generators, strict=True)])
            # index_select: a 2-D index into a tensor takes a much slower path
            rows = all_positions.index_select(0, (idx + offsets).flatten())
            batch = source.index_select(0, rows).view(len(members), config.batch_size, -1)  # (K, B, columns)
            with torch.no_grad():
                probs = batch[..., prob_cols]
                # only actions with pi_e > 0 enter: torch.where, not a product, so a
                # blocked action's (untrained, possibly huge) Q cannot leak in
                next_q = torch.where(probs > 0, stack.forward(target, batch[..., next_cols]), 0.0)
                y = batch[..., reward_col] + batch[..., boot_col] * (probs * next_q).sum(dim=2)
            action = batch[..., action_col].long()
            q = stack.forward(params, batch[..., obs_cols]).gather(2, action[..., None]).squeeze(2)
            # squared error: FQE regresses on the conditional mean of the target; the sum over
            # members gives each member's weights the gradient of its own mean
            losses = ((q - y) ** 2).mean(dim=1)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            if update >= tail_start:
                weight = 1.0 / (update - tail_start + 1)
                with torch.no_grad():
                    for p_avg, p in zip(average, params, strict=True):
                        p_avg.lerp_(p, weight)
                loss_sum += losses.detach()
        mean_loss = (loss_sum / (updates - tail_start)).tolist()
        for k in range(len(members)):
            history[k].append({"loss": mean_loss[k], "value": float(initial_values(k).mean())})
        if len(members) == 1:
            bar.set_postfix(loss=f"{history[0][-1]['loss']:.3g}", value=f"{history[0][-1]['value']:.3g}")
    bar.close()

    results = []
    for k, member in enumerate(members):
        values = initial_values(k).double().cpu().numpy()
        results.append(FQEResult(value=float(values.mean()), initial_values=values,
                                 network=stack.write(average, k, networks[k]), config=replace(config, seed=member.seed),
                                 policy=member.policy, history=history[k]))
    return results


@overload
def resample_episodes(data: Transitions, rng: np.random.Generator) -> Transitions: ...
@overload
def resample_episodes(data: Episodes, rng: np.random.Generator) -> Episodes: ...
def resample_episodes(data: Transitions | Episodes, rng: np.random.Generator) -> Transitions | Episodes:
    """A bootstrap resample: as many episodes drawn with replacement (transitions renumbered in order)."""
    if isinstance(data, Episodes):
        chosen = rng.integers(0, len(data), size=len(data))
        return replace(data, **{f.name: getattr(data, f.name)[chosen] for f in fields(data)
                                if getattr(data, f.name) is not None})
    episode = data.episode
    starts = np.flatnonzero(np.r_[True, episode[1:] != episode[:-1]])
    lengths = np.diff(np.r_[starts, len(episode)])
    chosen = rng.integers(0, len(starts), size=len(starts))
    rows = np.concatenate([np.arange(starts[e], starts[e] + lengths[e]) for e in chosen])
    new_episode = np.repeat(np.arange(len(chosen), dtype=np.int64), lengths[chosen])
    taken = {f.name: getattr(data, f.name)[rows] for f in fields(data) if f.name != "episode"}
    return replace(data, **taken, episode=new_episode)


def refit_values(
    policy: Policy,
    episodes: Transitions | Episodes,
    config: FQEConfig | None = None,
    n_refits: int = 10,
    *,
    seed: int = 0,
    progress: bool = True,
) -> NDArray[np.float64]:
    """FQE's value refitted on ``n_refits`` bootstrap resamples of ``episodes``.

    Refit ``k`` draws its resample from ``default_rng((seed, k))`` and seeds
    its network with ``config.seed + 1 + k``, so the spread holds both the
    sampling error of the data and the randomness of the fit.
    """
    if isinstance(n_refits, bool) or not isinstance(n_refits, int | np.integer) or n_refits < 2:
        raise ValueError(f"FQE refits must be an integer of at least 2, got {n_refits!r}")
    config = config if config is not None else FQEConfig()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the full-data fit has already said what is wrong
        resamples = [(np.random.default_rng((seed, k)), replace(config, seed=config.seed + 1 + k))
                     for k in range(n_refits)]
        fits = fit_fqe_resampled(policy, episodes, resamples, progress=progress)
    return np.array([fit.value for fit in fits])


def _flatten(data: Transitions | Episodes) -> dict[str, NDArray[Any]]:
    """Transition arrays (obs, action, reward, next_obs, done, mask, next_mask, episode)."""
    if isinstance(data, Transitions):
        episode = np.asarray(data.episode)
        if len(episode) > 1 and np.any(np.diff(episode) < 0):
            raise ValueError("FQE: transitions must be in episode order (episode indices non-decreasing)")
        return {"obs": data.obs, "action": data.action, "reward": data.reward, "next_obs": data.next_obs,
                "done": np.asarray(data.done, dtype=bool), "mask": data.mask, "next_mask": data.next_mask,
                "episode": episode}
    if isinstance(data, Episodes):
        valid = data.valid
        e, step = np.nonzero(valid)  # row-major: episode order, weeks increasing
        last = step == data.lengths[e] - 1
        # the last step has no logged successor: point it at itself (it is done)
        succ = np.where(last, step, step + 1)
        return {"obs": data.obs[e, step], "action": data.action[e, step], "reward": data.reward[e, step],
                "next_obs": data.obs[e, succ], "done": last | data.terminated[e, step] | data.truncated[e, step],
                "mask": data.mask[e, step], "next_mask": data.mask[e, succ], "episode": e.astype(np.int64)}
    raise TypeError(f"FQE needs offline_data Transitions or Episodes, got {type(data).__name__}")


def _policy_probs(policy: Policy, obs: NDArray[np.floating], mask: NDArray[np.bool_]) -> NDArray[np.float32]:
    """``policy.action_probs`` in chunks, checked: rows sum to 1, no mass on blocked actions."""
    name = getattr(policy, "name", type(policy).__name__)
    out = np.zeros(mask.shape, dtype=np.float32)
    for start in range(0, len(obs), CHUNK):
        rows = slice(start, start + CHUNK)
        probs = np.asarray(policy.action_probs(obs[rows], mask[rows]), dtype=np.float64)
        if probs.shape != mask[rows].shape:
            raise ValueError(f"policy {name!r} returned probabilities of shape {probs.shape}, "
                             f"expected {mask[rows].shape}")
        if not np.all(np.isfinite(probs)):
            row = start + int(np.argmin(np.isfinite(probs).all(axis=1)))
            raise ValueError(f"policy {name!r} returned non-finite probabilities at row {row}")
        blocked = np.where(mask[rows], 0.0, probs).sum(axis=1)
        if np.any(blocked > BLOCKED_MASS_TOL):
            row = start + int(np.argmax(blocked > BLOCKED_MASS_TOL))
            raise ValueError(f"policy {name!r} puts probability {blocked[row - start]:.3g} on blocked actions at "
                             f"row {row}; FQE's expectation must use allowed actions only")
        total = probs.sum(axis=1)
        if np.any(np.abs(total - 1.0) > 1e-4):
            row = start + int(np.argmax(np.abs(total - 1.0) > 1e-4))
            raise ValueError(f"policy {name!r} returned probabilities summing to {total[row - start]:.6g} at row {row}")
        # exact zeros on blocked actions, then the rows are distributions
        probs = np.where(mask[rows], probs, 0.0)
        out[rows] = probs / probs.sum(axis=1, keepdims=True)
    return out


def _predict_tensor(network: PolicyNetwork, obs: torch.Tensor) -> torch.Tensor:
    if len(obs) == 0:
        return torch.zeros((0, network.spec.n_out), device=obs.device)
    with torch.no_grad():
        return torch.cat([network(obs[i:i + CHUNK]) for i in range(0, len(obs), CHUNK)])


def _predict(network: PolicyNetwork, obs: NDArray[np.float32]) -> NDArray[np.float64]:
    device = next(network.parameters()).device
    return _predict_tensor(network, torch.as_tensor(obs, device=device)).double().cpu().numpy()


__all__ = ["FQEConfig", "FQEResult", "fit_fqe", "fit_fqe_resampled", "fit_fqe_stacked", "refit_values",
           "resample_episodes"]
