"""Fitted Q evaluation: a hand-solved two-step problem, a simulated log against
simulator ground truth, action masks and config validation."""

from dataclasses import fields, replace
from typing import Any

import numpy as np
import pytest

from envs.params import EnvSettings
from evaluation.ground_truth import rollout
from evaluation.ope.fqe import (
    FQEConfig,
    fit_fqe,
    fit_fqe_resampled,
    fit_fqe_stacked,
    refit_values,
    resample_episodes,
)
from offline_data.dataset import Transitions, load_dataset
from offline_data.generate import generate
from policies.baselines import make_baseline

# ---------------------------------------------------------------- a two-step problem solved by hand
#
# States (one-hot features): S0 at week 0; S1A or S1B at week 1, the last week.
# From S0 action 0 pays 1 and leads to S1A w.p. 0.8 (else S1B); action 1 pays 0 and
# leads to S1B; action 2 is blocked. At S1A all actions are allowed. At S1B action 2
# is blocked inside these episodes, but other episodes start at S1B with it allowed
# and it pays 50 there, so the network learns a large Q(S1B, 2) that must never
# enter the expectation at an S1B reached from S0.
S0, S1A, S1B = 0, 1, 2
REWARD = {S0: (1.0, 0.0, 0.0), S1A: (2.0, 0.0, 1.0), S1B: (-1.0, 3.0, 50.0)}
ALL = np.array([True, True, True])
NO_2 = np.array([True, True, False])


class TablePolicy:
    """A stochastic target policy over the one-hot states; depends on the mask at S1B."""

    name = "table"

    def action_probs(self, obs, mask):
        state = obs.argmax(axis=1)
        probs = np.zeros(mask.shape)
        probs[state == S0] = (0.3, 0.7, 0.0)
        probs[state == S1A] = (0.2, 0.5, 0.3)
        at_b = state == S1B
        probs[at_b & mask[:, 2]] = (0.3, 0.2, 0.5)
        probs[at_b & ~mask[:, 2]] = (0.6, 0.4, 0.0)
        return probs


def exact_values(gamma):
    """(V(S0), V(S1B) with action 2 allowed), by hand."""
    v_1a = 0.2 * 2 + 0.5 * 0 + 0.3 * 1  # 0.7
    v_1b = 0.6 * -1 + 0.4 * 3  # 0.6: action 2 is blocked here
    v_1b_all = 0.3 * -1 + 0.2 * 3 + 0.5 * 50  # 25.3
    q0 = 1 + gamma * (0.8 * v_1a + 0.2 * v_1b)
    q1 = 0 + gamma * v_1b
    return 0.3 * q0 + 0.7 * q1, v_1b_all


def two_step_transitions(n_chain=1500, n_b=300, seed=0):
    """Uniform-random behaviour over allowed actions, rewards with N(0, 0.5) noise."""
    rng = np.random.default_rng(seed)
    rows = []  # (state, action, reward, next_state, done, mask, next_mask, episode, t)
    for e in range(n_chain):
        a0 = int(rng.integers(2))
        s1 = S1A if (a0 == 0 and rng.random() < 0.8) else S1B
        mask1 = ALL if s1 == S1A else NO_2
        a1 = int(rng.choice(np.flatnonzero(mask1)))
        rows.append((S0, a0, REWARD[S0][a0] + rng.normal(0, 0.5), s1, False, NO_2, mask1, e, 0))
        rows.append((s1, a1, REWARD[s1][a1] + rng.normal(0, 0.5), s1, True, mask1, mask1, e, 1))
    for e in range(n_chain, n_chain + n_b):
        a = int(rng.integers(3))
        rows.append((S1B, a, REWARD[S1B][a] + rng.normal(0, 0.5), S1B, True, ALL, ALL, e, 1))
    cols = list(zip(*rows, strict=True))
    state, action, reward, next_state, done, episode, t = (np.array(cols[i]) for i in (0, 1, 2, 3, 4, 7, 8))
    eye = np.eye(3, dtype=np.float32)
    n = len(action)
    return Transitions(obs=eye[state], action=action.astype(np.int64), reward=reward.astype(np.float32),
                       next_obs=eye[next_state], terminated=np.zeros(n, dtype=bool), truncated=done.astype(bool),
                       done=done.astype(bool), mask=np.array(cols[5], dtype=bool),
                       next_mask=np.array(cols[6], dtype=bool), behavior_prob=np.full(n, 0.5, dtype=np.float32),
                       episode=episode.astype(np.int64), t=t.astype(np.int64))


