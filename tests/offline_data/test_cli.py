import json

import pytest

from carepath.cli import main
from offline_data.config import CONFIGS, load_config
from offline_data.dataset import load_dataset
from offline_data.io import read_metadata
from offline_data.pseudonymise import KEY_ENV_VAR
from tests.offline_data.conftest import KEY, raw_log, simulated_frame


@pytest.fixture
def key_file(tmp_path):
    folder = tmp_path / "secrets"
    folder.mkdir()
    path = folder / "pseudonym.key"
    path.write_bytes(KEY)
    return path


def test_data_without_action_prints_help(capsys):
    assert main(["data"]) == 2
    out = capsys.readouterr().out
    assert "generate" in out and "import" in out and "describe" in out


def test_generate_with_config_and_overrides(tmp_path, capsys):
    out = tmp_path / "gen" / "stard.parquet"
    code = main(["data", "generate", "--config", "stard", "--patients", "40", "--horizon", "6", "--missingness",
                 "0.5", "--out", str(out), "--quiet"])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta["behavior_policy"] == {"name": "stard", "epsilon": 0.1}  # from configs/data/stard.yaml
    assert meta["env_settings"]["horizon"] == 6 and meta["env_settings"]["missingness"] == 0.5
    assert meta["generation"]["patients"] == 40 and meta["generation"]["chunk_size"] == 25000
    assert load_dataset(out).n_patients == 40


def test_generate_with_an_env_config(tmp_path):
    out = tmp_path / "stress.parquet"
    assert main(["data", "generate", "--env", "stress", "--horizon", "4", "--patients", "10", "--out", str(out),
                 "--quiet"]) == 0
    env = read_metadata(out)["env_settings"]
    # configs/env/stress.yaml over configs/env/default.yaml, then the flag
    assert env["missingness"] == 1.05 and env["observation_noise"] == 1.6 and env["wearables"] is False
    assert env["horizon"] == 4


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.joinpath("data").glob("*.yaml")))
def test_every_data_config_loads(name):
    config = load_config(name)
    assert config.policy == name and config.patients > 0 and config.out is not None
    assert config.settings().horizon == 26
    assert abs(sum(config.split.values()) - 1.0) < 1e-9


def test_generate_flags_alone(tmp_path):
    out = tmp_path / "r.csv"
    assert main(["data", "generate", "--policy", "random", "--epsilon", "1", "--patients", "7", "--seed", "2",
                 "--horizon", "3", "--observation-noise", "0", "--heterogeneity", "0.5", "--no-true-phq9",
                 "--out", str(out), "--quiet"]) == 0
    data = load_dataset(out)
    assert data.n_patients == 7 and data.frame.true_phq9 is None


def test_generate_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", "generate", "--policy", "magic", "--out", str(tmp_path / "x.parquet")])
    assert info.value.code == 2
    assert main(["data", "generate", "--config", "no_such_config", "--out", str(tmp_path / "x.parquet")]) == 2
    assert "data config 'no_such_config' not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: stard\nepsilon: 0.1\nweird_key: 3\n")
    assert main(["data", "generate", "--config", str(bad), "--out", str(tmp_path / "x.parquet")]) == 2
    assert "unknown setting 'weird_key'" in capsys.readouterr().err
    assert main(["data", "generate", "--patients", "3", "--quiet"]) == 2
    assert "no output file" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()


def test_import_exit_codes(tmp_path, key_file, capsys, monkeypatch):
    monkeypatch.delenv(KEY_ENV_VAR, raising=False)
    frame = simulated_frame(patients=15, horizon=4)
    raw = tmp_path / "raw.csv"
    raw_log(frame).to_csv(raw, index=False)
    out = tmp_path / "clean" / "clean.parquet"

    assert main(["data", "import", str(raw), "--out", str(out)]) == 2  # no key
    assert "no pseudonymisation key" in capsys.readouterr().err and not out.exists()

    assert main(["data", "import", str(raw), "--out", str(out), "--key-file", str(key_file), "--k", "1"]) == 0
    printed = capsys.readouterr().out
    assert "15 pseudonymised patients" in printed and "dropped columns: Name, email, Phone, date_of_birth" in printed

    monkeypatch.setenv(KEY_ENV_VAR, KEY.decode())
    out_env = tmp_path / "clean" / "from_env.parquet"
    assert main(["data", "import", str(raw), "--out", str(out_env), "--k", "1"]) == 0
    assert set(load_dataset(out_env).patient_ids()) == set(load_dataset(out).patient_ids())

    bad = raw_log(frame)
    bad.loc[2, "phq9"] = 31
    bad_path = tmp_path / "bad.csv"
    bad.to_csv(bad_path, index=False)
    out_bad = tmp_path / "clean" / "bad.parquet"
    assert main(["data", "import", str(bad_path), "--out", str(out_bad), "--key-file", str(key_file)]) == 1
    err = capsys.readouterr().err
    assert f"{bad_path}: 1 problem:" in err and "row 3, column phq9: expected a number in [0, 27], got '31.0'" in err
    assert not out_bad.exists()

    beside = tmp_path / "clean" / "key.txt"
    beside.write_bytes(KEY)
    assert main(["data", "import", str(raw), "--out", str(tmp_path / "clean" / "x.parquet"), "--key-file",
                 str(beside)]) == 2
    assert "apart from the data" in capsys.readouterr().err


def test_describe_exit_codes(tmp_path, capsys):
    path = tmp_path / "d.parquet"
    assert main(["data", "generate", "--patients", "25", "--horizon", "5", "--out", str(path), "--quiet"]) == 0
    capsys.readouterr()
    summary = tmp_path / "summary.json"
    assert main(["data", "describe", str(path), "--json", str(summary)]) == 0
    out = capsys.readouterr().out
    assert "patients" in out and "25" in out and "continue" in out
    assert json.loads(summary.read_text())["patients"] == 25

    assert main(["data", "describe", str(tmp_path / "missing.parquet")]) == 2
    assert "no such file" in capsys.readouterr().err
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    assert main(["data", "describe", str(garbage)]) == 1
    assert f"{garbage}: not a readable Parquet file" in capsys.readouterr().err
