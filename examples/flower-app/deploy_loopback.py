"""Loopback deployment (work in progress, not a test): SuperLink + 3 SuperNodes, TLS, node auth, flwr run.

Usage: python examples/flower-app/deploy_loopback.py WORKDIR. Kills node2 after round 1; see docs/FLOWER.md.
"""

import contextlib
import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

root = Path(sys.argv[1])
root.mkdir(parents=True, exist_ok=True)
bin_ = Path(sys.executable).parent


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def pem_key(k):
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


now = datetime.datetime.now(datetime.timezone.utc)
ca_key = ec.generate_private_key(ec.SECP384R1())
ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedgma test CA")])
ca = (
    x509.CertificateBuilder()
    .subject_name(ca_name)
    .issuer_name(ca_name)
    .public_key(ca_key.public_key())
    .serial_number(x509.random_serial_number())
    .not_valid_before(now - datetime.timedelta(minutes=5))
    .not_valid_after(now + datetime.timedelta(days=1))
    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    .sign(ca_key, hashes.SHA256())
)
srv_key = ec.generate_private_key(ec.SECP384R1())
srv = (
    x509.CertificateBuilder()
    .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
    .issuer_name(ca_name)
    .public_key(srv_key.public_key())
    .serial_number(x509.random_serial_number())
    .not_valid_before(now - datetime.timedelta(minutes=5))
    .not_valid_after(now + datetime.timedelta(days=1))
    .add_extension(
        x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        critical=False,
    )
    .sign(ca_key, hashes.SHA256())
)
(root / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
(root / "server.pem").write_bytes(srv.public_bytes(serialization.Encoding.PEM))
(root / "server.key").write_bytes(pem_key(srv_key))
for k in range(3):
    key = ec.generate_private_key(ec.SECP384R1())
    (root / f"node{k}").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    (root / f"node{k}.pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
fleet, control, rt, health = free_port(), free_port(), free_port(), free_port()
home = root / "home"
(home / ".flwr").mkdir(parents=True, exist_ok=True)
(home / ".flwr" / "config.toml").write_text(
    f'[superlink]\ndefault = "dep"\n\n[superlink.dep]\naddress = "127.0.0.1:{rt}"\nroot-certificates = "{root / "ca.pem"}"\n'  # noqa: E501
)
env = {
    **os.environ,
    "HOME": str(home),
    "PATH": f"{bin_}:{os.environ['PATH']}",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
procs = {}


def start(name, args):
    log = open(root / f"{name}.log", "w")  # noqa: SIM115
    procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


try:
    start(
        "superlink",
        [
            str(bin_ / "flower-superlink"),
            "--ssl-ca-certfile",
            str(root / "ca.pem"),
            "--ssl-certfile",
            str(root / "server.pem"),
            "--ssl-keyfile",
            str(root / "server.key"),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--fleet-api-address",
            f"127.0.0.1:{fleet}",
            "--control-api-address",
            f"127.0.0.1:{control}",
            "--host",
            "127.0.0.1",
            "--port",
            str(rt),
            "--database",
            str(root / "state.db"),
        ],
    )
    time.sleep(8)
    for k in range(3):
        r = subprocess.run(
            [str(bin_ / "flwr"), "supernode", "register", str(root / f"node{k}.pub"), "dep"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        print("register", k, r.returncode, r.stdout[-300:], r.stderr[-500:])
    for k in range(3):
        start(
            f"node{k}",
            [
                str(bin_ / "flower-supernode"),
                "--superlink",
                f"127.0.0.1:{rt}",
                "--root-certificates",
                str(root / "ca.pem"),
                "--auth-supernode-private-key",
                str(root / f"node{k}"),
                "--auth-supernode-public-key",
                str(root / f"node{k}.pub"),
                "--node-config",
                f"partition-id={k} num-partitions=3",
                "--port",
                str(free_port()),
            ],
        )
    time.sleep(5)
    run_dir = root / "run"
    r = subprocess.run(
        [
            str(bin_ / "flwr"),
            "run",
            str(Path(__file__).resolve().parent),
            "dep",
            "--run-config",
            f"rounds=4 eval_every=1 data.num_clients=3 server.clients_per_round=3 server.min_clients=2 round-timeout=90.0 run-dir='{run_dir}'",  # noqa: E501
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    print("run", r.returncode, r.stdout[-800:], r.stderr[-800:])
    deadline = time.time() + 240
    killed = False
    while time.time() < deadline:
        rounds = (run_dir / "rounds.jsonl").read_text().splitlines() if (run_dir / "rounds.jsonl").exists() else []
        if len(rounds) >= 1 and not killed:
            time.sleep(0.3)
            os.killpg(procs["node2"].pid, signal.SIGKILL)
            killed = time.time()
            print("killed node2 after round", len(rounds))
        if (run_dir / "summary.json").exists():
            print("finished", time.time() - killed)
            break
        time.sleep(0.2)
    print(open(run_dir / "metrics.jsonl").read() if (run_dir / "metrics.jsonl").exists() else "no metrics")  # noqa: SIM115
    print(open(run_dir / "rounds.jsonl").read() if (run_dir / "rounds.jsonl").exists() else "no rounds")  # noqa: SIM115
finally:
    for _name, p in procs.items():
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    time.sleep(2)
    for _name, p in procs.items():
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