SMALL: dict[str, Any] = {"iterations": 4, "updates_per_iteration": 300, "batch_size": 256, "hidden": (32, 32),
         "learning_rate": 3e-3, "device": "cpu"}


@pytest.fixture(scope="module")
def two_step():
    return two_step_transitions()


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_fqe_matches_the_hand_computed_value_and_blocked_actions_stay_out(two_step, gamma):
    result = fit_fqe(TablePolicy(), two_step, FQEConfig(gamma=gamma, **SMALL), progress=False)
    v_s0, v_s1b_all = exact_values(gamma)
    first = np.flatnonzero(np.r_[True, np.diff(two_step.episode) != 0])
    from_s0 = two_step.obs[first].argmax(axis=1) == S0
    assert len(result.initial_values) == len(first)
    # per-episode values are those of the start state; a leak of Q(S1B, 2) = 50 at
    # any weight above 0.2 % would move V(S0) by more than the tolerance
    assert result.initial_values[from_s0] == pytest.approx(v_s0, abs=0.1)
    assert result.initial_values[~from_s0] == pytest.approx(v_s1b_all, abs=0.5)
    assert result.value == pytest.approx(result.initial_values.mean())
    q = result.q_values(np.eye(3, dtype=np.float32)[[S1B]], mask=NO_2[None])
    assert q[0, 2] == 0.0  # blocked: zeroed for callers
    assert result.q_values(np.eye(3, dtype=np.float32)[[S1B]])[0, 2] == pytest.approx(50, abs=1.0)
    assert [h["value"] for h in result.history][-1] == pytest.approx(result.value, abs=1e-6)


class UniformPolicy:
    """Uniform over allowed actions: a second target policy with its own exact value."""

    name = "uniform"

    def action_probs(self, obs, mask):
        return mask / mask.sum(axis=1, keepdims=True)


def uniform_value_s0():
    v_1a = (2.0 + 0.0 + 1.0) / 3  # all three actions allowed at S1A
    v_1b = (-1.0 + 3.0) / 2  # action 2 blocked at S1B inside these episodes
    return 0.5 * (1 + 0.8 * v_1a + 0.2 * v_1b) + 0.5 * (0 + v_1b)


def test_stacked_fits_each_reach_their_own_policys_value(two_step):
    """Fits of different policies, data and seeds share one stacked model; each answers for itself."""
    other = two_step_transitions(seed=5)
    results = fit_fqe_stacked([(TablePolicy(), two_step, FQEConfig(seed=0, **SMALL)),
                               (UniformPolicy(), other, FQEConfig(seed=1, **SMALL)),
                               (TablePolicy(), other, FQEConfig(seed=2, **SMALL))], progress=False)
    expected = (exact_values(1.0)[0], uniform_value_s0(), exact_values(1.0)[0])
    for result, data, policy, v_s0, seed in zip(results, (two_step, other, other), ("table", "uniform", "table"),
                                                expected, (0, 1, 2), strict=True):
        first = np.flatnonzero(np.r_[True, np.diff(data.episode) != 0])
        from_s0 = data.obs[first].argmax(axis=1) == S0
        assert len(result.initial_values) == len(first)
        assert result.initial_values[from_s0] == pytest.approx(v_s0, abs=0.1), policy
        assert result.policy == policy and result.config.seed == seed


