"""A Flower deployment on one machine: a SuperLink and N SuperNodes on 127.0.0.1, TLS and node auth on.

For trying the deployment commands of docs/FLOWER.md on a laptop (``deploy_loopback.py`` beside
this file), and for the deployment test (``tests/flower/test_deployment.py``, which imports it from
this folder). It is an example's helper, not part of the fedgma package.

Everything is made under one directory: a CA and a server
certificate for 127.0.0.1 (:func:`write_tls_files`), one EC P-384 key pair per SuperNode in OpenSSH
format, as ``flwr supernode register`` wants them (:func:`write_node_key`), the SuperLink's database,
a Flower home (``FLWR_HOME``, with a ``config.toml`` naming the SuperLink ``loopback``) and one log
file per process. Processes are started in their own session, so :meth:`LoopbackDeployment.kill`
takes a SuperNode's SuperExec and ClientApp processes with it, and :meth:`LoopbackDeployment.close`
(also on leaving the ``with`` block) ends every process it started: SIGTERM, then SIGKILL after a
bounded grace period. Every wait is bounded and raises :class:`DeploymentError` with the log tail
of the process concerned.

Only loopback addresses are used: the certificates are for 127.0.0.1 and localhost, and every
port is picked free on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["DeploymentError", "LoopbackDeployment", "TLSFiles", "free_port", "write_node_key", "write_tls_files"]

HOST = "127.0.0.1"
SUPERLINK_NAME = "loopback"  # the SuperLink's name in the deployment's Flower config.toml


class DeploymentError(RuntimeError):
    """A process of the loopback deployment failed or did not get ready in time."""


class TLSFiles:
    """Paths of the CA certificate, the server certificate and the server key (PEM)."""

    def __init__(self, ca: Path, cert: Path, key: Path) -> None:
        self.ca, self.cert, self.key = ca, cert, key


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def write_tls_files(directory: str | Path, days: int = 1) -> TLSFiles:
    """Write a fresh CA and a server certificate it signs, for 127.0.0.1 and localhost (EC P-384, SHA-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedgma loopback CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_private(files.key, server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return files


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key created with mode 0600 (never readable by others, not even for a moment)."""
    import os

    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_node_key(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write a SuperNode's EC P-384 key pair in OpenSSH format: ``name`` (private) and ``name.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    _write_private(private, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ))
    openssh = serialization.Encoding.OpenSSH
    public.write_bytes(key.public_key().public_bytes(openssh, serialization.PublicFormat.OpenSSH))
    return private, public


class LoopbackDeployment:
    """A SuperLink with TLS and ``--enable-supernode-auth``, and SuperNodes, as processes under ``root``.

    Typical use::

        with LoopbackDeployment(tmp_dir) as dep:
            dep.start_superlink()
            for k in range(3):
                dep.register_node(f"node{k}")
                dep.start_node(f"node{k}", node_config=f"partition-id={k} num-partitions=3")
            dep.wait_for_nodes(3)
            run_id = dep.run_app("examples/flower-app", "rounds=4 data.num_clients=3")

    The flwr executables are taken from the running interpreter's environment (``bin_dir``).
    """

    def __init__(self, root: str | Path, bin_dir: str | Path | None = None, grace_s: float = 5.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.bin_dir = Path(bin_dir) if bin_dir else Path(sys.executable).parent
        self.grace_s = grace_s
        self.tls = write_tls_files(self.root / "tls")
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"
        self.home = self.root / "flwr-home"
        self.home.mkdir(exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{SUPERLINK_NAME}"\n\n[superlink.{SUPERLINK_NAME}]\n'
            f'address = "{self.address}"\nroot-certificates = "{self.tls.ca}"\n'
        )
        self.env = {
            **os.environ,
            "HOME": str(self.root),  # nothing of the user's ~/.flwr is read or written
            "FLWR_HOME": str(self.home),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # run the apps in this environment
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.keys: dict[str, tuple[Path, Path]] = {}

    # -- processes ---------------------------------------------------------------------------

    def _executable(self, name: str) -> str:
        path = self.bin_dir / name
        if not path.is_file():
            raise DeploymentError(f"{path} not found: install flwr (pip install 'fedgma[flower]') in this environment")
        return str(path)

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def log(self, name: str) -> str:
        """The output so far of process ``name`` (ANSI colour codes removed)."""
        path = self.log_path(name)
        text = path.read_text(errors="replace") if path.is_file() else ""
        return re.sub(r"\x1b\[[0-9;]*m", "", text)

    def _tail(self, name: str, lines: int = 40) -> str:
        return f"--- last lines of {self.log_path(name)} ---\n" + "\n".join(self.log(name).splitlines()[-lines:])

    def _start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        if name in self.processes and self.processes[name].poll() is None:
            raise DeploymentError(f"process {name!r} is already running")
        with open(self.log_path(name), "wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                       cwd=self.root, start_new_session=True)
        self.processes[name] = process
        return process

    def alive(self, name: str) -> bool:
        return name in self.processes and self.processes[name].poll() is None

    def check_alive(self, *names: str) -> None:
        """Raise DeploymentError naming the first of ``names`` (default: all) that has exited."""
        for name in names or tuple(self.processes):
            process = self.processes[name]
            if process.poll() is not None:
                raise DeploymentError(f"{name} exited with code {process.returncode}\n{self._tail(name)}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to process ``name`` and everything it started (its session's process group)."""
        process = self.processes[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        if sig == signal.SIGKILL:
            process.wait(timeout=30)

    def close(self) -> None:
        """End every process started here: SIGTERM to each process group, SIGKILL after ``grace_s``."""
        for name in self.processes:
            if self.alive(name):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.processes[name].pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):  # the group may outlive its leader: always SIGKILL it
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)

    def __enter__(self) -> LoopbackDeployment:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the deployment ----------------------------------------------------------------------

    def start_superlink(self, timeout: float = 60.0) -> None:
        """Start the SuperLink (TLS, node authentication) and wait until it accepts connections."""
        self._start("superlink", [
            self._executable("flower-superlink"),
            "--ssl-ca-certfile", str(self.tls.ca),
            "--ssl-certfile", str(self.tls.cert),
            "--ssl-keyfile", str(self.tls.key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", HOST,
            "--port", str(self.port),
            "--database", str(self.root / "superlink.db"),
        ])
        self.wait_for_log("superlink", rf"Uvicorn running on https://{re.escape(self.address)}", timeout=timeout)

    def wait_for_log(self, name: str, pattern: str, count: int = 1, timeout: float = 60.0,
                     poll: float = 0.2) -> list[re.Match[str]]:
        """Wait until the log of ``name`` matches ``pattern`` ``count`` times; the matches."""
        deadline = time.monotonic() + timeout
        while True:
            matches = list(re.finditer(pattern, self.log(name)))
            if len(matches) >= count:
                return matches
            self.check_alive(name)
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"{name}: {pattern!r} seen {len(matches)} of {count} times in {timeout:.0f} s\n{self._tail(name)}"
                )
            time.sleep(poll)

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this SuperLink (its config.toml names it ``loopback``)."""
        try:
            return subprocess.run([self._executable("flwr"), *args], env=self.env, cwd=self.root,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise DeploymentError(f"flwr {' '.join(args)} did not return within {timeout:.0f} s") from error

    def register_node(self, name: str) -> Path:
        """Make a key pair for SuperNode ``name`` and register its public key with the SuperLink."""
        self.keys[name] = write_node_key(self.root / "keys", name)
        result = self.flwr("supernode", "register", str(self.keys[name][1]), SUPERLINK_NAME)
        if result.returncode != 0 or "registered successfully" not in result.stdout:
            raise DeploymentError(f"flwr supernode register {name} failed ({result.returncode}):\n"
                                  f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        return self.keys[name][0]

    def start_node(self, name: str, node_config: str = "", private_key: Path | None = None,
                   extra: list[str] | None = None) -> None:
        """Start SuperNode ``name`` with its registered key (or ``private_key``), over TLS."""
        key = private_key or self.keys[name][0]
        args = [
            self._executable("flower-supernode"),
            "--superlink", self.address,
            "--root-certificates", str(self.tls.ca),
            "--auth-supernode-private-key", str(key),
            "--port", str(free_port()),  # the node's own (loopback) API for its SuperExec / ClientApps
            *(["--node-config", node_config] if node_config else []),
            *(extra or []),
        ]
        self._start(name, args)

    def wait_for_nodes(self, count: int, timeout: float = 120.0) -> list[str]:
        """Wait until the SuperLink has activated ``count`` SuperNodes; their node ids."""
        matches = self.wait_for_log("superlink", r"\[Fleet\.ActivateNode\] Activated node_id=(\d+)", count, timeout)
        return [m.group(1) for m in matches]

    def run_app(self, app: str | Path, run_config: str, timeout: float = 120.0) -> int:
        """``flwr run APP loopback --run-config ...``; the run id."""
        result = self.flwr("run", str(app), SUPERLINK_NAME, "--run-config", run_config, "--format", "json",
                           timeout=timeout)
        try:
            answer = json.loads(result.stdout[result.stdout.index("{"):])
            return int(answer["run-id"])
        except (ValueError, KeyError, TypeError) as error:
            raise DeploymentError(f"flwr run failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                                  f"{result.stderr[-3000:]}") from error

    def run_log(self, run_id: int, timeout: float = 60.0) -> str:
        """The ServerApp's log of run ``run_id`` (``flwr log RUN_ID --show``)."""
        result = self.flwr("log", str(run_id), SUPERLINK_NAME, "--show", timeout=timeout)
        return re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
