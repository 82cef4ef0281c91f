import numpy as np
import pytest

from offline_data.behavior import estimate_behavior_probs, restrict_to_allowed
from offline_data.dataset import load_dataset
from offline_data.importer import import_log
from offline_data.io import read_metadata
from tests.offline_data.conftest import KEY, raw_log, simulated_frame


@pytest.fixture(scope="module")
def usual_care():
    return simulated_frame(policy="usual_care", epsilon=0.3, patients=500, horizon=16, seed=21)


def test_estimates_are_close_to_the_true_logging_probabilities(usual_care):
    f = usual_care
    probs, chosen, report = estimate_behavior_probs(f.obs, f.allowed, f.action, seed=0)
    truth = f.behavior_prob
    assert np.all(probs[~f.allowed] == 0) and np.allclose(probs.sum(axis=1), 1.0)
    assert np.array_equal(chosen, probs[np.arange(len(f)), f.action]) and chosen.min() > 0
    error = np.abs(chosen - truth)
    assert error.mean() < 0.06, error.mean()
    assert np.corrcoef(np.log(chosen), np.log(truth))[0, 1] > 0.9
    # importance weights come out about right on average
    assert abs(float(np.mean(truth / chosen)) - 1.0) < 0.15
    # ignoring the patient (uniform over allowed actions) is far worse: the test can fail
    uniform = 1.0 / f.allowed.sum(axis=1)
    assert np.abs(uniform - truth).mean() > 3 * error.mean()
    assert report.held_out_log_loss is not None and report.held_out_log_loss < report.uniform_log_loss
    assert report.max_share_gap < 0.01 and report.rows == len(f)
    assert "log loss" in report.table() and "raise_dose" in report.table()


def test_a_policy_uniform_over_allowed_actions_is_recovered():
    f = simulated_frame(policy="random", epsilon=1.0, patients=300, horizon=10, seed=2)
    _, chosen, _ = estimate_behavior_probs(f.obs, f.allowed, f.action, seed=0)
    assert np.abs(chosen - f.behavior_prob).mean() < 0.04


def test_restricting_renormalises_over_allowed_actions():
    probs = np.array([[0.5, 0.3, 0.2], [0.0, 0.0, 1.0]])
    allowed = np.array([[True, True, False], [True, True, False]])
    assert np.allclose(restrict_to_allowed(probs, allowed), [[0.625, 0.375, 0.0], [0.5, 0.5, 0.0]])


def test_import_estimates_missing_probabilities_and_flags_them(tmp_path, usual_care):
    raw = tmp_path / "no_probs.csv"
    raw_log(usual_care, with_prob=False).to_csv(raw, index=False)
    printed: list[str] = []
    result = import_log(raw, tmp_path / "out" / "est.parquet", key=KEY, k=1, report=printed.append)
    meta = read_metadata(result.out)
    assert meta["behavior_prob_estimated"] is True and result.behavior_prob_estimated
    assert meta["behavior_model"]["rows"] == len(usual_care) and meta["behavior_model"]["log_loss"] > 0
    assert any("calibration" in text for text in printed)
    data = load_dataset(result.out)
    assert data.behavior_prob_estimated
    t = data.transitions()
    assert np.all((t.behavior_prob > 0) & (t.behavior_prob <= 1))

    # logged probabilities are kept exactly and not flagged
    raw_logged = tmp_path / "with_probs.csv"
    raw_log(usual_care).to_csv(raw_logged, index=False)
    kept = import_log(raw_logged, tmp_path / "out2" / "kept.parquet", key=KEY, k=1, report=lambda _: None)
    assert read_metadata(kept.out)["behavior_prob_estimated"] is False and "behavior_model" not in read_metadata(
        kept.out)
    assert sorted(load_dataset(kept.out).frame.behavior_prob) == sorted(usual_care.behavior_prob)