def test_a_fit_does_not_depend_on_what_shares_its_stack(two_step):
    """Own seed, own minibatches, own gradient: fitted alone or beside others, the same fit to round-off."""
    config = FQEConfig(**{**SMALL, "iterations": 3, "updates_per_iteration": 40})
    other = two_step_transitions(seed=7)
    alone = fit_fqe(TablePolicy(), other, replace(config, seed=4), progress=False)
    stacked = fit_fqe_stacked([(UniformPolicy(), two_step, replace(config, seed=3)),
                               (TablePolicy(), other, replace(config, seed=4)),
                               (TablePolicy(), two_step, replace(config, seed=5))], progress=False)[1]
    for a, b in zip(alone.history, stacked.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert np.allclose(stacked.initial_values, alone.initial_values, atol=1e-5)
    assert not np.allclose(stacked.initial_values, fit_fqe(TablePolicy(), other, replace(config, seed=5),
                                                           progress=False).initial_values, atol=1e-5)


@pytest.mark.parametrize("form", ["transitions", "episodes"])
def test_refits_on_resamples_match_fits_on_the_resampled_data(simulated, form):
    """pi_e once on the log and rows taken per resample: the same fits as resampling first."""
    policy = make_baseline("stard", 0.1)
    data = simulated.transitions() if form == "transitions" else simulated.episodes()
    config = FQEConfig(iterations=3, updates_per_iteration=30, batch_size=128, hidden=(16,), device="cpu")
    shared = np.random.default_rng(9)  # one generator for every refit draws the resamples in turn
    with pytest.warns(UserWarning, match="iterations"):
        refits = fit_fqe_resampled(policy, data, [(shared, replace(config, seed=s)) for s in (1, 2, 3)],
                                   progress=False)
    again = np.random.default_rng(9)
    samples = [resample_episodes(data, again) for _ in range(3)]
    with pytest.warns(UserWarning, match="iterations"):
        direct = fit_fqe_stacked([(policy, sample, replace(config, seed=s)) for sample, s in zip(samples, (1, 2, 3),
                                                                                                strict=True)],
                                 progress=False)
    for a, b in zip(refits, direct, strict=True):
        assert a.config.seed == b.config.seed
        assert np.allclose(a.initial_values, b.initial_values, atol=1e-5)
        assert a.history[0]["loss"] == pytest.approx(b.history[0]["loss"], rel=1e-5)
    assert len({round(r.value, 6) for r in refits}) == 3  # three different resamples


def with_empty_episodes(episodes, empty):
    """``episodes`` with the episodes at ``empty`` emptied (no valid step), as padding leaves them."""
    valid = episodes.valid.copy()
    valid[empty] = False
    lengths = episodes.lengths.copy()
    lengths[empty] = 0
    return replace(episodes, valid=valid, lengths=lengths)


def test_refits_draw_episodes_without_steps_as_resampling_does(simulated):
    episodes = simulated.episodes()
    sparse = with_empty_episodes(episodes, np.arange(0, len(episodes), 3))
    policy = make_baseline("stard", 0.1)
    config = FQEConfig(iterations=20, updates_per_iteration=20, batch_size=128, hidden=(16,), device="cpu")
    refits = fit_fqe_resampled(policy, sparse, [(np.random.default_rng(5), replace(config, seed=s)) for s in (1, 2)],
                               progress=False)
    again = np.random.default_rng(5)
    direct = fit_fqe_stacked([(policy, resample_episodes(sparse, again), replace(config, seed=1))], progress=False)
    assert len(refits[0].initial_values) == len(direct[0].initial_values) < len(episodes)
    assert np.allclose(refits[0].initial_values, direct[0].initial_values, atol=1e-5)

    # a resample that draws no episode with a step has nothing to learn from: said, not a torch error
    lonely = with_empty_episodes(episodes, np.arange(1, 40))
    lonely = replace(lonely, **{f.name: getattr(lonely, f.name)[:40] for f in fields(lonely)
                                if getattr(lonely, f.name) is not None})
    misses = next(seed for seed in range(100) if not np.any(np.random.default_rng(seed).integers(0, 40, 40) == 0))
    with pytest.raises(ValueError, match="only episodes without steps"):
        fit_fqe_resampled(policy, lonely, [(np.random.default_rng(misses), config)], progress=False)


def test_stacked_fits_must_agree_on_everything_but_the_seed(two_step):
    with pytest.raises(ValueError, match="fit 1 differs from fit 0 in hidden"):
        fit_fqe_stacked([(TablePolicy(), two_step, FQEConfig(**SMALL)),
                         (TablePolicy(), two_step, FQEConfig(**{**SMALL, "hidden": (16,)}))], progress=False)
    wider = replace(two_step, obs=np.pad(two_step.obs, ((0, 0), (0, 1))),
                    next_obs=np.pad(two_step.next_obs, ((0, 0), (0, 1))))
    with pytest.raises(ValueError, match="share feature and action counts"):
        fit_fqe_stacked([(TablePolicy(), two_step, FQEConfig(**SMALL)),
                         (TablePolicy(), wider, FQEConfig(**SMALL))], progress=False)
    with pytest.raises(ValueError, match="no fits"):
        fit_fqe_stacked([], progress=False)


def test_a_policy_that_puts_mass_on_blocked_actions_is_refused(two_step):
    class Careless:
        name = "careless"

        def action_probs(self, obs, mask):
            return np.full(mask.shape, 1.0 / mask.shape[1])

    with pytest.raises(ValueError, match="'careless' puts probability .* on blocked actions"):
        fit_fqe(Careless(), two_step, FQEConfig(**SMALL), progress=False)


def test_too_few_iterations_for_the_horizon_warn_at_the_callers_line(two_step):
    short = FQEConfig(**{**SMALL, "iterations": 1, "updates_per_iteration": 5})
    for fit in (lambda: fit_fqe(TablePolicy(), two_step, short, progress=False),
                lambda: fit_fqe_stacked([(TablePolicy(), two_step, short)], progress=False),
                lambda: fit_fqe_resampled(TablePolicy(), two_step, [(np.random.default_rng(0), short)],
                                          progress=False)):
        with pytest.warns(UserWarning, match=r"iterations \(1\) < longest episode \(2 steps\)") as caught:
            fit()
        assert caught[0].filename == __file__  # where the user called, not inside fqe.py


@pytest.mark.parametrize(("field", "value"), [
    ("iterations", 0), ("updates_per_iteration", -3), ("batch_size", 0), ("batch_size", 2.5), ("hidden", (64, 0)),
    ("hidden", "wide"), ("learning_rate", 0.0), ("learning_rate", float("nan")), ("gamma", 0.0), ("gamma", 1.5),
    ("torch_threads", -1), ("device", "warp-drive"),
])
def test_bad_config_values_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"FQE {field}"):
        FQEConfig(**{field: value})


