"""What each speed module buys on the path users run: whole rounds through ``fedgma run``, and a server round.

Run ``python benchmarks/round_effects.py`` (options: ``--help``). Every measurement runs in a fresh
subprocess; repeats are interleaved across modes; the table gives medians and ratios measured in this
one run.

* ``sim``: ``fedgma run`` (the CLI users run) on Fashion-MNIST, 100 clients Dirichlet(0.5), 10 per
  round, batch 32, lr 0.01, one local epoch, GMA, checkpoint every round, metrics every 5 rounds
  (the defaults). Per mode: the median ``round_s`` of ``rounds.jsonl`` (sample, train, aggregate,
  server step; first round dropped) and, for the MLP, seconds per local step over rounds 6-10 from
  ``metrics.jsonl``'s ``elapsed_s`` (evaluation, logging and checkpointing included). Modes switch one
  module at a time: ``FEDGMA_FASTGRAD=0`` (autograd instead of fastgrad), ``FEDGMA_NATIVE=1`` (the
  compiled fold), and the backends.
* ``plain``: two plain PyTorch FedAvg loops on the same task: ``benchmarks/bench.py``'s own
  (``plain_round``) and the independent ``../shared/bench/plain_loop.py`` (its own partition and
  client sample, so compare seconds per local step), each at 1 and 2 threads.
* ``server``: a Flower-server-like round: 100 replies of a 10^7-parameter float32 model arrive as
  bytes; each is deserialised (a copy, as Flower's ``ArrayRecord`` does), folded into the streaming
  aggregator, freed; then the result, the server step and the serialised new model. With and without
  the compiled fold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import _print_table as _table  # benchmarks/ is sys.path[0] when run as a script

HERE = Path(__file__).resolve().parent
SHARED_PLAIN = Path(os.environ.get("FEDGMA_SHARED_BENCH", HERE.parent.parent / "shared" / "bench")) / "plain_loop.py"

CONFIG = """seed = 0
rounds = {rounds}
eval_every = 5
checkpoint_every = 1
threads = {threads}
algorithm = "fedavg"
[data]
dataset = "fashion-mnist"
partition = {{ name = "dirichlet", alpha = 0.5, min_size = 10 }}
num_clients = 100
[model]
name = "{model}"
[client]
local_epochs = 1
batch_size = 32
lr = 0.01
[server]
aggregator = {{ name = "gma", threshold = 0.4 }}
clients_per_round = 10
[backend]
{backend}
"""

# name -> (backend table, threads, extra environment)
SIM_MODES = {
    "sequential-1t": ('name = "sequential"', 1, {}),
    "sequential-2t": ('name = "sequential"', 2, {}),
    "sequential-1t autograd (FEDGMA_FASTGRAD=0)": ('name = "sequential"', 1, {"FEDGMA_FASTGRAD": "0"}),
    "sequential-1t native fold (FEDGMA_NATIVE=1)": ('name = "sequential"', 1, {"FEDGMA_NATIVE": "1"}),
    "sequential-2t native fold (FEDGMA_NATIVE=1)": ('name = "sequential"', 2, {"FEDGMA_NATIVE": "1"}),
    "vectorized-2t": ('name = "vectorized"', 2, {}),
    "multiprocess (2 workers)": ('name = "multiprocess"\nworkers = 2', 1, {}),
}
CNN_MODES = ["sequential-2t", "sequential-2t native fold (FEDGMA_NATIVE=1)", "vectorized-2t",
             "multiprocess (2 workers)"]


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FEDGMA_NATIVE", "FEDGMA_FASTGRAD")}
    env.update(extra)
    return env


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_sim(model: str, mode: str, rounds: int) -> dict:
    backend, threads, extra = SIM_MODES[mode]
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "bench.toml"
        config.write_text(CONFIG.format(rounds=rounds, threads=threads, model=model, backend=backend))
        out = Path(folder) / "run"
        command = [sys.executable, "-c", "from fedgma.cli import main; main()", "run", str(config), "--out", str(out),
                   "--quiet"]
        done = subprocess.run(command, env=_env(extra), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"fedgma run failed ({mode}):\n{done.stderr[-3000:]}")
        per_round = _jsonl(out / "rounds.jsonl")
        metrics = {m["round"]: m for m in _jsonl(out / "metrics.jsonl")}
    result = {"round_s": [r["round_s"] for r in per_round[1:]], "steps": [r["local_steps"] for r in per_round[1:]]}
    if 5 in metrics and 10 in metrics:  # five whole rounds with evaluation, logging and checkpointing
        result["loop_s_per_step"] = ((metrics[10]["elapsed_s"] - metrics[5]["elapsed_s"])
                                     / (metrics[10]["total_local_steps"] - metrics[5]["total_local_steps"]))
    return result


def run_plain(model: str, which: str, threads: int, rounds: int) -> dict:
    """Seconds per local step of a plain loop: ours (bench.py) or the shared one."""
    env = _env({})
    if which == "shared":
        name = f"fedgma_round_effects_{model}_{threads}t_{os.getpid()}.json"
        command = [sys.executable, str(SHARED_PLAIN), "--model", model, "--rounds", str(rounds), "--threads",
                   str(threads), "--out", name]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"plain_loop.py failed:\n{done.stderr[-3000:]}")
        path = SHARED_PLAIN.parent / "results" / name
        result = json.loads(path.read_text())
        path.unlink(missing_ok=True)
        return {"s_per_step": result["steady_round_median_s"] * result["rounds"] / result["total_local_steps"]}
    command = [sys.executable, str(HERE / "bench.py"), "--child", "train", "--mode", f"plain-{threads}t", "--model",
               model, "--rounds", str(rounds)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench.py plain loop failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"s_per_step": sum(result["round_s"][1:]) / sum(result["steps"][1:])}


def run_server(args: argparse.Namespace) -> dict:
    """One Flower-like server round (in this process: call it through ``--child server``)."""
    import numpy as np
    import torch

    from fedgma import native
    from fedgma.aggregation import GMAAggregator, MeanAggregator

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    replies = [(torch.randn(args.d, generator=generator).numpy().tobytes(), 100 + 7 * k) for k in range(args.k)]
    params = torch.zeros(args.d)
    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, rule in (("gma", lambda: GMAAggregator(0.4)), ("mean", MeanAggregator)):
            for kernel in (False, True):
                key = f"{name}, {'native fold' if kernel else 'PyTorch'}"
                with native.enabled() if kernel else native.disabled():
                    start = time.perf_counter()
                    aggregator = rule()
                    for payload, n in replies:
                        update = torch.from_numpy(np.frombuffer(payload, dtype=np.float32).copy())
                        aggregator.add(update, n)
                        del update
                    update, _ = aggregator.result()
                    new = params + update  # FedAvg's server step (server lr 1)
                    new.numpy().tobytes()
                    times.setdefault(key, []).append(time.perf_counter() - start)
    return {"times": times, "native": native.native_status()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="sim,plain,server")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--rounds", type=int, default=11, help="MLP rounds per run (>= 10 for the loop figure)")
    parser.add_argument("--cnn-rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--d", type=int, default=10_000_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child")
    parser.add_argument("--json", help="also write every raw measurement to this file")
    args = parser.parse_args(argv)
    if args.child == "server":
        print(json.dumps(run_server(args)))
        return
    parts, raw = args.parts.split(","), {}
    print(f"round_effects: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; medians of "
          f"{args.repeats} interleaved repeats; ratios within this run")
    for model in args.models.split(",") if {"sim", "plain"} & set(parts) else []:
        rounds = args.rounds if model == "mlp" else args.cnn_rounds
        modes = list(SIM_MODES) if model == "mlp" else CNN_MODES
        sims: dict[str, list[dict]] = {m: [] for m in modes} if "sim" in parts else {}
        plains: dict[str, list[dict]] = {}
        plain_modes = [(w, t) for w in ("ours", "shared") for t in (1, 2)] if "plain" in parts else []
        for _ in range(args.repeats):
            for mode in sims:
                sims[mode].append(run_sim(model, mode, rounds))
            for which, threads in plain_modes:
                plains.setdefault(f"plain loop, {which}, {threads}t", []).append(
                    run_plain(model, which, threads, rounds))
        raw[model] = {"sim": sims, "plain": plains}
        plain_best = {w: min(statistics.median(r["s_per_step"] for r in runs)
                             for name, runs in plains.items() if f", {w}," in name) for w in ("ours", "shared")
                      if plains}
        rows = []
        reference = None
        for mode, runs in sims.items():
            round_s = statistics.median(t for r in runs for t in r["round_s"])
            steps = statistics.median(s for r in runs for s in r["steps"])
            per_step = sum(t for r in runs for t in r["round_s"]) / sum(s for r in runs for s in r["steps"])
            reference = reference or round_s
            loop = [r["loop_s_per_step"] for r in runs if "loop_s_per_step" in r]
            loop_s = statistics.median(loop) if loop else float("nan")
            rows.append([mode, f"{round_s:.3f}", f"{1 - round_s / reference:+.1%}", f"{steps:.0f}",
                         f"{per_step * 1e6:.0f}", f"{loop_s * 1e6:.0f}",
                         *(f"{plain_best[w] / per_step:.2f}" if plains else "-" for w in ("ours", "shared")),
                         *(f"{plain_best[w] / loop_s:.2f}" if plains and loop else "-" for w in ("ours", "shared"))])
        for name, runs in plains.items():
            per_step = statistics.median(r["s_per_step"] for r in runs)
            rows.append([name, "-", "-", "-", f"{per_step * 1e6:.0f}", "-", "-", "-", "-", "-"])
        _table(f"sim: {model}, fedgma run, {rounds} rounds x {args.repeats} repeats; 'saves' = 1 - round / first row's "
               "round; 'x plain' = best plain loop's s/step / this s/step (>1: faster)",
               ["mode", "s/round", "saves", "steps/round", "us/step (round)", "us/step (loop)",
                "x plain ours", "x plain shared", "x ours (loop)", "x shared (loop)"], rows)
    if "server" in parts:
        command = [sys.executable, os.path.abspath(__file__), "--child", "server", "--k", str(args.k), "--d",
                   str(args.d), "--threads", str(args.threads), "--repeats", str(args.repeats)]
        done = subprocess.run(command, env=_env({}), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"server child failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        raw["server"] = result
        med = {name: statistics.median(t) for name, t in result["times"].items()}
        rows = []
        for name, t in med.items():
            base = med[name.split(",")[0] + ", PyTorch"]
            rows.append([name, f"{t:.3f}", f"{1 - t / base:+.1%}"])
        _table(f"server: {args.k} replies of d = {args.d:.0e} float32 (deserialise, fold, result, step, serialise), "
               f"{args.threads} thread(s); 'saves' = 1 - time / the PyTorch path's",
               ["round", "seconds", "saves"], rows)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
