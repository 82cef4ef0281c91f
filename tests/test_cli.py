import json
import subprocess
import sys

import pytest

from carepath.cli import COMMANDS, main


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "decision support" in out
    for name in COMMANDS:
        assert name in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_subcommand_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--help"])
    assert exit_info.value.code == 0
    assert "--patients" in capsys.readouterr().out


def test_simulate_writes_json(tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert main(["simulate", "--policy", "stard", "--patients", "300", "--weeks", "8", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stard" in printed and "blocked actions chosen: 0" in printed
    rows = json.loads(out.read_text())
    assert rows[0]["policy"] == "stard" and rows[0]["patients"] == 300
    assert rows[0]["blocked_actions_chosen"] == 0
    assert not list(tmp_path.glob(".*tmp")), "no temporary file may be left behind"


def test_bad_arguments_are_refused_with_the_reason(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--patients", "0"])
    assert exit_info.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--policy", "magic"])
    assert "invalid choice: 'magic'" in capsys.readouterr().err
    assert main(["simulate", "--params", "/nonexistent/params.yaml", "--patients", "10"]) == 2
    assert "parameter file not found" in capsys.readouterr().err


def test_calibrate_small_scale_writes_json_and_plot(tmp_path):
    out, plot = tmp_path / "cal.json", tmp_path / "traj.png"
    assert main(["calibrate", "--scale", "0.05", "--json", str(out), "--plot", str(plot)]) == 0
    report = json.loads(out.read_text())
    sections = [t["section"] for t in report["targets"]]
    assert sections.count("protocol") == 17 and sections.count("strategy") >= 12
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "carepath.cli", "--version"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0 and result.stdout.startswith("carepath ")
