"""Intervals: vectorised bootstrap and jackknife against brute force, shrinkage, reproducibility,
Student t and delta method, BCa, Hoeffding and empirical Bernstein lower bounds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats

from evaluation.ope import (
    ESTIMATORS,
    RatioTerms,
    bca_interval,
    bernstein_lower,
    bootstrap_values,
    estimate,
    estimate_all,
    estimator_terms,
    hoeffding_lower,
    percentile_interval,
    prepare,
    refit_interval,
    resample_counts,
    t_interval,
)
from evaluation.ope.synthetic import SyntheticProblem

MU = np.array([[0.2, 0.8, 0.5], [0.6, 0.1, 0.3]])
BEHAVIOUR = np.array([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]])
PI = np.array([[0.1, 0.8, 0.1], [0.7, 0.1, 0.2]])
PROBLEM = SyntheticProblem(MU, BEHAVIOUR, horizon=3, p_continue=0.8)


def take(episodes, index):
    """The episodes at ``index`` (repeats allowed), as a new Episodes."""
    fields = {}
    for f in dataclasses.fields(episodes):
        value = getattr(episodes, f.name)
        fields[f.name] = value if value is None else value[index]
    return type(episodes)(**fields)


def inputs(n, seed):
    episodes = PROBLEM.sample(n, seed=seed)
    return episodes, PROBLEM.target_probs(episodes, PI), PROBLEM.true_q(episodes, PI) + 0.1  # a slightly wrong model


def test_resample_counts_are_multinomial_and_seeded():
    blocks = list(resample_counts(50, 300, seed=1))
    counts = np.concatenate(blocks)
    assert counts.shape == (300, 50)
    assert (counts.sum(axis=1) == 50).all() and counts.min() >= 0
    assert counts.mean() == pytest.approx(1.0)
    assert np.var(counts) == pytest.approx(1 - 1 / 50, abs=0.05)  # Binomial(50, 1/50) marginals
    np.testing.assert_array_equal(counts, np.concatenate(list(resample_counts(50, 300, seed=1))))
    assert not np.array_equal(counts, np.concatenate(list(resample_counts(50, 300, seed=2))))


def test_bootstrap_values_equal_estimates_on_resampled_episodes():
    episodes, probs, q_hat = inputs(40, seed=2)
    data = prepare(episodes, probs, q_hat=q_hat, gamma=0.9, clip=4.0)
    terms = [estimator_terms(name, data) for name in ESTIMATORS]
    boot = bootstrap_values(terms, n_boot=5, seed=3)
    counts = next(resample_counts(40, 5, seed=3))
    for b in range(5):
        index = np.repeat(np.arange(40), counts[b].astype(int))
        brute = estimate_all(take(episodes, index), probs[index], q_hat=q_hat[index], gamma=0.9, clip=4.0)
        for name, values in zip(ESTIMATORS, boot, strict=True):
            assert values[b] == pytest.approx(brute[name].value, rel=1e-10), name


def test_closed_form_jackknife_equals_leaving_each_episode_out():
    episodes, probs, q_hat = inputs(25, seed=4)
    data = prepare(episodes, probs, q_hat=q_hat)
    for name in ESTIMATORS:
        jack = estimator_terms(name, data).jackknife()
        brute = [estimate(name, take(episodes, np.delete(np.arange(25), i)), np.delete(probs, i, axis=0),
                          q_hat=np.delete(q_hat, i, axis=0)).value for i in range(25)]
        np.testing.assert_allclose(jack, brute, rtol=1e-10, err_msg=name)


def test_t_interval_of_a_mean_is_students():
    episodes, probs, _ = inputs(300, seed=5)
    est = estimate("pdis", episodes, probs, interval="t", level=0.9)
    x = estimator_terms("pdis", prepare(episodes, probs)).per_episode()
    low, high = stats.t.interval(0.9, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert (est.low, est.high) == pytest.approx((low, high), rel=1e-10)
    assert est.level == 0.9 and est.interval == "t"


def test_delta_method_t_interval_agrees_with_the_bootstrap_for_weighted_estimators():
    episodes, probs, q_hat = inputs(4000, seed=6)
    t = estimate_all(episodes, probs, q_hat=q_hat, interval="t")
    boot = estimate_all(episodes, probs, q_hat=q_hat, interval="bootstrap", n_boot=1000)
    for name in ("wis", "wpdis", "wdr"):
        ratio = (t[name].high - t[name].low) / (boot[name].high - boot[name].low)
        assert 0.85 < ratio < 1.15, (name, ratio)
        assert any("delta-method" in w for w in t[name].warnings)


@pytest.mark.parametrize("interval", ["bootstrap", "bca", "t"])
def test_intervals_shrink_as_data_grow(interval):
    results = []
    for n, seed in ((500, 7), (8000, 8)):
        episodes, probs, q_hat = inputs(n, seed)
        results.append(estimate_all(episodes, probs, q_hat=q_hat, interval=interval, n_boot=400))
    small, large = results
    for name in ESTIMATORS:
        ratio = (large[name].high - large[name].low) / (small[name].high - small[name].low)
        assert ratio < 0.4, (name, ratio)  # 1/4 expected: sqrt(500/8000)


@pytest.mark.parametrize("interval", ["bootstrap", "bca"])
def test_bootstrap_is_reproducible_and_contains_the_estimate(interval):
    episodes, probs, q_hat = inputs(300, seed=9)
    first = estimate_all(episodes, probs, q_hat=q_hat, interval=interval, n_boot=300, seed=11)
    again = estimate_all(episodes, probs, q_hat=q_hat, interval=interval, n_boot=300, seed=11)
    other = estimate_all(episodes, probs, q_hat=q_hat, interval=interval, n_boot=300, seed=12)
    one = estimate("wdr", episodes, probs, q_hat=q_hat, interval=interval, n_boot=300, seed=11)
    for name in ESTIMATORS:
        assert first[name] == again[name]
        assert (first[name].low, first[name].high) != (other[name].low, other[name].high)
        assert first[name].low < first[name].value < first[name].high
        assert first[name].interval == interval and first[name].level == 0.95
    assert one == first["wdr"]  # resamples depend on the seed only, not on which estimators share them


def test_bca_matches_scipy_on_a_skewed_mean():
    """Same method, independent resamples: with many resamples both land on the same interval."""
    x = np.random.default_rng(13).lognormal(0.0, 1.0, size=200)
    terms = RatioTerms.mean(x)
    ours = bca_interval(bootstrap_values([terms], n_boot=20_000, seed=1)[0], float(x.mean()), terms.jackknife())
    ref = stats.bootstrap((x,), np.mean, n_resamples=20_000, method="BCa", random_state=2).confidence_interval
    percentile = percentile_interval(bootstrap_values([terms], n_boot=20_000, seed=1)[0])
    width = ref.high - ref.low
    assert abs(ours.low - ref.low) < 0.03 * width and abs(ours.high - ref.high) < 0.03 * width
    # right skew: BCa moves both ends up relative to the percentile interval
    assert ours.low > percentile.low and ours.high > percentile.high


def test_bca_without_bias_or_skew_is_the_percentile_interval():
    boot = np.linspace(-1.0, 1.0, 2001)  # symmetric about the estimate 0
    jack = np.array([-1.0, 1.0, -2.0, 2.0])  # symmetric: zero acceleration
    bca, percentile = bca_interval(boot, 0.0, jack, 0.9), percentile_interval(boot, 0.9)
    assert (bca.low, bca.high) == pytest.approx((percentile.low, percentile.high), abs=1e-12)
    assert (bca.method, percentile.method) == ("bca", "bootstrap")


def test_t_interval_covers_at_the_stated_rate():
    truth = PROBLEM.true_value(PI)
    covered = [estimate("wis", *inputs(400, seed=100 + rep)[:2], interval="t", level=0.9).covers(truth)
               for rep in range(300)]
    assert 0.85 < np.mean(covered) < 0.95  # +- 2.9 binomial standard errors around 0.9


def test_hoeffding_and_bernstein_formulas():
    x = np.array([0.0, 0.5, 1.0, 1.0])
    delta = 0.1
    h = hoeffding_lower(x, 0.0, 2.0, level=0.9)
    assert h.low == pytest.approx(0.625 - 2.0 * np.sqrt(np.log(1 / delta) / 8))
    b = bernstein_lower(x, 0.0, 2.0, level=0.9)
    var = np.var(x, ddof=1)
    assert b.low == pytest.approx(0.625 - np.sqrt(2 * var * np.log(2 / delta) / 4) - 7 * 2.0 * np.log(2 / delta) / 9)
    assert h.high == b.high == np.inf
    with pytest.raises(ValueError, match="outside the stated range"):
        hoeffding_lower(x, 0.0, 0.9)


@pytest.mark.parametrize("method", ["hoeffding", "bernstein"])
@pytest.mark.parametrize(("name", "clip", "signed"), [("is", 5.0, False), ("pdis", 5.0, False), ("is", 1.5, False),
                                                      ("pdis", 1.5, True)])
def test_lower_bounds_hold_at_the_stated_rate(method, name, clip, signed):
    """3 steps, weights up to 1.6^3 = 4.1: clip 5 never binds, 1.5 does (which may only lower the bound).

    ``signed`` maps rewards r in {0, 1} to 2r - 1 in [-1, 1] (padded steps stay 0), which exercises the shift
    to non-negative terms: the value becomes 2 V - sum_t p^t.
    """
    problem = SyntheticProblem(np.array([[0.3, 0.9], [0.5, 0.2]]), np.full((2, 2), 0.5), 3, 0.9)
    pi = np.array([[0.2, 0.8], [0.8, 0.2]])
    truth = problem.true_value(pi)
    if signed:
        truth = 2 * truth - (1 + 0.9 + 0.81)
    level = 0.8
    lows, values = [], []
    for rep in range(200):
        episodes = problem.sample(150, seed=rep)
        if signed:
            episodes = dataclasses.replace(episodes, reward=np.where(episodes.valid, 2 * episodes.reward - 1, 0))
        est = estimate(name, episodes, problem.target_probs(episodes, pi), clip=clip, interval=method,
                       level=level, reward_range=(-1.0 if signed else 0.0, 1.0))
        assert est.high == np.inf and est.interval == method
        lows.append(est.low)
        values.append(est.value)
    lows_arr = np.array(lows)
    assert np.mean(lows_arr <= truth) >= level
    assert (lows_arr < np.array(values)).all()
    # informative: well above the trivial bound r_min * horizon (0, or -2.71 when signed)
    assert np.median(lows_arr) > truth - (3.0 if signed else 1.5)


def test_bernstein_beats_hoeffding_when_terms_vary_little():
    problem = SyntheticProblem(np.array([[0.02, 0.05]]), np.array([[0.5, 0.5]]), 2)
    episodes = problem.sample(20_000, seed=14)
    probs = problem.target_probs(episodes, np.array([[0.4, 0.6]]))
    kwargs = {"clip": 2.0, "reward_range": (0.0, 1.0), "level": 0.95}
    h = estimate("pdis", episodes, probs, interval="hoeffding", **kwargs)
    b = estimate("pdis", episodes, probs, interval="bernstein", **kwargs)
    assert b.low > h.low
    smaller = estimate("pdis", take(episodes, np.arange(2000)), probs[:2000], interval="bernstein", **kwargs)
    assert smaller.low < b.low  # more data, tighter bound


def test_lower_bound_reward_range():
    episodes, probs, _ = inputs(200, seed=15)
    from_data = estimate("is", episodes, probs, clip=5.0, interval="hoeffding")
    assert any("taken from the data" in w for w in from_data.warnings)
    stated = estimate("is", episodes, probs, clip=5.0, interval="hoeffding", reward_range=(0.0, 1.0))
    assert not any("taken from the data" in w for w in stated.warnings)
    wider = estimate("is", episodes, probs, clip=5.0, interval="hoeffding", reward_range=(-1.0, 1.0))
    assert wider.low < stated.low
    assert set(estimate_all(episodes, probs, clip=5.0, interval="bernstein")) == {"is", "pdis"}
    with pytest.raises(ValueError, match="outside reward_range"):
        estimate("is", episodes, probs, clip=5.0, interval="hoeffding", reward_range=(0.0, 0.5))


def test_t_needs_two_episodes():
    episodes, probs, _ = inputs(1, seed=16)
    with pytest.raises(ValueError, match="at least 2 episodes"):
        estimate("is", episodes, probs, interval="t")
    with pytest.raises(ValueError, match="at least 2 episodes"):
        t_interval(RatioTerms.mean(np.array([1.0])))


def test_refit_interval_is_point_plus_minus_t_times_the_refits_sd():
    result = refit_interval(10.0, np.array([1.0, 2.0, 3.0]), level=0.95)  # sd 1, t(2 df, 0.975) = 4.3027
    assert result.method == "refit"
    assert result.low == pytest.approx(10.0 - 4.302653, abs=1e-5)
    assert result.high == pytest.approx(10.0 + 4.302653, abs=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        refit_interval(0.0, np.array([1.0]))
    with pytest.raises(ValueError, match="finite"):
        refit_interval(0.0, np.array([1.0, np.nan]))
