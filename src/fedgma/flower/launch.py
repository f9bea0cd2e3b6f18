"""``fedgma run --engine flower``: one run of fedgma's Flower app on Flower's simulation runtime (Ray).

:func:`run_flower` starts a SuperLink in simulation mode on a free loopback port
(:class:`LocalSuperLink`), ``flwr run``s a one-run Flower app (:func:`flower_app_files`: fedgma's
``fedgma.flower.app:server_app`` and ``fedgma.flower.app:client_app``, the experiment as its run
config) on it, follows the run folder for the progress bar, and ends the SuperLink and everything it
started when the run is over.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import tomli_w

from fedgma.checkpoint import FAILED, failure_line, lock_folder, read_json
from fedgma.config import Config, ConfigError, config_to_toml
from fedgma.data.datasets import DatasetError
from fedgma.flower.run_config import EXPERIMENT_KEY, SecureSettings, check_secure_supported, check_supported
from fedgma.flower.server_app import start_run_folder
from fedgma.progress import ProgressBar
from fedgma.round import BadUpdateError

__all__ = ["LocalSuperLink", "flower_app_files", "run_flower", "serverapp_error"]

# the ServerApp's errors that the simulator raises too, by the name its traceback's last line gives them
_SIMULATOR_ERRORS: dict[str, type[Exception]] = {
    "fedgma.data.datasets.DatasetError": DatasetError,  # bad input
    "fedgma.config.ConfigError": ConfigError,
    "FloatingPointError": FloatingPointError,  # divergence: the model would become non-finite
    "fedgma.round.BadUpdateError": BadUpdateError,  # a bad client update under server.on_bad_update = 'fail'
    "fedgma.flower.mixin.InvalidReplyError": BadUpdateError,  # the same, found in a Flower reply
}


def serverapp_error(run_dir: Path) -> Exception:
    """The error to raise for a ServerApp that failed and wrote its traceback to ``run_dir/error.txt``.

    An error the simulator raises too (bad data or config, divergence, a bad client update under
    ``server.on_bad_update = 'fail'``) comes back as the simulator's type with the same message, so
    ``fedgma run`` prints it in one line and a sweep records a divergence as such; anything else is a
    RuntimeError naming the last line. Both name the file.
    """
    error_file = run_dir / FAILED
    last = failure_line(run_dir) or "no message"
    kind, _, message = last.partition(": ")
    if kind in _SIMULATOR_ERRORS:
        return _SIMULATOR_ERRORS[kind](f"{message} (the Flower ServerApp's traceback: {error_file})")
    return RuntimeError(f"the Flower ServerApp failed: {last} (traceback in {error_file})")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def flower_app_files(config: Config, run_dir: Path, round_timeout: float = 600.0,
                     secure: SecureSettings | None = None) -> dict[str, str]:
    """The files of a one-run Flower app (its ``pyproject.toml``): fedgma's ServerApp and ClientApp, and
    the experiment as the app's run config (the resolved config as TOML under ``fedgma-config``; with
    ``secure``, ``secure-aggregation = true`` and its settings)."""
    secure_keys = {} if secure is None else {
        "secure-aggregation": True, "secure-update-bound": float(secure.update_bound),
        "secure-num-shares": secure.num_shares, "secure-reconstruction-threshold": secure.reconstruction_threshold,
    }
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedgma-run", "version": "1.0.0", "description": "one fedgma run on Flower",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "fedgma",
            "components": {"serverapp": "fedgma.flower.app:server_app", "clientapp": "fedgma.flower.app:client_app"},
            "config": {"run-dir": str(run_dir.resolve()), "round-timeout": float(round_timeout),
                       "overwrite": True, "run-dir-locked": True, EXPERIMENT_KEY: config_to_toml(config),
                       # on the simulation runtime a pull of replies is an in-memory call: pull often, so
                       # that a round ends within 10 ms of its last reply (not up to 2 s later, the backoff)
                       "pull-interval": 0.005, "max-pull-interval": 0.01, **secure_keys},
        }}},
    }
    return {"pyproject.toml": tomli_w.dumps(project)}


class LocalSuperLink:
    """A SuperLink in simulation mode on a free loopback port, for one ``flwr run``; ended on ``close``.

    Everything lives in ``root`` (its own ``FLWR_HOME`` naming the SuperLink ``fedgma``, the app,
    the SuperLink's log); the SuperLink runs in its own session and ``close`` ends its whole process
    group (SuperLink, SuperExec, the simulation process and Ray's workers), SIGTERM then SIGKILL.
    """

    NAME = "fedgma"

    def __init__(self, root: Path, env: dict[str, str] | None = None, start_timeout: float = 60.0) -> None:
        self.root = root
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "superlink.log"
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ, **(env or {}),
            "FLWR_HOME": str(self.home),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # the apps run in this environment
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # Ray's FutureWarning about num_gpus=0
            "PYTHONUNBUFFERED": "1",
        }
        self.process: subprocess.Popen[bytes] | None = None
        for _attempt in range(3):  # a free port may be taken between the probe and the bind
            self.port = _free_port()
            if self._start(start_timeout):
                break
        else:
            raise RuntimeError(f"flower-superlink did not start; see {self.log_path}:\n{self.tail()}")
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.NAME}"\n\n[superlink.{self.NAME}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def _start(self, timeout: float) -> bool:
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "flower-superlink"), "--insecure", "--simulation",
                 "--isolation", "subprocess", "--disable-runtime-dependency-installation",
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log_file, stderr=subprocess.STDOUT, env=self.env, cwd=self.root, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if f"running on http://127.0.0.1:{self.port}" in self.log_path.read_text(errors="replace"):
                return True
            time.sleep(0.1)
        self.close()
        return False

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self, grace_s: float = 10.0) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace_s)
        with contextlib.suppress(ProcessLookupError):  # the group may outlive its leader
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self.process = None


def _follow_progress(run_dir: Path, bar: Any, done: threading.Event) -> None:
    """Drive ``bar`` from the run folder's logs while the ServerApp (another process) writes them."""
    seen_rounds = seen_metrics = 0
    while True:
        finished = done.wait(0.5)
        with contextlib.suppress(OSError, ValueError):
            rounds = (run_dir / "rounds.jsonl").read_text().splitlines()
            metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
            for line in metrics[seen_metrics:]:
                record = json.loads(line)
                bar.update(int(record["round"]), record)
                seen_metrics += 1
            complete = [line for line in rounds if line.endswith("}")]
            if len(complete) > seen_rounds:
                seen_rounds = len(complete)
                bar.update(int(json.loads(complete[-1])["round"]))
        if finished:
            return


def run_flower(config: Config, run_dir: str | Path, progress: bool = True, num_cpus: int | None = None,
               client_cpus: float = 1.0, verbose: bool | None = None, overwrite: bool = False,
               round_timeout: float = 600.0, secure: bool | SecureSettings = False) -> dict[str, Any]:
    """Run ``config`` on Flower's simulation runtime (Ray), one virtual SuperNode per client; return the summary.

    The way flwr 1.41 asks for (its Python ``run_simulation`` is deprecated in favour of ``flwr run``):
    starts a SuperLink in simulation mode on a free loopback port (:class:`LocalSuperLink`), ``flwr
    run``s a one-run Flower app of fedgma's ServerApp and ClientApp (:func:`flower_app_files`) on it,
    and ends the SuperLink and everything it started when the run is over (or fails, or is
    interrupted). Writes the same run folder as :func:`fedgma.simulation.run`, with the same safety:
    the folder is locked for the run's life, a finished run of another config is refused
    (:class:`~fedgma.checkpoint.RunFolderError`) unless ``overwrite``, and the final files are written
    atomically; Flower's log (the run's log stream) is kept in ``flower.log`` in the run folder.

    ``num_cpus`` caps the CPUs Ray may use (default: all), ``client_cpus`` (whole CPUs) is what one
    ClientApp reserves. Flower's output is shown only if ``verbose`` (default: ``FEDGMA_VERBOSE=1``).
    ``secure`` (True: :class:`SecureSettings`' defaults), or the config's ``server.secure_aggregation``,
    runs the rounds under Flower's SecAgg+ (the app's ``secure-aggregation = true``,
    :func:`fedgma.flower.server_app.serve`).

    Raises:
        ConfigError: a setting the Flower engine does not run. FolderInUseError, RunFolderError: see above.
        RuntimeError: the run ended without a summary (with the end of Flower's log).
    """
    check_supported(config)
    secure = secure or config.server.secure_aggregation
    settings = SecureSettings() if secure is True else (secure or None)
    if settings is not None:
        check_secure_supported(config)
        settings.check_clients_per_round(config.server.clients_per_round)
    if client_cpus != int(client_cpus) or client_cpus < 1:
        raise ConfigError(f"client_cpus must be a whole number of CPUs ≥ 1 on Flower's simulation runtime, "
                          f"got {client_cpus}")
    if verbose is None:
        verbose = os.environ.get("FEDGMA_VERBOSE", "") == "1"
    run_dir = Path(run_dir)
    federation = {
        "num-supernodes": config.data.num_clients,
        "client-resources-num-cpus": int(client_cpus),  # whole CPUs: Flower's simulation config has an integer
        "client-resources-num-gpus": 0.0,
        "init-args-num-cpus": int(num_cpus or os.cpu_count() or 1),
        "init-args-log-to-driver": bool(verbose),
        "init-args-logging-level": "INFO" if verbose else "ERROR",
    }
    with lock_folder(run_dir, "run"):
        start_run_folder(run_dir, config, overwrite)  # before Flower starts: a refusal costs nothing
        with tempfile.TemporaryDirectory(prefix="fedgma-flower-") as tmp:
            root = Path(tmp)
            app = root / "app"
            app.mkdir()
            for name, text in flower_app_files(config, run_dir, round_timeout, settings).items():
                (app / name).write_text(text)
            superlink = LocalSuperLink(root)
            bar = ProgressBar(config.rounds, progress)
            done = threading.Event()
            follower = threading.Thread(target=_follow_progress, args=(run_dir, bar, done), daemon=True)
            follower.start()
            try:
                with open(run_dir / "flower.log", "w") as flower_log:
                    command = [str(Path(sys.executable).parent / "flwr"), "run", str(app), LocalSuperLink.NAME,
                               "--stream", "--federation-config",
                               " ".join(f"{key}={json.dumps(value)}" for key, value in federation.items())]
                    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          env=superlink.env, cwd=root, text=True, errors="replace") as stream:
                        assert stream.stdout is not None
                        for line in stream.stdout:
                            flower_log.write(line)
                            if verbose:
                                sys.stdout.write(line)
            finally:
                done.set()
                follower.join(timeout=5)
                bar.close()
                superlink.close()
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file() and failure_line(run_dir) is not None:
        raise serverapp_error(run_dir)
    if not summary_path.is_file():
        lines = (run_dir / "flower.log").read_text(errors="replace").splitlines()[-40:]
        raise RuntimeError(f"the Flower run ended without writing {summary_path}; the end of "
                           f"{run_dir / 'flower.log'}:\n" + "\n".join(lines))
    return read_json(summary_path)
