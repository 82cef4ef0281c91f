"""Off-policy estimators: hand-computed values, consistency, identifiability, clipping, bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from evaluation.ope import ESTIMATORS, Estimate, estimate, estimate_all, kish_ess, target_probabilities
from evaluation.ope.estimators import effective_sample_size, prepare
from evaluation.ope.synthetic import SyntheticProblem, TablePolicy
from offline_data.dataset import Episodes


def make_episodes(action, reward, behavior_prob, valid, n_actions=2) -> Episodes:
    valid = np.asarray(valid, dtype=bool)
    e, length = valid.shape
    return Episodes(
        obs=np.zeros((e, length, 1), np.float32),
        action=np.asarray(action, np.int64),
        reward=np.asarray(reward, np.float32),
        mask=np.broadcast_to(valid[..., None], (e, length, n_actions)).copy(),
        behavior_prob=np.asarray(behavior_prob, np.float32),
        terminated=np.zeros((e, length), bool),
        truncated=np.zeros((e, length), bool),
        t=np.where(valid, np.arange(length), -1),
        valid=valid,
        lengths=valid.sum(axis=1),
        patient_id=np.array([f"p{i}" for i in range(e)], dtype=object),
        episode_id=np.arange(e),
    )


# The hand example: 3 episodes, 2 steps, 2 actions; episode 3 lasts one step (its step 2 is padding).
#
#   episode  step  action  pi_b   pi_e(all actions)  pi_e(logged)  rho   w_t   reward
#   1        0     0       0.5    [1.0, 0.0]         1.0           2     2     1
#   1        1     1       0.5    [0.75, 0.25]       0.25          0.5   1     2
#   2        0     1       0.5    [0.5, 0.5]         0.5           1     1     0
#   2        1     0       0.25   [0.5, 0.5]         0.5           2     2     1
#   3        0     0       0.5    [0.25, 0.75]       0.25          0.5   0.5   4
#   3        1     (padded: rho 1, w stays 0.5, reward 0)
#
# Returns G = (3, 1, 4); trajectory weights w_{L-1} = (1, 2, 0.5), sum 3.5.
#   IS    = (1*3 + 2*1 + 0.5*4) / 3                 = 7/3
#   WIS   = 7 / 3.5                                  = 2
#   PDIS  = [(2*1 + 1*2) + (1*0 + 2*1) + (0.5*4)] / 3 = (4 + 2 + 2) / 3 = 8/3
#   WPDIS = (2*1 + 1*0 + 0.5*4)/3.5 + (1*2 + 2*1 + 0.5*0)/3.5 = 4/3.5 + 4/3.5 = 16/7
# q_hat(s, a) = [1, 2] on every logged step, so v_hat = pi_e . q_hat:
#   v = episode 1: (1, 0.75 + 0.5 = 1.25); episode 2: (1.5, 1.5); episode 3: (0.25 + 1.5 = 1.75)
#   q at the logged action = episode 1: (1, 2); episode 2: (2, 1); episode 3: (1)
#   DR per episode = sum_t w_t (r_t - q_t) + w_{t-1} v_t, w_{-1} = 1:
#     1: [2*(1-1) + 1*1] + [1*(2-2) + 2*1.25] = 1 + 2.5 = 3.5
#     2: [1*(0-2) + 1*1.5] + [2*(1-1) + 1*1.5] = -0.5 + 1.5 = 1
#     3: [0.5*(4-1) + 1*1.75]                  = 3.25
#   DR = 7.75 / 3 = 31/12
#   WDR: t=0: sum w0 (r-q) / 3.5 = (0 - 2 + 1.5)/3.5 = -1/7;  mean v0 = (1 + 1.5 + 1.75)/3 = 17/12
#        t=1: sum w1 (r-q) / 3.5 = 0;                          sum w0 v1 / sum w0 = (2*1.25 + 1*1.5 + 0)/3.5 = 8/7
#   WDR = -1/7 + 17/12 + 8/7 = 29/12
HAND_VALID = [[1, 1], [1, 1], [1, 0]]
HAND_ACTION = [[0, 1], [1, 0], [0, 0]]
HAND_BEHAVIOR = [[0.5, 0.5], [0.5, 0.25], [0.5, 1.0]]
HAND_REWARD = [[1, 2], [0, 1], [4, 0]]
HAND_PI = np.array([[[1.0, 0.0], [0.75, 0.25]], [[0.5, 0.5], [0.5, 0.5]], [[0.25, 0.75], [0.0, 0.0]]])
HAND_Q = np.where(np.array(HAND_VALID, bool)[..., None], np.array([1.0, 2.0]), 0.0)
HAND_VALUES = {"is": 7 / 3, "wis": 2.0, "pdis": 8 / 3, "wpdis": 16 / 7, "dr": 31 / 12, "wdr": 29 / 12}


@pytest.fixture
def hand() -> Episodes:
    return make_episodes(HAND_ACTION, HAND_REWARD, HAND_BEHAVIOR, HAND_VALID)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_hand_example(hand, name):
    est = estimate(name, hand, HAND_PI, q_hat=HAND_Q)
    assert est.value == pytest.approx(HAND_VALUES[name], rel=1e-12)
    assert est.identifiable and est.reason is None and est.n_episodes == 3
    assert est.low is None and est.high is None and est.interval is None


def test_hand_example_logged_probabilities_suffice_for_is_family(hand):
    logged = np.array([[1.0, 0.25], [0.5, 0.5], [0.25, 0.0]])  # padded entry ignored (its ratio is 1)
    for name in ("is", "wis", "pdis", "wpdis"):
        assert estimate(name, hand, logged).value == pytest.approx(HAND_VALUES[name])


def test_hand_example_discounted(hand):
    # gamma = 0.5 halves step 1:
    #   G = (1 + 1, 0 + 0.5, 4) = (2, 0.5, 4): IS = (1*2 + 2*0.5 + 0.5*4)/3 = 5/3, WIS = 5/3.5 = 10/7
    #   PDIS = [(2 + 0.5*2) + (0 + 0.5*2) + 2]/3 = 2;  WPDIS = 8/7 + 0.5 * 8/7 = 12/7
    #   DR per episode: 1 + 0.5*2.5 = 2.25; -0.5 + 0.5*1.5 = 0.25; 3.25 -> 5.75/3 = 23/12
    #   WDR = -1/7 + 17/12 + 0.5 * (0 + 8/7) = 3/7 + 17/12 = 155/84
    expected = {"is": 5 / 3, "wis": 10 / 7, "pdis": 2.0, "wpdis": 12 / 7, "dr": 23 / 12, "wdr": 155 / 84}
    got = estimate_all(hand, HAND_PI, q_hat=HAND_Q, gamma=0.5)
    assert {k: v.value for k, v in got.items()} == pytest.approx(expected)
    assert all(v.gamma == 0.5 for v in got.values())


def test_hand_example_clipped(hand):
    # clip = 1.5 caps cumulative weights: episode 1 (2, 1) -> (1.5, 1); episode 2 (1, 2) -> (1, 1.5); 3 unchanged.
    #   trajectory weights (1, 1.5, 0.5), sum 3:  IS = (1*3 + 1.5*1 + 0.5*4)/3 = 13/6;  WIS = 6.5/3 = 13/6
    #   PDIS = [(1.5*1 + 1*2) + (0 + 1.5*1) + 2]/3 = 7/3
    #   WPDIS = (1.5*1 + 0 + 0.5*4)/3 + (1*2 + 1.5*1 + 0)/3 = 3.5/3 + 3.5/3 = 7/3
    expected = {"is": 13 / 6, "wis": 13 / 6, "pdis": 7 / 3, "wpdis": 7 / 3}
    got = estimate_all(hand, HAND_PI, clip=1.5)
    assert {k: v.value for k, v in got.items()} == pytest.approx(expected)
    # 2 of the 5 logged steps had their weight lowered
    assert any("lowered 40.0%" in w for w in got["is"].warnings)
    assert got["is"].clip == 1.5


def test_hand_example_ess(hand):
    # Kish ESS of (1, 2, 0.5): 3.5^2 / (1 + 4 + 0.25) = 7/3; step 0 weights (2, 1, 0.5) give the same.
    est = estimate("wis", hand, HAND_PI)
    assert est.ess == pytest.approx(7 / 3)
    assert any("too small to trust" in w for w in est.warnings)
    data = prepare(hand, HAND_PI)
    assert effective_sample_size("wpdis", data) == pytest.approx(float(kish_ess(data.weights, axis=0).min()))


def test_zero_q_hat_reduces_dr_to_pdis_and_wdr_to_wpdis():
    problem = SyntheticProblem(np.array([[0.2, 0.8, 0.5], [0.6, 0.1, 0.3]]), np.full((2, 3), 1 / 3), 4, 0.8)
    episodes = problem.sample(300, seed=1)
    pi = np.array([[0.1, 0.8, 0.1], [0.6, 0.2, 0.2]])
    probs = problem.target_probs(episodes, pi)
    got = estimate_all(episodes, probs, q_hat=np.zeros_like(probs), gamma=0.9)
    assert got["dr"].value == pytest.approx(got["pdis"].value, rel=1e-12)
    assert got["wdr"].value == pytest.approx(got["wpdis"].value, rel=1e-12)
    assert got["dr"].value != pytest.approx(got["wdr"].value)


def test_target_equal_to_behaviour_gives_the_on_policy_mean():
    behaviour = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    problem = SyntheticProblem(np.array([[0.2, 0.8, 0.5], [0.6, 0.1, 0.3]]), behaviour, 5, 0.7)
    episodes = problem.sample(2000, seed=2)
    on_policy = float(episodes.reward.astype(np.float64).sum(axis=1).mean())
    exact = estimate_all(episodes, episodes.behavior_prob)  # pi_e(logged) == pi_b: every weight is exactly 1
    # from the float64 table, up to the float32 rounding of the logged behaviour probabilities
    table = estimate_all(episodes, problem.target_probs(episodes, behaviour))
    for name in ("is", "wis", "pdis", "wpdis"):
        assert exact[name].value == pytest.approx(on_policy, rel=1e-12)
        assert table[name].value == pytest.approx(on_policy, rel=1e-6)
        assert exact[name].ess == 2000
        assert exact[name].warnings == ()


def test_estimators_are_consistent_for_a_different_target():
    """A fixed-seed large sample: every estimator within 4 standard errors of the closed-form value."""
    problem = SyntheticProblem(np.array([[0.2, 0.8, 0.5], [0.6, 0.1, 0.3]]), np.array([[0.5, 0.3, 0.2]] * 2), 3,
                               0.8)
    pi = np.array([[0.1, 0.8, 0.1], [0.7, 0.1, 0.2]])
    truth = problem.true_value(pi)
    episodes = problem.sample(20_000, seed=3)
    probs = problem.target_probs(episodes, pi)
    got = estimate_all(episodes, probs, q_hat=problem.true_q(episodes, pi), interval="t")
    for name, est in got.items():
        se = (est.high - est.low) / (2 * 1.96)
        assert abs(est.value - truth) < 4 * se, name
    # an exact Q-function takes the weight variance out (not the Bernoulli reward noise): DR is narrower than PDIS
    assert (got["dr"].high - got["dr"].low) < 0.7 * (got["pdis"].high - got["pdis"].low)


def test_is_is_unbiased_over_many_samples():
    """IS is unbiased: its mean over 400 small independent data sets matches the truth within 4 standard errors."""
    problem = SyntheticProblem(np.array([[0.3, 0.9], [0.5, 0.2]]), np.array([[0.5, 0.5], [0.8, 0.2]]), 2)
    pi = np.array([[0.1, 0.9], [0.2, 0.8]])
    truth = problem.true_value(pi)
    values = np.array([estimate("is", ep, problem.target_probs(ep, pi)).value
                       for ep in (problem.sample(50, seed=s) for s in range(400))])
    assert abs(values.mean() - truth) < 4 * values.std(ddof=1) / np.sqrt(len(values))


def test_deterministic_target_without_overlap_is_unidentifiable():
    # the behaviour policy never takes action 2; the target always does
    problem = SyntheticProblem(np.array([[0.2, 0.8, 0.5]]), np.array([[0.5, 0.5, 0.0]]), 3)
    episodes = problem.sample(200, seed=4)
    probs = problem.target_probs(episodes, np.array([[0.0, 0.0, 1.0]]))
    q_hat = np.ones_like(probs)
    for interval in (None, "bootstrap", "t"):
        got = estimate_all(episodes, probs, q_hat=q_hat, interval=interval, n_boot=50)
        for name, est in got.items():
            assert not est.identifiable, name
            assert np.isnan(est.value), name  # IS alone would have said 0, DR the model's 3
            assert "no overlap" in est.reason and est.warnings[0] == est.reason
            assert est.ess == 0.0
            assert not est.covers(0.5)
            if interval is not None:
                assert np.isnan(est.low) and np.isnan(est.high)
        assert "not identifiable" in str(got["wis"])


def test_partial_overlap_is_identifiable_but_flagged():
    # deterministic target on action 0, which the behaviour takes 2 % of the time: over 3 steps ~8e-6 of
    # episodes follow it, so 200 episodes have ESS <= a handful
    problem = SyntheticProblem(np.array([[0.2, 0.8]]), np.array([[0.3, 0.7]]), 3)
    episodes = problem.sample(200, seed=5)
    probs = problem.target_probs(episodes, np.array([[1.0, 0.0]]))
    est = estimate("wis", episodes, probs)
    assert est.identifiable and np.isfinite(est.value)
    assert est.ess < 30 and any("too small to trust" in w for w in est.warnings)


def test_degenerate_weights_warn_below_one_percent():
    # one episode carries almost all the weight: ESS ~ 1 of 5,000 episodes (< 1 %)
    e = 5000
    behaviour = np.full((e, 1), 0.5)
    behaviour[0, 0] = 1e-6
    episodes = make_episodes(np.zeros((e, 1)), np.ones((e, 1)), behaviour, np.ones((e, 1)))
    est = estimate("wis", episodes, np.full((e, 1), 0.5), min_ess=0)
    assert est.ess < 0.01 * e
    assert any("below 1%" in w for w in est.warnings)


def test_clipping_lowers_variance_and_value_with_non_negative_rewards():
    # a target far from the behaviour: weights up to (0.9/0.1)^3 = 729
    problem = SyntheticProblem(np.array([[0.5, 0.9], [0.4, 0.6]]), np.array([[0.9, 0.1], [0.9, 0.1]]), 3)
    pi = np.array([[0.1, 0.9], [0.1, 0.9]])
    episodes = problem.sample(3000, seed=6)
    probs = problem.target_probs(episodes, pi)
    raw = estimate("is", episodes, probs, interval="t")
    clipped = estimate("is", episodes, probs, interval="t", clip=20.0)
    assert clipped.high - clipped.low < 0.5 * (raw.high - raw.low)
    # with rewards >= 0, lowering weights can only lower IS
    assert clipped.value < raw.value
    assert clipped.ess > raw.ess
    data = prepare(episodes, probs, clip=20.0)
    assert data.weights.max() == 20.0


def test_target_probabilities_calls_the_policy_once_on_valid_steps():
    problem = SyntheticProblem(np.array([[0.2, 0.8, 0.5], [0.6, 0.1, 0.3]]), np.full((2, 3), 1 / 3), 4, 0.6)
    episodes = problem.sample(100, seed=7)
    table = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    calls = []

    class Recording(TablePolicy):
        def action_probs(self, obs, mask):
            calls.append(len(obs))
            return super().action_probs(obs, mask)

    probs = target_probabilities(Recording("table", table), episodes)
    assert calls == [int(episodes.valid.sum())]
    assert probs.shape == (100, 4, 3)
    assert (probs[~episodes.valid] == 0).all()
    np.testing.assert_allclose(probs, problem.target_probs(episodes, table))


def test_target_probabilities_rejects_a_bad_policy():
    problem = SyntheticProblem(np.array([[0.2, 0.8]]), np.array([[0.5, 0.5]]), 2)
    episodes = problem.sample(10, seed=8)

    @dataclasses.dataclass
    class Bad:
        name: str
        out: str

        def action_probs(self, obs, mask):
            if self.out == "shape":
                return np.full((len(obs), 3), 1 / 3)
            return np.full((len(obs), 2), 0.4)

    with pytest.raises(ValueError, match="policy 'wide' returned probabilities of shape"):
        target_probabilities(Bad("wide", "shape"), episodes)
    with pytest.raises(ValueError, match="must sum to 1"):
        target_probabilities(Bad("short", "sum"), episodes)


@pytest.mark.parametrize(("change", "message"), [
    (lambda ep, p, q: (ep, p[:, :1], q), r"target probabilities have shape \(3, 1, 2\); expected \(3, 2\)"),
    (lambda ep, p, q: (ep, p * 1.5, q), r"target probabilities must lie in \[0, 1\]; got 1.5 at episode 0 step 0"),
    (lambda ep, p, q: (ep, p - 0.3, q), r"must lie in \[0, 1\]"),
    (lambda ep, p, q: (ep, np.where(p == 0.25, np.nan, p), q), r"must lie in \[0, 1\]; got nan"),
    (lambda ep, p, q: (dataclasses.replace(ep, behavior_prob=np.where(ep.behavior_prob == 0.25, 0.0,
                                                                      ep.behavior_prob)), p, q),
     r"behavior_prob is 0: the logged action could not have been taken.* at episode 1 step 1"),
    (lambda ep, p, q: (dataclasses.replace(ep, behavior_prob=ep.behavior_prob * 3), p, q),
     r"behavior_prob must lie in \(0, 1\]"),
    (lambda ep, p, q: (dataclasses.replace(ep, reward=ep.reward[:, :1]), p, q), r"episodes.reward has shape"),
    (lambda ep, p, q: (dataclasses.replace(ep, reward=np.where(ep.valid, np.nan, 0)), p, q), "reward is not finite"),
    (lambda ep, p, q: (ep, p, q[..., :1]), r"q_hat has shape \(3, 2, 1\), expected \(3, 2, 2\)"),
    (lambda ep, p, q: (ep, p, np.where(q == 2, np.inf, q)), "q_hat is not finite"),
    (lambda ep, p, q: (ep, np.take_along_axis(p, ep.action[..., None], 2)[..., 0], q),
     "DR and WDR need the target probabilities of every action"),
    (lambda ep, p, q: (ep, p * 0.5, q), "must sum to 1 over actions"),
])
def test_bad_input_is_named(hand, change, message):
    episodes, probs, q_hat = change(hand, HAND_PI.copy(), HAND_Q.copy())
    with pytest.raises(ValueError, match=message):
        estimate("dr", episodes, probs, q_hat=q_hat)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "snips"}, "unknown estimator"),
    ({"name": "dr"}, "dr and wdr need q_hat"),
    ({"interval": "wald"}, "unknown interval"),
    ({"gamma": 1.5}, r"gamma must lie in \[0, 1\]"),
    ({"clip": 0.0}, "clip must be a positive"),
    ({"level": 1.0}, "confidence level"),
    ({"interval": "bootstrap", "n_boot": 1}, "n_boot must be at least 2"),
    ({"interval": "hoeffding", "name": "wis", "clip": 5.0}, "available for is and pdis only"),
    ({"interval": "bernstein"}, "need bounded importance weights: pass clip="),
])
def test_bad_options_are_named(hand, kwargs, message):
    kwargs = {"name": "is", **kwargs}
    with pytest.raises(ValueError, match=message):
        estimate(kwargs.pop("name"), hand, HAND_PI, **kwargs)


def test_estimate_is_frozen_and_reports(hand):
    est = estimate("wis", hand, HAND_PI, interval="t")
    assert isinstance(est, Estimate)
    with pytest.raises(dataclasses.FrozenInstanceError):
        est.value = 0.0  # type: ignore[misc]
    assert est.covers(est.value) and not est.covers(est.high + 1)
    assert est.as_dict()["estimator"] == "wis"
    assert str(est).startswith("wis: 2.000 [")


def test_estimate_as_ground_truth_interval(hand):
    from evaluation.ground_truth import Interval

    est = estimate("wis", hand, HAND_PI, interval="t")
    assert est.as_interval() == Interval(est.value, est.low, est.high)
    assert np.isnan(estimate("wis", hand, HAND_PI).as_interval().low)
