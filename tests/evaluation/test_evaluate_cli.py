"""``carepath evaluate``: a report folder from baselines by name and a bundle folder; bad inputs exit 1
with a message naming the bad thing and leave no report folder behind."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from carepath.cli import build_parser, main
from envs.spec import N_ACTIONS, N_FEATURES
from offline_data.generate import generate
from policies.bundle import ActionSelection, BundleManifest, save_bundle
from policies.networks import NetworkSpec, PolicyNetwork


def logged_data(tmp_path_factory, patients=300):
    """One small STAR*D log (epsilon 0.3) per test session, shared by the evaluation test modules."""
    path = tmp_path_factory.getbasetemp() / f"evaluate_stard_eps0.3_{patients}.parquet"
    if not path.exists():
        generate(path, policy="stard", epsilon=0.3, patients=patients, seed=0)
    return path


def make_bundle(folder):
    torch.manual_seed(0)
    net = PolicyNetwork(NetworkSpec(N_FEATURES, N_ACTIONS, hidden=(16,), output="q_values"))
    manifest = BundleManifest(algorithm="cql", name="cli-test-policy", network=net.spec,
                              selection=ActionSelection("softmax", temperature=1.0, epsilon=0.2))
    return save_bundle(folder, net, manifest)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return logged_data(tmp_path_factory)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundles") / "policy")


@pytest.fixture(scope="module")
def full_run(data, bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "reports" / "cmp"
    rc = main(["evaluate", "--data", str(data), "--policy", "stard:0.1", "--policy", "random", "--policy",
               str(bundle), "--estimators", "all", "--n-boot", "100", "--truth-patients", "100",
               "--fqe-iterations", "26", "--fqe-updates", "3", "--out", str(out), "--quiet"])
    return rc, out


def test_evaluate_writes_a_full_report(full_run):
    rc, out = full_run
    assert rc == 0
    payload = json.loads((out / "report.json").read_text())
    assert [p["label"] for p in payload["policies"]] == ["stard:0.1", "random", "cli-test-policy"]
    assert payload["estimators"] == ["is", "wis", "pdis", "wpdis", "dr", "wdr", "fqe"]
    assert payload["level"] == 0.95 and payload["interval"] == "bootstrap" and payload["n_boot"] == 100
    assert all(p["truth"]["patients"] == 100 for p in payload["policies"])
    assert all(p["fairness"]["parity"]["digital"]["no_access"] == 0.0 for p in payload["policies"])
    for name in payload["files"]:
        assert (out / name).exists(), name
    md = (out / "report.md").read_text()
    for text in ("Decision support", "## Estimates", "## Simulator ground truth", "## Fairness", "cli-test-policy",
                 "plots/estimates.png", "plots/subgroups.png", "plots/care_classes.png"):
        assert text in md, text
    assert "<table>" in (out / "report.html").read_text()
    acc = EventAccumulator(str(out / "tensorboard" / "stard_0.1"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"ope/wdr/value", "ope/wdr/lo", "ope/wdr/hi", "ope/fqe/value", "eval/value"} <= tags
    stard = payload["policies"][0]["estimates"]["wis"]
    assert acc.Scalars("ope/wis/value")[0].value == pytest.approx(stard["value"], rel=1e-6)
    assert acc.Scalars("ope/wis/hi")[0].value == pytest.approx(stard["high"], rel=1e-6)
    assert (out / "tensorboard" / "cli-test-policy").is_dir()


def test_no_fqe_rerun_replaces_the_report_and_prints_a_summary(data, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["evaluate", "--data", str(data), "--policy", "stard:0.1", "--policy", "usual_care:0.2", "--no-fqe",
            "--n-boot", "50", "--interval", "t", "--level", "0.9", "--out", str(out)]
    assert main(args) == 0
    assert main([*args[:-2], "--seed", "1", "--out", str(out)]) == 0  # an earlier report is replaced
    payload = json.loads((out / "report.json").read_text())
    assert payload["estimators"] == ["wis", "wpdis"] and payload["seed"] == 1 and payload["level"] == 0.9
    assert set(payload["policies"][1]["estimates"]) == {"wis", "wpdis"}
    assert payload["policies"][0]["estimates"]["wis"]["interval"] == "t"
    printed = capsys.readouterr().out
    assert "decision support" in printed and "usual_care:0.2" in printed and "90%" in printed
    assert [p.name for p in tmp_path.iterdir()] == ["cmp"]


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "{tmp}/missing.parquet"], "missing.parquet: no such file"),
    (["--policy", "nosuch"], "--policy nosuch: unknown policy"),
    (["--policy", "stard:2"], "epsilon must be in [0, 1]"),
    (["--policy", "stard:abc"], "epsilon 'abc' is not a number"),
    (["--policy", "{tmp}/empty_bundle"], "the bundle does not load"),
    (["--policy", "{tmp}/tampered"], "does not match the recorded"),
    (["--estimators", "wis,foo"], "'foo'"),
    (["--estimators", "wis,dr", "--no-fqe"], "dr need FQE"),
    (["--estimators", "fqe", "--fqe-refits", "1"], "fqe_refits must be 0 (no refits) or an integer of at least 2"),
    (["--data", "{tmp}/garbage.parquet"], "not a readable Parquet file"),
])
def test_bad_inputs_exit_1_and_leave_no_report(data, tmp_path, capsys, args, message):
    (tmp_path / "empty_bundle").mkdir()
    tampered = make_bundle(tmp_path / "tampered")
    (tampered / "weights.safetensors").write_bytes((tampered / "weights.safetensors").read_bytes() + b"x")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 this is not parquet")
    out = tmp_path / "reports" / "cmp"
    base = {"--data": str(data), "--policy": "stard:0.1", "--estimators": "wis", "--out": str(out)}
    given = [a.replace("{tmp}", str(tmp_path)) for a in args]
    for key, value in base.items():
        if key not in given:
            given += [key, value]
    assert main(["evaluate", *given, "--n-boot", "20", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("carepath evaluate: error: ") and message in err
    assert not (tmp_path / "reports").exists()


def test_a_folder_that_is_not_a_report_is_left_alone(data, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("keep me")
    rc = main(["evaluate", "--data", str(data), "--policy", "stard", "--estimators", "wis", "--out", str(out),
               "--quiet"])
    assert rc == 1 and "refusing to replace" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["todo.txt"]


def test_evaluate_is_registered():
    assert "evaluate" in build_parser().format_help()


def test_cli_choices_match_compare():
    from evaluation import cli
    from evaluation.compare import ALL_ESTIMATORS, COMPARE_INTERVALS, DEFAULT_ESTIMATORS

    assert cli.EVALUATE_ESTIMATORS == ALL_ESTIMATORS
    assert cli.EVALUATE_DEFAULT_ESTIMATORS == DEFAULT_ESTIMATORS
    assert cli.EVALUATE_INTERVALS == COMPARE_INTERVALS
