"""User errors at the command line: one clear line and exit code 2, never a traceback (``--debug``: traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from fedgma.cli import main
from fedgma.config import ConfigError
from fedgma.simulation import BadUpdateError

DIGITS = ["--set", "data.dataset=digits", "--set", "data.num_clients=10", "--set", "data.min_size=5",
          "--set", "server.clients_per_round=5", "--set", "rounds=2", "--set", "threads=1"]


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 0\n[server]\naggregator = "gma"\n')
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "server.agregator=mean"], "unknown config key 'server.agregator' (did you mean 'server.aggr"),
        (["--set", "faults.nans=0.2"], "unknown config key 'faults.nans' (did you mean 'faults.nan'?)"),
        (["--set", "server.on_bad_update=skip"], "config key 'server.on_bad_update': Input should be 'fail' or 'drop'"),
        (["--set", "server.aggregator=medain"], "unknown aggregator 'medain' (did you mean 'median'?)"),
        (["--set", "faults.crash=2"], "config key 'faults.crash'"),
        (["--set", "checkpoint_every=-1"], "config key 'checkpoint_every'"),
        (["--set", "rounds"], "must look like key=value"),
    ],
)
def test_bad_config_values_give_one_line_and_exit_code_2(config, args, message):
    result = invoke("run", config, *args, "--out", config.parent / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.strip().count("\n") == 0
    assert "Traceback" not in result.output


def test_missing_and_malformed_files(tmp_path):
    result = invoke("run", tmp_path / "missing.toml")
    assert result.exit_code == 2 and "does not exist" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    result = invoke("run", bad)
    assert result.exit_code == 2 and "is not valid TOML" in result.output
    unknown_section = tmp_path / "sec.toml"
    unknown_section.write_text("[sever]\nlr = 1\n")
    result = invoke("run", unknown_section)
    assert result.exit_code == 2 and "unknown config key 'sever' (did you mean 'server'?)" in result.output


def test_resume_errors(tmp_path, config):
    result = invoke("run", "--resume", tmp_path / "nowhere")
    assert result.exit_code == 2 and "has no config.toml: not a fedgma run folder" in result.output
    result = invoke("run", config, "--resume", tmp_path)
    assert result.exit_code == 2 and "--resume RUN_DIR uses the run's own config.toml" in result.output
    result = invoke("run")
    assert result.exit_code == 2 and "give a CONFIG file to run, or --resume RUN_DIR" in result.output


def test_bad_client_update_names_the_client_with_exit_code_2(config, tmp_path):
    result = invoke("run", config, *DIGITS, "--set", "faults.nan=0.2", "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 2
    assert "round 1: client" in result.output and "NaN/infinite" in result.output
    assert "server.on_bad_update = 'fail'" in result.output


def test_debug_shows_the_exception(config, tmp_path):
    result = invoke("--debug", "run", config, "--set", "server.agregator=mean")
    assert result.exit_code != 2 and isinstance(result.exception, ConfigError)
    result = invoke("--debug", "run", config, *DIGITS, "--set", "faults.nan=0.2", "--out", tmp_path / "r", "--quiet")
    assert isinstance(result.exception, BadUpdateError)


def test_a_real_process_prints_no_traceback_and_exits_2(config):
    """Through a real interpreter (CliRunner cannot show what the terminal would)."""
    command = [sys.executable, "-m", "fedgma.cli", "run", str(config), "--set", "client.lr=-1"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    assert process.stderr.strip() == (
        "Error: config key 'client.lr': Input should be greater than 0; expected a finite number in (0, 1000] (got -1)")
    process = subprocess.run([sys.executable, "-m", "fedgma.cli", "--debug", *command[3:]], capture_output=True,
                             text=True, timeout=120)
    assert process.returncode == 1 and "Traceback" in process.stderr and "ConfigError" in process.stderr
