"""SCAFFOLD at scale through ``fedgma run``, checkpoints on: peak RSS and checkpoint time (issue 11, item 5).

Runs, each as its own ``fedgma run`` subprocess (so the figures are those a user gets):

1. ``configs/bench-scaffold-10k.toml``: 10,000 clients, 100 per round, SCAFFOLD, MLP, Fashion-MNIST,
   100 rounds, a checkpoint after every round, once per ``--memory-mb`` value (the RAM limit of the
   control variates, ``client.algorithm.memory_mb``). Reports the peak RSS of the run (``wait4``'s
   ``ru_maxrss`` of that child), the mean time of a round (``round_s`` of ``rounds.jsonl``), the mean
   time of a checkpoint (the simulator's ``checkpoint_s`` in ``summary.json`` over the number of
   checkpoints written), the size of one checkpoint file and of the spill files.
2. With ``--compare-anonymous R``: R rounds with the named store and R rounds with the store forced to
   ``spill_dir=None`` (the anonymous temporary file of before, whose checkpoint materialises every
   control variate), both at the smallest ``--memory-mb``: the ratio of their peak RSS and checkpoint
   times. Keep R small (10): the anonymous store's checkpoint holds all variates, several times over.
3. ``configs/quickstart.toml`` with ``checkpoint_every = 1``: the checkpoint time against its round time,
   and the smallest ``checkpoint_every`` that keeps checkpointing under 10% of the round time.

Not a test: it prints figures measured in one run. Usage::

    python benchmarks/scaffold_scale.py                      # both parts, ~10 minutes on 2 cores
    python benchmarks/scaffold_scale.py --memory-mb 16 --rounds 20 --skip-quickstart
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1 << 30


def _fedgma() -> list[str]:
    script = Path(sys.executable).with_name("fedgma")
    if script.is_file():
        return [str(script)]
    found = shutil.which("fedgma")
    if found is None:
        raise SystemExit("scaffold_scale: the fedgma command is not installed (pip install -e .)")
    return [found]


# ``fedgma`` with every ControlVariateStore built without a spill_dir: the behaviour before the named store
_ANONYMOUS = """
import sys
import fedgma.control_store as store
init = store.ControlVariateStore.__init__
def anonymous(self, *args, spill_dir=None, **kwargs):
    init(self, *args, **kwargs)
