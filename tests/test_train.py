"""train.py end to end: the smoke experiment, TensorBoard tags, bundles, resume after a kill, multiruns."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents import make_config
from policies import load

ROOT = Path(__file__).resolve().parents[1]


def run_train(tmp_path, *overrides, check=True, timeout=600):
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=smoke", "progress=false",
           f"runs_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", *overrides]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, check=False)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def run_sweep(tmp_path, *overrides, timeout=600):
    """``train.py -m`` in smoke mode; returns the process result and each job's folder (one holding metrics.json).

    The sweep subdir is Hydra's override_dirname, which here includes the absolute runs_dir and
    cache_dir overrides, so job folders are nested a few levels below ``runs/multirun``: found by glob.
    """
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=smoke", "progress=false",
           f"runs_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", *overrides]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweep_dir = tmp_path / "runs" / "multirun"
    jobs = sorted(path.parent for path in sweep_dir.rglob("metrics.json"))
    return result, sweep_dir, jobs


def check_job(job, agent):
    """A finished job folder: metrics, resolved config and a loadable bundle that agree on the seed."""
    metrics = json.loads((job / "metrics.json").read_text())
    config = (job / "config.yaml").read_text()
    seed = metrics["seed"]
    assert metrics["agent"] == agent and f"\nseed: {seed}\n" in f"\n{config}"
    assert metrics["evaluation"]["policy"]["blocked_actions_chosen"] == 0
    assert not (job / "checkpoint.pt").exists()
    policy = load(job / "policy")
    assert policy.algorithm == agent and policy.name == f"{agent}-seed{seed}"
    assert policy.manifest.config["seed"] == seed
    return metrics, policy


@pytest.mark.parametrize("agent", sorted(p.stem for p in (ROOT / "configs" / "agent").glob("*.yaml")))
def test_every_agent_config_composes_into_its_config_dataclass(agent):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"agent={agent}", "experiment=smoke"])
    assert cfg.agent.name == agent
    make_config(agent, dict(cfg.agent.params))  # raises on an unknown or bad option
    assert cfg.train_fraction < 0.1 and cfg.data.patients <= 2000


def test_smoke_run_trains_evaluates_logs_and_bundles(tmp_path):
    result = run_train(tmp_path, "agent=bcq", "seed=1", "eval.ope.fqe_refits=2")
    run = tmp_path / "runs" / "bcq" / "seed1"
    assert "bcq seed 1: remission" in result.stdout and "blocked actions 0" in result.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["evaluation"]["policy"]["blocked_actions_chosen"] == 0
    assert set(metrics["data"]["split"]) == {"train", "validation", "test"}
    policy = load(run / "policy")
    assert policy.algorithm == "bcq"
    assert policy.manifest.evaluation["simulator_ground_truth"]["policy"]["patients"] == 600
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/td_loss", "eval/remission", "eval/remission_lo", "eval/remission_hi", "eval/cost",
            "safety/blocked_actions_chosen", "safety/referral_when_item9_high", "ope/fqe/value"} <= tags
    # importance-weighted estimates are logged when the validation log identifies the policy, and
    # otherwise stated as not identifiable (a greedy smoke-run policy on a small log may be either)
    wis = metrics["off_policy_validation"]["policies"][0]["estimates"]["wis"]
    assert ({"ope/wis/value", "ope/wis/lo", "ope/wis/hi"} <= tags) == bool(wis["identifiable"])
    assert metrics["data"]["simulator"]["spec_version"] == 2 and len(metrics["data"]["simulator"]["fingerprint"]) == 64
    ope = metrics["off_policy_validation"]
    assert ope is not None and policy.manifest.evaluation["off_policy_validation"] == ope
    assert ope["fqe_interval"] == "refit" and ope["policies"][0]["estimates"]["fqe"]["interval"] == "refit"
    assert (run / "config.yaml").exists() and not (run / "checkpoint.pt").exists()
    # certified (or not) on the held-out patients, the certificate in the bundle and metrics, with the
    # simulator's truth of the policy as certified beside it; the training patients are recorded
    cert = metrics["certification"]["certificate"]
    assert policy.certificate == cert and cert["id"].startswith("cert-")
    assert cert["episodes"]["candidate"] + cert["episodes"]["safety"] == 300  # validation + test of 1,500
    assert cert["behaviour_model"] == {"kind": "baseline", "name": "stard", "epsilon": 0.1}
    assert metrics["certification"]["certified_policy_ground_truth"]["patients"] == 600
    assert {"certify/certified", "certify/lower_bound_pp", "certify/true_remission"} <= tags
    assert "training_patients.safetensors" in policy.manifest.files
    again = run_train(tmp_path, "agent=bcq", "seed=1", check=False)
    assert again.returncode != 0 and "overwrite=true" in (again.stdout + again.stderr)


def test_a_simulator_trained_policy_answers_to_every_logged_patient(tmp_path):
    # in real use logged care is all a clinic has: an online run is certified on the whole log
    # (no logged patient trained it) and prepared for serving from its validation split
    run_train(tmp_path, "agent=maskable_ppo")
    run = tmp_path / "runs" / "maskable_ppo" / "seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    cert = metrics["certification"]["certificate"]
    assert cert["episodes"]["candidate"] + cert["episodes"]["safety"] == 1500
    assert metrics["data"]["source"] == "simulator" and metrics["data"]["logged_check"]["patients"] == 1500
    policy = load(run / "policy")
    assert policy.certificate == cert and "training_patients.safetensors" not in policy.manifest.files
    assert metrics["off_policy_validation"] is not None


def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    args = ["agent=cql", "train_fraction=0.1", "checkpoint_every=100", "agent.params.hidden=[64,64]"]
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=smoke", "progress=false",
           f"runs_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", *args]
    checkpoint = tmp_path / "runs" / "cql" / "seed0" / "checkpoint.pt"
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), "training should write a checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (checkpoint.parent / "metrics.json").exists()
    result = run_train(tmp_path, *args)
    log = (checkpoint.parent / "train.log").read_text()
    assert "resumed from" in log, result.stdout
    assert (checkpoint.parent / "metrics.json").exists() and not checkpoint.exists()


def test_joblib_multirun_runs_each_job_into_its_own_folder(tmp_path):
    result, sweep_dir, jobs = run_sweep(tmp_path, "agent=bc", "seed=0,1")
    output = result.stdout + result.stderr
    assert "Joblib.Parallel" in output and "launching 2 jobs" in output
    assert [job.name.rsplit(",", 1)[-1] for job in jobs] == ["seed=0", "seed=1"]
    assert (sweep_dir / "multirun.yaml").exists()
    assert not (tmp_path / "runs" / "bc").exists(), "multirun jobs belong under the sweep dir"
    (metrics0, policy0), (metrics1, policy1) = (check_job(job, "bc") for job in jobs)
    assert (metrics0["seed"], metrics1["seed"]) == (0, 1)
    # the same cached logged data, trained into different networks
    assert metrics0["data"]["sha256"] == metrics1["data"]["sha256"]
    assert policy0.manifest.weights_sha256 != policy1.manifest.weights_sha256
    assert len(list((tmp_path / "cache").glob("*.parquet"))) == 1


def test_submitit_local_multirun_finishes_its_job(tmp_path):
    result, sweep_dir, jobs = run_sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20",
                                        "agent=bc", "seed=0")
    assert "Submitit 'local'" in result.stdout + result.stderr
    assert len(jobs) == 1 and jobs[0].name.endswith("seed=0")
    metrics, _ = check_job(jobs[0], "bc")
    assert metrics["seed"] == 0
    # submitit ran the job in its own process: its stdout and result went to the submitit folder
    logs = "".join(path.read_text() for path in (sweep_dir / ".submitit").rglob("*_log.out"))
    assert "bc seed 0: remission" in logs
    assert list((sweep_dir / ".submitit").rglob("*_result.pkl"))


def test_batched_launcher_trains_a_seed_sweep_as_one_model_and_each_member_as_its_single_run(tmp_path):
    result, _, jobs = run_sweep(tmp_path, "hydra/launcher=batched", "agent=cql", "seed=0,1")
    output = result.stdout + result.stderr
    assert "training 2 cql members as one stacked model from update 0: seeds [0, 1]" in output
    # then each member finishes as a single run, resuming with nothing left to train
    assert "Joblib.Parallel" in output
    assert [job.name.rsplit(",", 1)[-1] for job in jobs] == ["seed=0", "seed=1"]
    members = {metrics["seed"]: (metrics, policy, job) for metrics, policy, job in
               ((*check_job(job, "cql"), job) for job in jobs)}
    assert members[0][1].manifest.weights_sha256 != members[1][1].manifest.weights_sha256
    for metrics, _, job in members.values():
        # every member's own TensorBoard events, as a single run writes them
        events = EventAccumulator(str(job / "tensorboard"))
        events.Reload()
        assert {"train/td_loss", "train/cql_penalty", "eval/remission"} <= set(events.Tags()["scalars"])
        assert metrics["certification"] is not None and (job / "policy" / "bundle.json").exists()
    # member 0 against the single run of seed 0: its true remission inside the single run's interval
    run_train(tmp_path, "agent=cql", "seed=0")
    single = json.loads((tmp_path / "runs" / "cql" / "seed0" / "metrics.json").read_text())
    interval = single["evaluation"]["policy"]["remission"]
    assert interval["low"] <= members[0][0]["evaluation"]["policy"]["remission"]["value"] <= interval["high"]


def test_batched_launcher_runs_what_it_cannot_group_as_single_runs(tmp_path):
    # behaviour cloning is not Q-learning: a group of its seeds trains one by one, each a single run
    result, _, jobs = run_sweep(tmp_path, "hydra/launcher=batched", "agent=bc", "seed=0,1")
    output = result.stdout + result.stderr
    assert "train one by one: BehaviourCloning is not a Q-learning agent" in output
    assert "stacked model" not in output and len(jobs) == 2
    for job in jobs:
        check_job(job, "bc")


@pytest.mark.parametrize(("option", "message"), [("max_members=0", "max_members must be at least 1, got 0"),
                                               ("n_jobs=0", "n_jobs must be -1 (every core) or at least 1")])
def test_batched_launcher_refuses_bad_options(tmp_path, option, message):
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=smoke", "hydra/launcher=batched",
           f"hydra.launcher.{option}", f"runs_dir={tmp_path / 'runs'}", "seed=0,1"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0 and message in result.stdout + result.stderr
    assert not list((tmp_path / "runs").rglob("metrics.json"))
