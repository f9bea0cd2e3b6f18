"""`fedgma run --engine flower` from the command line: quiet unless --verbose, and the run folder's safety.

The engine `flwr run`s a one-run Flower app on a SuperLink of its own (flwr 1.41's way; no deprecated
``run_simulation``), so these tests run the real command in a subprocess and read what it printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedgma.checkpoint import FolderInUseError, RunFolderError, final_files_problem, lock_folder  # noqa: E402
from fedgma.config import ConfigError, load_config  # noqa: E402
from fedgma.flower.launch import flower_app_files, run_flower  # noqa: E402
from fedgma.flower.run_config import config_from_run_config  # noqa: E402

pytestmark = pytest.mark.flower

CONFIG = """
seed = 1
rounds = 2
eval_every = 1
algorithm = "fedavg"
threads = 1

[data]
dataset = "digits"
partition = { name = "dirichlet", alpha = 1.0, min_size = 5 }
num_clients = 3

[model]
name = "mlp"

[client]
local_epochs = 1
batch_size = 32
lr = 0.05

[server]
aggregator = "gma"
clients_per_round = 3
"""

FEDGMA = str(Path(sys.executable).parent / "fedgma")


def _fedgma(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDGMA_VERBOSE": ""}
    return subprocess.run([FEDGMA, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _flower_lines(text: str) -> list[str]:
    """Lines of Flower's logger (``INFO :``, ``WARNING :``, ...) and deprecation notices in ``text``."""
    return [line for line in text.splitlines()
            if any(mark in line for mark in ("INFO ", "WARNING ", "DEPRECATED", "FutureWarning", "ClientAppActor"))]


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(CONFIG)
    return path


def test_default_run_is_quiet_verbose_shows_flower_and_another_config_is_refused(config_path, tmp_path):
    out = tmp_path / "run"
    quiet = _fedgma("run", str(config_path), "--engine", "flower", "--quiet", "--out", str(out))
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    printed = quiet.stdout + quiet.stderr
    assert _flower_lines(printed) == [], printed  # no Flower INFO line, no deprecation warning
    assert all(line.startswith(str(out)) for line in printed.strip().splitlines()), printed  # fedgma's lines only
    assert "final test accuracy" in quiet.stdout
    log = (out / "flower.log").read_text()
    assert "INFO" in log and "DEPRECATED" not in log  # Flower's log is kept in the run folder, and is clean
    assert final_files_problem(out) is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "flower" and summary["status"] == "finished"
    assert not list(out.glob(".*.tmp"))

    # a finished run of another config: refused in one line before Flower starts, nothing touched
    before = (out / "summary.json").read_bytes()
    refused = _fedgma("run", str(config_path), "--engine", "flower", "--quiet", "--out", str(out),
                      "--set", "client.lr=0.1")
    assert refused.returncode == 2
    assert "holds a finished run of another config" in refused.stderr and "--overwrite" in refused.stderr
    assert (out / "summary.json").read_bytes() == before

    # --overwrite replaces it; --verbose shows Flower's log
    verbose = _fedgma("run", str(config_path), "--engine", "flower", "--quiet", "--out", str(out),
                      "--set", "client.lr=0.1", "--overwrite", "--verbose")
    assert verbose.returncode == 0, verbose.stdout + verbose.stderr
    assert any("INFO" in line for line in _flower_lines(verbose.stdout)), verbose.stdout
    assert "DEPRECATED" not in verbose.stdout + verbose.stderr
    assert "lr = 0.1" in (out / "config.toml").read_text()
    assert final_files_problem(out) is None