store.ControlVariateStore.__init__ = anonymous
from fedgma.cli import main
sys.argv[0] = "fedgma"
main()
"""


def run_cli(args: list[str], anonymous: bool = False) -> tuple[float, int]:
    """Run ``fedgma <args>`` to completion; its wall time (s) and peak RSS (bytes, the child and its children)."""
    start = time.perf_counter()
    command = [sys.executable, "-c", _ANONYMOUS] if anonymous else _fedgma()
    process = subprocess.Popen(command + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"scaffold_scale: fedgma {' '.join(args)} failed ({process.returncode}):\n"
                         + output.decode(errors="replace")[-3000:])
    return wall, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def measure(config: Path, out: Path, overrides: list[str], anonymous: bool = False) -> dict[str, float]:
    """One run of ``config`` into ``out``; its timing and memory figures."""
    shutil.rmtree(out, ignore_errors=True)
    args = ["run", str(config), "--out", str(out), "--quiet"]
    for override in overrides:
        args += ["--set", override]
    wall, peak = run_cli(args, anonymous)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    config_text = (out / "config.toml").read_text()
    every = int(next(line.split("=")[1] for line in config_text.splitlines() if line.startswith("checkpoint_every")))
    checkpoints = sum(1 for r in rounds if r["round"] % every == 0 or r["round"] == len(rounds))
    checkpoint_files = sorted((out / "checkpoints").glob("round-*.pt"))
    return {
        "rounds": len(rounds),
        "wall_s": wall,
        "peak_rss_bytes": peak,
        "round_s": sum(r["round_s"] for r in rounds) / len(rounds),
        "wall_per_round_s": wall / len(rounds),
        "checkpoints": checkpoints,
        "checkpoint_s": summary["checkpoint_s"] / checkpoints,
        "checkpoint_file_bytes": checkpoint_files[-1].stat().st_size,
        "spill_bytes": folder_bytes(out / "controls"),
        "final_accuracy": summary.get("final", {}).get("test_accuracy", float("nan")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-mb", type=int, nargs="+", default=[1024, 16],
                        help="client.algorithm.memory_mb values to run (default: 1024 16)")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--compare-anonymous", type=int, default=0, metavar="R",
                        help="also R rounds with the named and with the anonymous store (default: 0, off)")
    parser.add_argument("--skip-quickstart", action="store_true")
    parser.add_argument("--skip-scaffold", action="store_true", help="only the quickstart part")
    parser.add_argument("--work", type=Path, default=None, help="folder for the run folders (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fedgma-scaffold-scale-"))
    work.mkdir(parents=True, exist_ok=True)

    if args.skip_scaffold:
        args.memory_mb, args.compare_anonymous = [], 0
    print(f"SCAFFOLD, MLP, Fashion-MNIST IID: {args.clients} clients, {args.per_round} per round, "
          f"{args.rounds} rounds, a checkpoint every round (run folders in {work})")
    print(f"{'memory_mb':>9} {'peak RSS':>9} {'round':>8} {'ckpt':>8} {'ckpt/round':>10} {'ckpt file':>10} "
          f"{'spill':>8} {'wall':>7} {'acc':>6}")
    for memory_mb in args.memory_mb:
        figures = measure(ROOT / "configs" / "bench-scaffold-10k.toml", work / f"scaffold-{memory_mb}mb", [
            f"rounds={args.rounds}", f"data.num_clients={args.clients}",
            f"server.clients_per_round={args.per_round}", f"client.algorithm.memory_mb={memory_mb}",
        ])
        print(f"{memory_mb:>9} {figures['peak_rss_bytes'] / GB:>7.2f}GB {figures['round_s']:>7.3f}s "
              f"{figures['checkpoint_s']:>7.3f}s {figures['checkpoint_s'] / figures['round_s']:>9.1%} "
              f"{figures['checkpoint_file_bytes'] / 2**20:>8.1f}MB {figures['spill_bytes'] / GB:>6.2f}GB "
              f"{figures['wall_s']:>6.0f}s {figures['final_accuracy']:>6.4f}", flush=True)
        print("  " + json.dumps(figures), flush=True)
        shutil.rmtree(work / f"scaffold-{memory_mb}mb", ignore_errors=True)  # gigabytes of spill files

    if args.compare_anonymous:
        memory_mb = min(args.memory_mb)
        print(f"\n{args.compare_anonymous} rounds, memory_mb={memory_mb}: the named store against the anonymous one "
              "(spill_dir=None, whose checkpoint materialises every control variate)")
        pair = {}
        for anonymous in (False, True):
            name = "anonymous" if anonymous else "named"
            pair[name] = measure(ROOT / "configs" / "bench-scaffold-10k.toml", work / f"compare-{name}", [
                f"rounds={args.compare_anonymous}", f"data.num_clients={args.clients}",
                f"server.clients_per_round={args.per_round}", f"client.algorithm.memory_mb={memory_mb}",
            ], anonymous=anonymous)
            figures = pair[name]
            print(f"{name:>9}: peak RSS {figures['peak_rss_bytes'] / GB:.2f} GB, round {figures['round_s']:.3f} s, "
                  f"checkpoint {figures['checkpoint_s']:.3f} s, checkpoint file "
                  f"{figures['checkpoint_file_bytes'] / 2**20:.1f} MB, accuracy {figures['final_accuracy']:.4f}",
                  flush=True)
            shutil.rmtree(work / f"compare-{name}", ignore_errors=True)
        named, anonymous_figures = pair["named"], pair["anonymous"]
        print(f"anonymous / named: peak RSS {anonymous_figures['peak_rss_bytes'] / named['peak_rss_bytes']:.2f}x, "
              f"checkpoint time {anonymous_figures['checkpoint_s'] / named['checkpoint_s']:.1f}x, checkpoint file "
              f"{anonymous_figures['checkpoint_file_bytes'] / named['checkpoint_file_bytes']:.0f}x")

    if not args.skip_quickstart:
        figures = measure(ROOT / "configs" / "quickstart.toml", work / "quickstart", ["checkpoint_every=1"])
        share = figures["checkpoint_s"] / figures["round_s"]
        every = max(1, math.ceil(share / 0.10))
        ckpt_mb = figures["checkpoint_file_bytes"] / 2**20
        print(f"\nquickstart (configs/quickstart.toml, checkpoint_every=1): round {figures['round_s'] * 1e3:.1f} ms "
              f"(train + aggregate, rounds.jsonl round_s), {figures['wall_per_round_s'] * 1e3:.1f} ms of wall time per "
              f"round; checkpoint {figures['checkpoint_s'] * 1e3:.1f} ms ({ckpt_mb:.2f} MB) = {share:.1%} of a round")
        print(f"checkpoint_every >= {every} keeps checkpointing under 10% of the quickstart's round time "
              f"({share / every:.1%} at {every})")
        print("  " + json.dumps(figures))


if __name__ == "__main__":
    main()