# ---------------------------------------------------------------- simulated log vs simulator ground truth

HORIZON = 16
BEHAVIOUR = ("stard", 0.3)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """2,000 patients x 16 weeks under STAR*D with epsilon 0.3."""
    path = tmp_path_factory.mktemp("fqe") / "log.parquet"
    generate(path, policy=BEHAVIOUR[0], epsilon=BEHAVIOUR[1], patients=2000, seed=11,
             settings=EnvSettings(horizon=HORIZON))
    return load_dataset(path)


def test_fqe_of_the_behaviour_policy_matches_simulator_ground_truth(simulated, params):
    policy = make_baseline(*BEHAVIOUR)
    config = FQEConfig(iterations=HORIZON + 2, updates_per_iteration=150, batch_size=512, hidden=(64, 64),
                       device="cpu", seed=0)
    result = fit_fqe(policy, simulated.transitions(), config, progress=False)
    truth = rollout(policy, 50_000, seed=5, params=params, settings=EnvSettings(horizon=HORIZON)).value
    logged = simulated.episodes().reward.sum(axis=1).mean()  # on-policy: the log's own mean return
    # Observed over data seeds 11-13: FQE within 8.4 % of the truth (about 1 %
    # here), the log's own mean within 8.3 %; FQE within 6 % of that mean.
    # (relative to at least one reward unit: with the cost of care in the reward a return can sit
    # near zero, where a relative bound means nothing)
    assert abs(result.value - truth.value) <= 0.15 * max(abs(truth.value), 1.0), (result.value, truth)
    assert abs(result.value - logged) <= 0.10 * max(abs(logged), 1.0), (result.value, logged)

    # q_hat for doubly robust estimators: zero on padded steps and blocked actions,
    # and its first step reproduces the per-episode initial values
    episodes = simulated.episodes()
    q_hat = result.q_hat(episodes)
    assert q_hat.shape == (*episodes.valid.shape, episodes.mask.shape[2])
    assert np.all(q_hat[~episodes.valid] == 0.0)
    assert np.all(q_hat[~episodes.mask] == 0.0)
    pi0 = policy.action_probs(episodes.obs[:, 0], episodes.mask[:, 0])
    assert np.allclose((pi0 * q_hat[:, 0]).sum(axis=1), result.initial_values, atol=1e-4)


