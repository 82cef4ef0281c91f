"""A sweep's Q-learning members trained as one stacked model follow their single runs."""

import numpy as np
import pytest
import torch

from agents.common.replay import TensorReplay
from agents.offline.batched import BatchedQLearning, IncompatibleMembers, check_members
from agents.offline.bc import BCConfig, BehaviourCloning
from agents.offline.cql import CQLConfig, DiscreteCQL
from agents.offline.dqn import DQNConfig, OfflineDQN

N, F, A = 3000, 32, 11
OPTIONS = dict(device="cpu", hidden=(64, 64), batch_size=64, target_update_interval=20)


def _replay(seed: int) -> TensorReplay:
    rng = np.random.default_rng(123)  # the same data for every member
    obs = rng.normal(size=(N, F)).astype(np.float32)
    masks = rng.random((N, A)) < 0.6
    masks[:, 0] = True
    actions = np.array([rng.choice(np.flatnonzero(m)) for m in masks])
    done = np.arange(N) % 26 == 25
    return TensorReplay(obs, actions, np.sin(obs[:, 0]), np.roll(obs, -1, axis=0), done, masks,
                        np.roll(masks, -1, axis=0), seed=seed)


def _single(seed: int, updates: int, cls=DiscreteCQL, config=CQLConfig):
    agent = cls(config(seed=seed, **OPTIONS))
    history: list[dict[str, float]] = []
    agent.fit(_replay(seed), n_updates=updates, callback=lambda step, m: history.append(m), log_every=1,
              progress=False)
    return agent, history


def _members(seeds, cls=DiscreteCQL, config=CQLConfig):
    return [cls(config(seed=s, **OPTIONS)) for s in seeds]


@pytest.mark.parametrize(("cls", "config"), [(DiscreteCQL, CQLConfig), (OfflineDQN, DQNConfig)])
def test_members_follow_their_single_runs(cls, config):
    seeds = (0, 1, 2)
    members = _members(seeds, cls, config)
    history: dict[int, list[dict[str, float]]] = {s: [] for s in seeds}
    batched = BatchedQLearning(members, _replay(0))
    last = batched.fit(100, callbacks=[(lambda step, m, s=s: history[s].append(m)) for s in seeds], log_every=1,
                       progress=False)
    for seed, member, final in zip(seeds, members, last, strict=True):
        single, expected = _single(seed, 100, cls, config)
        assert len(history[seed]) == 100 and final == history[seed][-1]
        # the first 100 updates' losses, term by term, within 1e-5 of the single run's
        worst = max(abs(got[k] - want[k]) for got, want in zip(history[seed], expected, strict=True) for k in want)
        assert worst < 1e-5, (seed, worst)
        assert member.updates_done == single.updates_done == 100
        for got, want in zip(member.network.parameters(), single.network.parameters(), strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        for got, want in zip(member.target.parameters(), single.target.parameters(), strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # different seeds are different runs
    assert not torch.equal(members[0].network.heads[0][0].weight, members[1].network.heads[0][0].weight)


def test_a_resumed_group_continues_where_it_stopped():
    """Unstacking writes each member's weights, target and Adam moments back, so a group rebuilt
    from its members (as after a checkpoint) continues exactly as one that never stopped."""
    seeds = (3, 4)
    straight = _members(seeds)
    BatchedQLearning(straight, _replay(0)).fit(60, progress=False)
    paused = _members(seeds)
    first = BatchedQLearning(paused, _replay(0))
    first.fit(30, progress=False)
    samplers = [g.get_state() for g in first.generators]  # as each member's checkpoint keeps it
    BatchedQLearning(paused, _replay(0), samplers).fit(60, progress=False)
    for a, b in zip(straight, paused, strict=True):
        assert a.updates_done == b.updates_done == 60
        for got, want in zip(a.network.parameters(), b.network.parameters(), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        for key, state in a.optimizer.state_dict()["state"].items():
            torch.testing.assert_close(state["exp_avg"], b.optimizer.state_dict()["state"][key]["exp_avg"])


def test_members_that_cannot_share_a_model_are_named():
    with pytest.raises(IncompatibleMembers, match="alpha"):
        check_members([DiscreteCQL(CQLConfig(seed=0, alpha=0.02, **OPTIONS)),
                       DiscreteCQL(CQLConfig(seed=1, alpha=0.1, **OPTIONS))])
    with pytest.raises(IncompatibleMembers, match="dqn_offline"):
        check_members([DiscreteCQL(CQLConfig(seed=0, **OPTIONS)), OfflineDQN(DQNConfig(seed=1, **OPTIONS))])
    with pytest.raises(IncompatibleMembers, match="share a seed"):
        check_members(_members((0, 0)))
    with pytest.raises(IncompatibleMembers, match="not a Q-learning agent"):
        check_members([BehaviourCloning(BCConfig(seed=0, **OPTIONS))])
    late = _members((5, 6))
    late[1].updates_done = 10
    with pytest.raises(IncompatibleMembers, match="at update 10"):
        check_members(late)