def test_a_locked_run_folder_is_refused_at_once(config_path, tmp_path):
    out = tmp_path / "busy"
    config = load_config(config_path, ["engine=flower"])
    with lock_folder(out, "run"), pytest.raises(FolderInUseError, match="in use by another fedgma run"):
        run_flower(config, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written, no Flower started


def test_another_config_is_refused_and_whole_cpus_are_required(config_path, tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    (out / "config.toml").write_text(CONFIG.replace("lr = 0.05", "lr = 0.2"))
    (out / "summary.json").write_text('{"status": "finished"}')
    config = load_config(config_path, ["engine=flower"])
    with pytest.raises(RunFolderError, match="another config"):
        run_flower(config, out, progress=False)
    assert (out / "summary.json").read_text() == '{"status": "finished"}'
    with pytest.raises(ConfigError, match="whole number of CPUs"):
        run_flower(config, tmp_path / "halves", progress=False, client_cpus=0.5)


def test_the_one_run_app_carries_the_whole_config(config_path, tmp_path):
    import tomllib

    config = load_config(config_path, ["engine=flower", "server.aggregator=median"])
    files = flower_app_files(config, tmp_path / "run", round_timeout=30.0)
    app = tomllib.loads(files["pyproject.toml"])["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedgma.flower.app:server_app",
                                 "clientapp": "fedgma.flower.app:client_app"}
    run_config = dict(app["config"])
    again, own = config_from_run_config(run_config)
    assert again == config
    assert own["run-dir"] == str((tmp_path / "run").resolve()) and own["round-timeout"] == 30.0
    assert own["run-dir-locked"] is True and own["overwrite"] is True
    # dotted keys still override the TOML (flwr run --run-config)
    changed, _ = config_from_run_config({**run_config, "rounds": 7})
    assert changed.rounds == 7


def test_bad_data_found_by_the_serverapp_is_the_simulators_one_line_error(tmp_path):
    """The launcher checks the config, not the data: a data file with a NaN fails in the ServerApp, which
    records its traceback in the run folder (error.txt); `fedgma run` then says what is wrong in one line,
    as the simulator does for the same file, exit code 2."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 4)).astype(np.float32)
    x[5, 3] = np.nan
    np.savez(tmp_path / "bad.npz", x=x, y=rng.integers(0, 3, 60))
    config = tmp_path / "bad.toml"
    dataset = f'dataset = {{ name = "npz", path = "{tmp_path / "bad.npz"}" }}'
    config.write_text(CONFIG.replace('dataset = "digits"', dataset).replace("min_size = 5", "min_size = 2"))
    expected = f"{tmp_path / 'bad.npz'}: x record 5 has a non-finite value (nan); inputs must be finite"
    simulator = _fedgma("run", str(config), "--out", str(tmp_path / "sim"), "--quiet")
    assert (simulator.returncode, simulator.stderr.strip()) == (2, f"Error: {expected}")
    out = tmp_path / "flower"
    result = _fedgma("run", str(config), "--engine", "flower", "--out", str(out), "--quiet")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == f"Error: {expected} (the Flower ServerApp's traceback: {out / 'error.txt'})"
    assert "DatasetError" in (out / "error.txt").read_text() and not (out / "summary.json").exists()


@pytest.mark.parametrize(("last_line", "kind", "message"), [
    ("fedgma.data.datasets.DatasetError: data.csv: row 3 has 2 columns", "DatasetError",
     "data.csv: row 3 has 2 columns"),
    ("fedgma.config.ConfigError: config key 'rounds': expected > 0", "ConfigError",
     "config key 'rounds': expected > 0"),
    ("FloatingPointError: round 2: the aggregate would make the global model non-finite", "FloatingPointError",
     "round 2: the aggregate would make the global model non-finite"),
    ("fedgma.flower.mixin.InvalidReplyError: round 1: reply from node 7: train_loss must be a finite number, got nan",
     "BadUpdateError", "round 1: reply from node 7: train_loss must be a finite number, got nan"),
    ("KeyError: 'arrays'", "RuntimeError", "the Flower ServerApp failed: KeyError: 'arrays'"),
])
def test_a_serverapp_failure_comes_back_as_the_simulators_error(tmp_path, last_line, kind, message):
    """Errors the simulator raises too keep their type (one-line CLI errors; a sweep records a divergence as
    diverged), the rest are RuntimeErrors; each names the traceback's file."""
    from fedgma.flower.launch import serverapp_error

    error_file = tmp_path / "error.txt"
    error_file.write_text(f"Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n{last_line}\n\n")
    error = serverapp_error(tmp_path)
    assert type(error).__name__ == kind
    assert str(error).startswith(message) and str(error_file) in str(error)