def test_episodes_and_transitions_give_the_same_fit(simulated):
    policy = make_baseline(*BEHAVIOUR)
    config = FQEConfig(iterations=2, updates_per_iteration=10, batch_size=64, hidden=(16,), device="cpu", seed=3)
    with pytest.warns(UserWarning, match="iterations"):
        a = fit_fqe(policy, simulated.transitions(), config, progress=False)
    with pytest.warns(UserWarning, match="iterations"):
        b = fit_fqe(policy, simulated.episodes(), config, progress=False)
    assert np.array_equal(a.initial_values, b.initial_values)


# ---------------------------------------------------------------- refits on bootstrap resamples


def test_resampled_episodes_keep_every_field_of_an_episode_together(simulated):
    episodes = simulated.episodes()
    sample = resample_episodes(episodes, np.random.default_rng(4))
    assert len(sample) == len(episodes) and sample.obs.shape == episodes.obs.shape
    # episode ids are unique in the log, so each drawn episode can be found and compared field by field
    position = {int(e): i for i, e in enumerate(episodes.episode_id)}
    chosen = np.array([position[int(e)] for e in sample.episode_id])
    assert len(np.unique(chosen)) < len(chosen)  # drawn with replacement
    for name in ("obs", "action", "reward", "mask", "behavior_prob", "valid", "lengths", "patient_id"):
        assert np.array_equal(getattr(sample, name), getattr(episodes, name)[chosen]), name
    again = resample_episodes(episodes, np.random.default_rng(4))
    assert np.array_equal(again.episode_id, sample.episode_id)


def test_refit_interval_is_wider_than_the_initial_state_bootstrap_and_covers_the_truth(simulated, params):
    """The initial-state bootstrap treats the fitted Q-function as exact; refits on resamples carry
    its sampling and fitting error, so their interval is wider, and here it brackets the truth."""
    from evaluation.fairness import fqe_estimate

    policy = make_baseline("stard", 0.1)  # off-policy: the log is epsilon 0.3
    config = FQEConfig(iterations=HORIZON + 2, updates_per_iteration=80, batch_size=512, hidden=(64, 64),
                       device="cpu", seed=0)
    episodes = simulated.episodes()
    fitted = fit_fqe(policy, episodes, config, progress=False)
    refits = refit_values(policy, episodes, config, 4, seed=1, progress=False)
    assert np.all(np.isfinite(refits)) and np.std(refits) > 0
    naive = fqe_estimate(fitted.initial_values, level=0.95, n_boot=500)
    honest = fqe_estimate(fitted.initial_values, level=0.95, refits=refits)
    assert honest.interval == "refit" and honest.value == naive.value
    assert honest.high - honest.low > naive.high - naive.low
    truth = rollout(policy, 20_000, seed=5, params=params, settings=EnvSettings(horizon=HORIZON)).value
    assert honest.low <= truth.value <= honest.high, (honest, truth)
    with pytest.raises(ValueError, match="at least 2"):
        refit_values(policy, episodes, config, 1, progress=False)
