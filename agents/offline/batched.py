"""Several Q-learning runs of a sweep trained as one stacked model.

The members of a seed sweep share the data, the architecture and every
option but the seed, so their networks can be stacked into one model
(``torch.func.stack_module_state``) and a step of all of them is one batched
forward and backward pass (``torch.func.vmap``), as SAC-N and EDAC train their
Q ensembles. Each member keeps what makes it that run: its initial weights
(built by its own agent, seeded as a single run is), its own minibatch
generator (seeded as a single run's replay is) and its own optimiser state.
Adam is elementwise, and the summed loss gives each member the gradient of its
own loss, so a member follows the single run of its seed up to float
round-off (a test holds the first 100 losses to 1e-5).

What it buys depends on the hardware: a GPU is idle at a few hundred updates
a second of one small MLP, so stacking members multiplies its throughput; a
CPU core is already busy with one member's matrix products, so on CPU the gain
is what a batched launch saves in framework overhead (measured in
``benchmarks/train_throughput.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch.func import functional_call, stack_module_state, vmap
from tqdm import tqdm

from agents.common.replay import Batch, TensorReplay
from agents.offline.base import MetricsCallback, QLearningAgent, adam

#: Config fields members may differ in (everything else must be equal to stack them).
MEMBER_FIELDS = frozenset({"seed"})


class IncompatibleMembers(ValueError):
    """Members that cannot share one stacked model (their message names the difference)."""


def check_members(members: Sequence[QLearningAgent]) -> None:
    """IncompatibleMembers unless every member is the same algorithm with the same options but the
    seed, on one device, at the same update."""
    if not members:
        raise IncompatibleMembers("a batched run needs at least one member")
    first = members[0]
    if not isinstance(first, QLearningAgent):
        raise IncompatibleMembers(f"{type(first).__name__} is not a Q-learning agent; only those train batched")
    shared = {k: v for k, v in first.config.to_dict().items() if k not in MEMBER_FIELDS}
    for i, member in enumerate(members[1:], start=1):
        if type(member) is not type(first):
            raise IncompatibleMembers(f"member {i} is {member.algorithm}, member 0 is {first.algorithm}")
        other = {k: v for k, v in member.config.to_dict().items() if k not in MEMBER_FIELDS}
        differ = sorted(k for k in shared if shared[k] != other.get(k))
        if differ:
            raise IncompatibleMembers(f"member {i} differs from member 0 in {', '.join(differ)}")
        if member.device != first.device:
            raise IncompatibleMembers(f"member {i} is on {member.device}, member 0 on {first.device}")
        if member.updates_done != first.updates_done:
            raise IncompatibleMembers(f"member {i} is at update {member.updates_done}, member 0 at "
                                      f"{first.updates_done} (resume them apart)")
    seeds = [m.config.seed for m in members]
    if len(set(seeds)) != len(seeds):
        raise IncompatibleMembers(f"members share a seed: {seeds}")


class BatchedQLearning:
    """Train ``members`` (built, seeded agents of one algorithm) together on one ``replay``.

    Each member draws its minibatches from its own generator, seeded with its seed as ``train.py``
    seeds a single run's replay, or restored from ``sampler_states`` (a member's entry, as its
    checkpoint keeps it; None: fresh); the shared replay's own generator is not used. After
    :meth:`fit` (and before every checkpoint) each member's network, target and
    optimiser hold its own state, exactly as after a single run."""

    def __init__(self, members: Sequence[QLearningAgent], replay: TensorReplay,
                 sampler_states: Sequence[torch.Tensor | None] | None = None) -> None:
        check_members(members)
        self.members = list(members)
        self.replay = replay
        states = list(sampler_states) if sampler_states is not None else [None] * len(self.members)
        if len(states) != len(self.members):
            raise ValueError(f"{len(states)} sampler states for {len(self.members)} members")
        self.generators = [torch.Generator(device=replay.device).manual_seed(int(m.config.seed)) for m in members]
        for generator, state in zip(self.generators, states, strict=True):
            if state is not None:
                generator.set_state(state)
        # the data's statistics once for every fresh member (check_members: all at one update)
        stats = replay.obs_stats() if self.members[0].updates_done == 0 else None
        for member in self.members:
            member.prepare(replay, stats)
        self.template = self.members[0]
        # the module whose functional form every member's stacked weights run through
        self._base = copy.deepcopy(self.template.network).to("meta")
        self._stack()

    @property
    def updates_done(self) -> int:
        return self.template.updates_done

    def _stack(self) -> None:
        """Stack the members' weights, targets and optimiser states into one model."""
        params, self.buffers = stack_module_state([m.network for m in self.members])
        self.params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        targets, _ = stack_module_state([m.target for m in self.members])
        self.target_params = {k: v.detach() for k, v in targets.items()}
        self.optimizer = adam(list(self.params.values()), self.template.config.learning_rate)
        states = [m.optimizer.state_dict()["state"] for m in self.members]
        if all(states):  # resumed: carry each member's Adam moments into the stacked optimiser
            # the step count is one scalar: every member is at the same update (check_members)
            stacked = {i: {key: states[0][i][key].clone() if key == "step" else torch.stack([s[i][key] for s in states])
                           for key in states[0][i]} for i in states[0]}
            groups = self.optimizer.state_dict()["param_groups"]
            self.optimizer.load_state_dict({"state": stacked, "param_groups": groups})

    def _forward(self, params: dict[str, torch.Tensor], obs: torch.Tensor) -> torch.Tensor:
        def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(self._base, (p, b), (x,))

        return vmap(one)(params, self.buffers, obs)

    def sample(self, batch_size: int) -> Batch:
        """Each member's own minibatch (the rows its single run would draw), stacked: (M, b, ...)."""
        idx = torch.stack([torch.randint(self.replay.n, (batch_size,), device=self.replay.device, generator=g)
                           for g in self.generators])
        return self.replay.rows(idx)

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One step of every member; returns each term per member, shape (M,)."""
        q = self._forward(self.params, batch.obs)
        with torch.no_grad():
            next_q = self._forward(self.params, batch.next_obs)
            next_q_target = self._forward(self.target_params, batch.next_obs)

        def member_loss(q: torch.Tensor, next_q: torch.Tensor, next_q_target: torch.Tensor,
                        *columns: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return self.template.loss_terms(q, next_q, next_q_target, Batch(*columns))

        losses, terms = vmap(member_loss)(q, next_q, next_q_target, batch.obs, batch.actions, batch.rewards,
                                          batch.next_obs, batch.dones, batch.masks, batch.next_masks)
        self.optimizer.zero_grad(set_to_none=True)
        # the sum's gradient in member m's weights is the gradient of member m's own loss
        losses.sum().backward()
        self.optimizer.step()
        for member in self.members:
            member.updates_done += 1
        if self.updates_done % self.template.config.target_update_interval == 0:
            with torch.no_grad():
                for key, value in self.params.items():
                    self.target_params[key].copy_(value)
        return {key: value.detach() for key, value in terms.items()}

    def unstack(self) -> None:
        """Write every member's weights, target and optimiser state back into its own agent."""
        opt_state = self.optimizer.state_dict()["state"]
        with torch.no_grad():
            for m, member in enumerate(self.members):
                member.network.load_state_dict({**{k: v[m] for k, v in self.params.items()},
                                                **{k: v[m] for k, v in self.buffers.items()}})
                member.target.load_state_dict({**{k: v[m] for k, v in self.target_params.items()},
                                               **{k: v[m] for k, v in self.buffers.items()}})
                own = member.optimizer.state_dict()
                own["state"] = {i: {key: (value[m].clone() if key != "step" else value.clone())
                                    for key, value in state.items()} for i, state in opt_state.items()}
                member.optimizer.load_state_dict(own)

    def fit(self, n_updates: int, callbacks: Sequence[MetricsCallback | None] | None = None, log_every: int = 250,
            progress: bool = True, checkpoint: Callable[[int], None] | None = None,
            checkpoint_every: int = 0) -> list[dict[str, float]]:
        """Run every member to ``n_updates`` (resuming where they are); ``callbacks[m]`` gets member
        m's averaged metrics every ``log_every`` updates; ``checkpoint(step)`` is called after the
        members' states are written back. Returns each member's last logged metrics."""
        callbacks = list(callbacks) if callbacks is not None else [None] * len(self.members)
        last: list[dict[str, float]] = [{} for _ in self.members]
        sums: dict[str, torch.Tensor] = {}
        count = 0
        bar = tqdm(total=n_updates, initial=self.updates_done, unit="update", disable=not progress, leave=False,
                   desc=f"training {len(self.members)} {self.template.algorithm} members batched")
        while self.updates_done < n_updates:
            terms = self.update(self.sample(self.template.config.batch_size))
            count += 1
            for key, value in terms.items():
                sums[key] = sums[key] + value if key in sums else value.clone()
            done = self.updates_done
            if done % log_every == 0 or done == n_updates:
                means = {key: (value / count).tolist() for key, value in sums.items()}
                for m, callback in enumerate(callbacks):
                    last[m] = {key: float(values[m]) for key, values in means.items()}
                    if callback is not None:
                        callback(done, last[m])
                sums, count = {}, 0
            if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0:
                self.unstack()
                checkpoint(done)
            bar.update(1)
        bar.close()
        self.unstack()
        return last

