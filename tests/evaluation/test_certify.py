"""Certified policy improvement: candidates, bounds, the HCPI protocol end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from envs.rules import action_mask
from envs.spec import FEATURE_INDEX, N_ACTIONS, N_FEATURES
from evaluation.certify import Candidate, CandidatePolicy, CertifyConfig, FirstChoicePolicy, certify, remission_outcome
from evaluation.certify.bounds import lower_bound, paired_bound, paired_differences, selection_score
from evaluation.certify.core import first_choice_policy
from offline_data.behavior import fit_behaviour_model
from offline_data.dataset import load_dataset
from offline_data.generate import generate
from policies import make_baseline
from policies.behaviour_model import BehaviourModel
from policies.candidates import candidate_grid, spibb_probs
from policies.strategies import SwitchEveryTwoWeeksPolicy


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Care logged by uniformly random allowed steps: STAR*D-style care beats it by at least 10
    percentage points of remission at 26 weeks, an ordering the calibration checks at 3 seeds."""
    path = tmp_path_factory.mktemp("certify") / "log.parquet"
    generate(path, policy="random", epsilon=0.0, patients=40_000, seed=7)
    return path


class Fixed:
    """A policy that always prefers one action (uniform over allowed when it is blocked)."""

    def __init__(self, action: int) -> None:
        self.action = action
        self.name = f"always {action}"

    def action_probs(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = np.where(mask, 1.0, 0.0) / mask.sum(axis=1, keepdims=True)
        has = mask[:, self.action]
        out[has] = 0.0
        out[has, self.action] = 1.0
        return out


def _rows(n: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    obs = np.zeros((n, N_FEATURES))
    obs[:, FEATURE_INDEX["dose_level"]] = rng.integers(0, 4, n)
    obs[:, FEATURE_INDEX["weeks_on_dose"]] = rng.integers(0, 8, n)
    obs[:, FEATURE_INDEX["weeks_on_step"]] = rng.integers(0, 8, n)
    obs[:, FEATURE_INDEX["digital_access"]] = 1
    return obs, action_mask(obs)


# ----------------------------------------------------------------------------- candidates


def test_mixture_spans_current_care_to_the_trained_policy_and_never_a_blocked_action():
    obs, mask = _rows()
    trained, current = Fixed(1), make_baseline("random", 0.0)
    for w in (0.0, 0.3, 1.0):
        probs = CandidatePolicy(trained, current, Candidate("mixture", weight=w)).action_probs(obs, mask)
        assert np.allclose(probs.sum(axis=1), 1.0) and (probs[~mask] == 0).all()
        expected = w * trained.action_probs(obs, mask) + (1 - w) * current.action_probs(obs, mask)
        assert np.allclose(probs, expected)


def test_spibb_keeps_current_care_where_an_action_is_rare():
    current = np.array([[0.6, 0.3, 0.04, 0.06, 0, 0, 0, 0, 0, 0, 0]], dtype=float)
    trained = np.array([[0.0, 0.0, 1.0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=float)  # wants the rare action
    mask = current > 0
    probs = spibb_probs(trained, current, mask, threshold=0.05)
    # the rare action (0.04 < 0.05) keeps its 0.04; the trained policy has no mass on the
    # supported actions, so the rest follows current care there
    assert probs[0, 2] == pytest.approx(0.04)
    assert probs.sum() == pytest.approx(1.0)
    trained2 = np.array([[0.0, 1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=float)
    probs2 = spibb_probs(trained2, current, mask, threshold=0.05)
    assert probs2[0, 2] == pytest.approx(0.04) and probs2[0, 1] == pytest.approx(0.96)


def test_prefix_follows_the_trained_policy_only_in_its_first_weeks():
    obs, mask = _rows()
    obs[:, FEATURE_INDEX["weeks_in_care"]] = np.arange(len(obs)) % 6
    trained, current = Fixed(1), make_baseline("random", 0.0)
    probs = CandidatePolicy(trained, current, Candidate("prefix", weeks=2)).action_probs(obs, mask)
    early = obs[:, FEATURE_INDEX["weeks_in_care"]] < 2
    assert np.allclose(probs[early], trained.action_probs(obs, mask)[early])
    assert np.allclose(probs[~early], current.action_probs(obs, mask)[~early])
    assert (probs[~mask] == 0).all() and early.any() and (~early).any()
    assert "first 2 weeks" in Candidate("prefix", weeks=2).describe()
    # taking the first-ranked step: the trained policy's top step in those weeks, current care after
    soft = make_baseline("stard", 0.3)
    first = first_choice_policy(CandidatePolicy(soft, current, Candidate("prefix", weeks=2))).action_probs(obs, mask)
    top = soft.action_probs(obs, mask).argmax(axis=1)
    assert (first[early].argmax(axis=1) == top[early]).all() and (first[early].max(axis=1) == 1).all()
    assert np.allclose(first[~early], current.action_probs(obs, mask)[~early])
    with pytest.raises(ValueError, match="at least 1 week"):
        Candidate("prefix", weeks=0)
    with pytest.raises(ValueError, match="whole number"):
        Candidate.from_dict({"family": "prefix", "weeks": 1.5})


def test_first_choice_is_all_mass_on_the_most_probable_allowed_step():
    obs, mask = _rows()
    probs = FirstChoicePolicy(make_baseline("stard", 0.2)).action_probs(obs, mask)
    assert ((probs == 0) | (probs == 1)).all() and np.allclose(probs.sum(axis=1), 1)
    assert (probs[~mask] == 0).all()


def test_candidate_round_trips_and_refuses_bad_values():
    c = Candidate("spibb", threshold=0.05, truncation=20.0)
    assert Candidate.from_dict(c.as_dict()) == c
    with pytest.raises(ValueError, match="family"):
        Candidate("greedy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight"):
        Candidate("mixture", weight=1.5)
    with pytest.raises(ValueError, match="unknown key"):
        Candidate.from_dict({"family": "mixture", "colour": 1})
    assert len(candidate_grid((0.1, 0.5), (0.05,), (5.0, 20.0))) == 6
    prefix = Candidate("prefix", weeks=4, estimator="dr")
    assert Candidate.from_dict(prefix.as_dict()) == prefix
    grid = candidate_grid((0.1,), (), (20.0,), doubly_robust=True, prefix_weeks=(1, 2))
    assert [(c.family, c.weeks, c.estimator) for c in grid] == [
        ("mixture", 0, "is"), ("prefix", 1, "is"), ("prefix", 2, "is"),
        ("mixture", 0, "dr"), ("prefix", 1, "dr"), ("prefix", 2, "dr")]


def test_behaviour_model_survives_its_tensors(log_path: Path):
    f = load_dataset(log_path).frame
    model, report = fit_behaviour_model(f.obs, f.allowed, f.action, max_fit_rows=20_000, seed=0)
    again = BehaviourModel.from_tensors({k: np.array(v) for k, v in model.to_tensors().items()})
    rows = slice(0, 500)
    assert np.array_equal(model.action_probs(f.obs[rows], f.allowed[rows]),
                          again.action_probs(f.obs[rows], f.allowed[rows]))
    # the log is uniform over allowed steps, which the masked model represents exactly
    assert report.held_out_log_loss is not None and report.held_out_log_loss < 1.01 * report.uniform_log_loss
    broken = model.to_tensors()
    broken["bias"] = np.zeros(3)
    with pytest.raises(ValueError, match="bias"):
        BehaviourModel.from_tensors(broken)


# ----------------------------------------------------------------------------- bounds


def test_truncation_can_only_lower_the_paired_difference():
    rng = np.random.default_rng(0)
    rho = rng.lognormal(0, 1.5, 1000)
    y = rng.random(1000) < 0.4
    full = paired_differences(rho, y, 0.0, np.inf)
    capped = paired_differences(rho, y, 0.0, 5.0)
    assert (capped <= full + 1e-12).all() and capped.mean() < full.mean()


def test_selection_prefers_the_candidate_likelier_to_pass():
    rng = np.random.default_rng(3)
    sure = rng.normal(0.01, 0.1, 5000)  # small, tight improvement
    noisy = rng.normal(0.03, 2.0, 5000)  # three times larger, twenty times noisier
    s_sure, s_noisy = selection_score(sure, 0.95, 5000), selection_score(noisy, 0.95, 5000)
    assert s_sure.pass_probability > 0.9 > 0.5 > s_noisy.pass_probability
    # the predicted bound is the safety test's bound if the test part behaved like this one
    assert s_sure.predicted_bound == pytest.approx(sure.mean() - 1.645 * sure.std(ddof=1) / np.sqrt(5000), abs=1e-4)
    assert selection_score(np.zeros(100), 0.95, 100).pass_probability == 0.0  # current care itself never passes


@pytest.mark.parametrize("method", ["t", "bernstein"])
def test_lower_bound_holds_at_its_confidence(method: str):
    """A one-step problem with a known improvement: the 95 % bound lies below the truth in at
    least 90 % of 300 repetitions (the truth is computed exactly, not simulated)."""
    rng = np.random.default_rng(11)
    pb = np.array([0.5, 0.3, 0.2])  # behaviour over 3 actions
    pe = np.array([0.2, 0.3, 0.5])  # candidate
    success = np.array([0.2, 0.3, 0.5])  # P(remission | action)
    truth = float(pe @ success - pb @ success)
    below = 0
    for _ in range(300):
        a = rng.choice(3, size=800, p=pb)
        y = (rng.random(800) < success[a]).astype(float)
        b = paired_bound(pe[a] / pb[a], y, floor=0.0, ceiling=1.0, truncation=10.0, method=method, confidence=0.95)
        below += b.lower_bound <= truth
    assert below / 300 >= 0.90
    with pytest.raises(ValueError, match="method"):
        lower_bound(np.zeros(5), "hoeffding-ish", 0.95, (-1.0, 1.0))


# ----------------------------------------------------------------------------- the protocol


def test_remission_needs_care_to_the_end_and_a_last_phq9_below_5(log_path: Path):
    episodes = load_dataset(log_path).episodes()
    y = remission_outcome(episodes)
    last = episodes.obs[np.arange(len(y)), episodes.lengths - 1, FEATURE_INDEX["phq9"]]
    left = (episodes.terminated & episodes.valid).any(axis=1)
    assert y.dtype == np.float64 and set(np.unique(y)) <= {0.0, 1.0}
    assert (y[left] == 0).all() and (y[last >= 5] == 0).all()
    assert (y[~left & (last < 5)] == 1).all()


def test_certifies_what_beats_care_and_refuses_what_does_not(log_path: Path):
    data = load_dataset(log_path)
    current = make_baseline("random", 0.0)  # the logging policy, known here
    good = certify(make_baseline("stard", 0.0), data, current, CertifyConfig(seed=0)).certificate
    assert good.certified, good.reasons
    assert 0 < good.lower_bound < good.improvement
    assert good.episodes["candidate"] + good.episodes["safety"] == data.n_episodes
    assert good.id.startswith("cert-") and "fixed-sequence" in good.method and "Certified" in good.summary()
    assert {g["feature"] for g in good.subgroups} == {"sex", "age_band", "digital_access"}
    bad = certify(SwitchEveryTwoWeeksPolicy(), data, current, CertifyConfig(seed=0)).certificate
    assert not bad.certified and bad.reasons and "keep current care" in bad.summary()
    # fixed sequence: the first-choice claim is tested only after the candidate's own test passed
    assert not bad.first_choice["certified"] and bad.first_choice["statement"].startswith("not tested")
    # heavy weights leave too few effective episodes for a t bound: such candidates are not chosen
    ineligible = [r for r in good.selection if not r["eligible"]]
    assert ineligible and all(r["family"] != good.candidate["family"] or r["weight"] != good.candidate["weight"]
                              or r["estimator"] != good.candidate["estimator"] for r in ineligible)
    assert good.candidate["ess"] >= 100


def test_current_care_itself_never_certifies_not_even_by_doubly_robust_noise(log_path: Path):
    # every candidate of current care is current care: the improvement is exactly 0 for every
    # estimator (a doubly robust difference's control terms have mean 0 but would not be 0)
    data = load_dataset(log_path)
    current = make_baseline("random", 0.0)
    cert = certify(current, data, current, CertifyConfig(seed=1)).certificate
    assert not cert.certified
    assert all(r["pass_probability"] == 0.0 for r in cert.selection)
    assert abs(cert.lower_bound) < 1e-3 and abs(cert.improvement) < 1e-3


def test_a_critical_vignette_failure_blocks_the_certificate(log_path: Path):
    data = load_dataset(log_path)
    cert = certify(make_baseline("stard", 0.0), data, make_baseline("random", 0.0), CertifyConfig(seed=0),
                   critical_vignettes=lambda policy: {"critical_failures": ["item9-high"]}).certificate
    assert not cert.certified and any("item9-high" in r for r in cert.reasons)
    assert not any(r["eligible"] for r in cert.selection)  # every candidate failed: none was eligible
    assert any("no candidate was eligible" in r for r in cert.reasons)


def test_a_candidate_failing_a_critical_vignette_is_not_chosen(log_path: Path):
    data = load_dataset(log_path)

    def mixtures_fail(policy: CandidatePolicy) -> dict[str, list[str]]:
        return {"critical_failures": ["item9-high"] if policy.candidate.family == "mixture" else []}

    cert = certify(make_baseline("stard", 0.0), data, make_baseline("random", 0.0),
                   CertifyConfig(seed=0, weights=(0.05, 0.1), thresholds=(0.1,), prefix_weeks=(1,)),
                   critical_vignettes=mixtures_fail).certificate
    assert cert.candidate["family"] != "mixture"
    assert {r["eligible"] for r in cert.selection if r["family"] == "mixture"} == {False}


def test_bad_input_is_named(log_path: Path):
    data = load_dataset(log_path)
    with pytest.raises(ValueError, match="confidence"):
        CertifyConfig(confidence=1.0)
    with pytest.raises(ValueError, match="split"):
        CertifyConfig(split=0.0)
    with pytest.raises(ValueError, match="fewer than 100"):
        certify(Fixed(0), data, make_baseline("random", 0.0), CertifyConfig(split=0.002))
    assert N_ACTIONS == 11  # the fixture policies above index actions of spec version 2


# ----------------------------------------------------------------------------- the command and the bundle


def _bundle(folder: Path) -> Path:
    import torch

    from policies.bundle import ActionSelection, BundleManifest, save_bundle
    from policies.networks import NetworkSpec, PolicyNetwork

    torch.manual_seed(0)
    net = PolicyNetwork(NetworkSpec(N_FEATURES, N_ACTIONS, hidden=(16,), output="q_values"))
    save_bundle(folder, net, BundleManifest(algorithm="cql", name="tiny", network=net.spec,
                                            selection=ActionSelection("greedy")))
    return folder


def test_certify_writes_a_new_bundle_that_serves_the_certified_candidate(log_path: Path, tmp_path: Path, capsys):
    from carepath.cli import main
    from policies import load

    source = _bundle(tmp_path / "policy")
    before = sorted(p.name for p in source.iterdir())
    out = tmp_path / "certified"
    assert main(["certify", "--policy", str(source), "--data", str(log_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "certificate cert-" in printed and "first choice only" in printed
    assert sorted(p.name for p in source.iterdir()) == before  # the input bundle is untouched
    policy = load(out)
    cert = policy.certificate
    assert cert is not None and cert["id"].startswith("cert-") and cert["confidence"] == 0.95
    assert cert["behaviour_model"] == {"kind": "baseline", "name": "random", "epsilon": 0.0}
    for key in ("certified", "method", "estimator", "lower_bound", "improvement", "reward_lower_bound",
                "behaviour_value", "episodes", "candidate", "data_sha256", "vignettes"):
        assert key in cert, key
    # a certified bundle serves its candidate (the network mixed with current care); an uncertified
    # one serves its network, under a banner
    obs, mask = _rows()
    served = policy.action_probs(obs, mask)
    network = policy.network_probs(obs, mask)
    if cert["certified"]:
        assert policy.served is not None
        expected = policy.served.combine(network, make_baseline("random", 0.0).action_probs(obs, mask), mask,
                                            obs)
    else:
        assert policy.served is None
        expected = network
    assert np.allclose(served, expected) and (served[~mask] == 0).all()
    # --show prints the stored certificate without data; a bundle without one says so (status 1)
    assert main(["certify", "--show", "--policy", str(out)]) == 0
    assert f"certificate {cert['id']}" in capsys.readouterr().out
    assert main(["certify", "--show", "--policy", str(source)]) == 1
    assert "no certificate" in capsys.readouterr().out
    assert main(["certify", "--policy", str(source)]) == 2
    assert "--data and --out" in capsys.readouterr().err


def test_certify_refuses_the_patients_that_trained_the_policy(log_path: Path, tmp_path: Path, capsys):
    import torch

    from carepath.cli import main
    from policies.bundle import TRAINING_PATIENTS_FILE, patient_hashes, update_bundle

    source = _bundle(tmp_path / "policy")
    ids = load_dataset(log_path).patient_ids()[:500]
    update_bundle(source, extra_tensors={TRAINING_PATIENTS_FILE: {"hash": torch.as_tensor(patient_hashes(ids))}})
    out = tmp_path / "certified"
    assert main(["certify", "--policy", str(source), "--data", str(log_path), "--out", str(out)]) == 2
    assert "500 of the 40,000 patients" in capsys.readouterr().err and not out.exists()
    assert main(["certify", "--policy", str(source), "--data", str(log_path), "--out", str(out),
                 "--exclude-training-patients", "--no-vignettes"]) == 0
    assert "dropped             500 patients" in capsys.readouterr().out
    # an existing --out is not replaced without --overwrite, and nothing is written on a bad option
    assert main(["certify", "--policy", str(source), "--data", str(log_path), "--out", str(out)]) == 2
    assert main(["certify", "--policy", str(source), "--data", str(log_path), "--out", str(tmp_path / "x"),
                 "--confidence", "1.5"]) == 2
    assert "confidence" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- doubly robust


def _one_step_episodes(actions: np.ndarray, pb: np.ndarray):
    from offline_data.dataset import Episodes

    n = len(actions)
    return Episodes(obs=np.zeros((n, 1, N_FEATURES), np.float32), action=actions[:, None].astype(np.int64),
                    reward=np.zeros((n, 1), np.float32), mask=np.ones((n, 1, 3), bool),
                    behavior_prob=pb[actions][:, None].astype(np.float32), terminated=np.zeros((n, 1), bool),
                    truncated=np.ones((n, 1), bool), t=np.zeros((n, 1), np.int64), valid=np.ones((n, 1), bool),
                    lengths=np.ones(n, np.int64), patient_id=np.arange(n).astype(object),
                    episode_id=np.zeros(n, np.int64))


def test_doubly_robust_difference_is_unbiased_and_a_good_model_shrinks_its_spread():
    from evaluation.certify.doubly_robust import dr_differences

    rng = np.random.default_rng(3)
    pb, pe, success = np.array([0.6, 0.3, 0.1]), np.array([0.1, 0.3, 0.6]), np.array([0.2, 0.3, 0.6])
    truth = float(pe @ success - pb @ success)
    n = 200_000
    a = rng.choice(3, size=n, p=pb)
    y = (rng.random(n) < success[a]).astype(float)
    episodes = _one_step_episodes(a, pb)
    probs = np.broadcast_to(pe, (n, 1, 3)).copy()
    exact = np.broadcast_to(success, (n, 1, 3)).copy()
    wrong = np.full((n, 1, 3), 0.9)  # a poor model: still unbiased, only noisier
    d_exact = dr_differences(probs, episodes, y, exact)
    d_wrong = dr_differences(probs, episodes, y, wrong)
    d_is = paired_differences(pe[a] / pb[a], y, 0.0, np.inf)
    for d in (d_exact, d_wrong, d_is):
        assert abs(d.mean() - truth) < 4 * d.std() / np.sqrt(n)
    assert d_exact.std() < 0.8 * d_is.std()
