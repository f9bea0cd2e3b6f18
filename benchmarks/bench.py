"""fedgma speed and memory benchmark: the comparisons of the "Speed and scale" issue in one run.

Run ``fedgma bench`` (or ``python benchmarks/bench.py``). Every measurement of a part runs in a
fresh subprocess (so its peak RSS is its own); repeats are interleaved across modes and the table
reports medians and ratios to the plain PyTorch loop measured in the same run.

Parts:

* ``train``: Fashion-MNIST, 100 clients, Dirichlet(α) label split, 10 sampled per round, batch 32,
  lr 0.01, one local epoch; the same partition, client sample and batch order for every mode.
  ``plain`` is a straightforward PyTorch loop: ``model.load_state_dict(global)``, a fresh
  ``torch.optim.SGD``, DataLoader-free index batching (``x[idx]`` on in-memory tensors, the order
  from ``torch.randperm`` with the same per-client generator as fedgma), a weighted average of the
  state dicts (the baseline). ``sequential`` / ``vectorized`` / ``multiprocess`` are fedgma's
  backends, each round run by ``fedgma.round.run_round`` (the function ``fedgma.simulation.run``
  calls: reply checks, the mean aggregator, FedAvg's server step) over a ``ServerState``.
* ``agg``: K updates of d float32: one read of every float (the bandwidth floor), a Flower-style
  weighted mean (numpy: scale every update, ``reduce(np.add)``, divide, as flwr's ``aggregate``),
  ``fedgma.aggregation.mean`` and ``gma`` on the list, and streaming ``GMAAggregator``.
* ``eval``: one evaluation of the global model as ``fedgma run`` makes it every ``eval_every`` rounds:
  Fashion-MNIST's 10,000 test images and a 6,000-image validation split (``data.validation_fraction =
  0.1``), in the parent with one thread as one forward pass per 1,000 images (before ``fedgma.evaluation``),
  in the parent in forward chunks of 100 (``evaluate_all``), and in the multiprocess backend's 2 workers
  (``evaluate_all`` with the backend's ``evaluate_blocks``, as ``fedgma run`` does); every way must give
  the same bits.
* ``scale``: 10,000 clients (IID split), 100 sampled per round, SCAFFOLD with the MLP; peak RSS
  while the control-variate store fills up (spilling to disk past its memory limit).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from functools import reduce

import numpy as np
import torch
import torch.nn.functional as F

STEP_MODES = {
    "plain-1t": ("plain", 1),
    "plain-2t": ("plain", 2),
    "sequential-1t": ("sequential", 1),
    "sequential-2t": ("sequential", 2),
    "vectorized-1t": ("vectorized", 1),
    "vectorized": ("vectorized", 2),
    "multiprocess": ("multiprocess", 1),
}


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as handle:
        match = re.search(rf"{key}:\s+(\d+)", handle.read())
    return int(match.group(1)) / 1024 if match else float("nan")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _children_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------
# train: one mode, some rounds, in this process
# --------------------------------------------------------------------------------------------


def _federated(alpha: float, num_clients: int, partition: str = "dirichlet"):
    """Fashion-MNIST split among clients: fixed seed 0, the same for every mode."""
    from fedgma.data import partition as partitions
    from fedgma.data.datasets import load_dataset
    from fedgma.data.federated import FederatedDataset
    from fedgma.seeding import seed_sequence

    splits = load_dataset("fashion-mnist")
    seeds = seed_sequence(0, "partition")
    if partition == "dirichlet":
        parts = partitions.dirichlet(splits.train.y.numpy(), num_clients, alpha, seeds, 10)
    else:
        parts = partitions.iid(len(splits.train), num_clients, seeds)
    return FederatedDataset([splits.train.subset(p) for p in parts], splits.test, splits.num_classes)


def _build(name: str, input_shape, num_classes: int):
    """A registered model, or ``cnn-maxpool2d``: the CNN with ``nn.MaxPool2d(2)`` pools (before fedgma.pooling)."""
    from fedgma.models import build_model
    from fedgma.seeding import torch_generator

    module = build_model(name.removesuffix("-maxpool2d"), input_shape, num_classes, torch_generator(0, "init"))
    if name.endswith("-maxpool2d"):
        from fedgma.pooling import MaxPool2x2

        for index, layer in enumerate(module):
            if isinstance(layer, MaxPool2x2):
                module[index] = torch.nn.MaxPool2d(2)
    return module


def _sample(round_index: int, population: int, per_round: int) -> list[int]:
    from fedgma.seeding import numpy_rng

    chosen = numpy_rng(0, "sampling", round_index).choice(population, size=per_round, replace=False)
    return sorted(int(c) for c in chosen)


def plain_round(module, global_state, data, ids, round_index, batch_size, lr):
    """The plain PyTorch loop: the same local SGD steps and a weighted average of the client models."""
    from fedgma.seeding import torch_generator

    total = {k: torch.zeros_like(v) for k, v in global_state.items()}
    weight_total, steps = 0, 0
    for client_id in ids:
        module.load_state_dict(global_state)
        optimizer = torch.optim.SGD(module.parameters(), lr=lr)
        client = data.clients[client_id]
        order = torch.randperm(len(client), generator=torch_generator(0, "client", round_index, client_id))
        for idx in order.split(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(module(client.x[idx]), client.y[idx]).backward()
            optimizer.step()
            steps += 1
        for k, v in module.state_dict().items():
            total[k].add_(v, alpha=len(client))
        weight_total += len(client)
    return {k: v / weight_total for k, v in total.items()}, steps


def run_train(args) -> dict:
    from fedgma.aggregation import MeanAggregator
    from fedgma.backends import make_backend
    from fedgma.client import LocalSGD, PlainClient
    from fedgma.models import FlatModel
    from fedgma.round import ReplyPolicy, ServerState, run_round
    from fedgma.server_opt import make_server_optimizer

    kind, threads = STEP_MODES[args.mode]
    torch.set_num_threads(threads)
    data = _federated(args.alpha, 100)
    _reset_peak()  # peak memory of training, not of decoding the dataset files
    module = _build(args.model, data.input_shape, data.num_classes)
    settings = LocalSGD(batch_size=32, lr=0.01)
    times, steps_per_round = [], []
    if kind == "plain":
        state = {k: v.clone() for k, v in module.state_dict().items()}
        for r in range(1, args.rounds + 1):
            start = time.perf_counter()
            state, steps = plain_round(module, state, data, _sample(r, 100, 10), r, 32, 0.01)
            times.append(time.perf_counter() - start)
            steps_per_round.append(steps)
        final = torch.cat([v.reshape(-1) for v in state.values()])
    else:
        model = FlatModel(module)
        state = ServerState(0, model.params.clone(), make_server_optimizer("sgd", lr=1.0), PlainClient(settings))
        policy = ReplyPolicy(model.numel)
        options = {"workers": os.cpu_count()} if kind == "multiprocess" else {}
        backend = make_backend(kind, model, data, settings, 0, **options)
        try:
            for r in range(1, args.rounds + 1):
                start = time.perf_counter()
                replies = backend.train(state.params, _sample(r, 100, 10), r, state.client_algorithm)
                state, outcome = run_round(state, r, replies, MeanAggregator, policy)
                times.append(time.perf_counter() - start)
                steps_per_round.append(outcome.local_steps)
        finally:
            backend.close()
        final = state.params
    return {"round_s": times, "steps": steps_per_round, "checksum": float(final.double().abs().sum()),
            "params_sha256": hashlib.sha256(final.detach().cpu().contiguous().numpy().tobytes()).hexdigest(),
            "peak_mb": max(_status_mb("VmHWM"), _children_peak_mb() if kind == "multiprocess" else 0.0)}


# --------------------------------------------------------------------------------------------
# agg: aggregation of K updates of d floats
# --------------------------------------------------------------------------------------------


def _without_native(method):
    from fedgma import native

    with native.disabled():
        return method()


def run_agg(args) -> dict:
    from fedgma import native
    from fedgma.aggregation import GMAAggregator, gma, mean

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    updates = [torch.randn(args.d, generator=generator) for _ in range(args.k)]
    weights = [float(i % 7 + 1) for i in range(args.k)]

    def floor():
        for u in updates:
            u.sum()

    def flower():
        arrays = [u.numpy() for u in updates]
        weighted = [a * w for a, w in zip(arrays, weights, strict=True)]
        return reduce(np.add, weighted) / sum(weights)

    def streaming():
        aggregator = GMAAggregator(threshold=0.4)
        for u, w in zip(updates, weights, strict=True):
            aggregator.add(u, w)
        return aggregator.result()

    methods = {"floor": floor, "flower-mean": flower, "fedgma-mean": lambda: mean(updates, weights),
               "fedgma-gma": lambda: gma(updates, weights, 0.4), "fedgma-gma-stream": streaming}
    if native.fold_kernel() is not None:  # the same methods on the PyTorch-only path, for comparison
        for name in ("fedgma-mean", "fedgma-gma", "fedgma-gma-stream"):
            methods[f"{name} (torch)"] = lambda method=methods[name]: _without_native(method)
    times = {name: [] for name in methods}
    extra = {name: 0.0 for name in methods}
    for _ in range(args.repeats):
        for name, method in methods.items():
            base = _status_mb("VmRSS")
            _reset_peak()
            start = time.perf_counter()
            out = method()
            times[name].append(time.perf_counter() - start)
            del out
            extra[name] = max(extra[name], _status_mb("VmHWM") - base)
    return {"times": times, "extra_mb": extra, "d_mb": args.d * 4 / 2**20, "native": native.native_status()}


# --------------------------------------------------------------------------------------------
# scale: 10,000 clients, SCAFFOLD
# --------------------------------------------------------------------------------------------


def run_scale(args) -> dict:
    from fedgma.aggregation import MeanAggregator
    from fedgma.backends import make_backend
    from fedgma.client import ControlVariateStore, LocalSGD, ScaffoldClient
    from fedgma.models import FlatModel, build_model
    from fedgma.round import ReplyPolicy, ServerState, run_round
    from fedgma.seeding import torch_generator
    from fedgma.server_opt import make_server_optimizer

    data = _federated(0.5, args.population, partition="iid")
    model = FlatModel(build_model("mlp", data.input_shape, data.num_classes, torch_generator(0, "init")))
    params = model.params.clone()
    settings = LocalSGD(batch_size=32, lr=0.01)
    algorithm = ScaffoldClient(settings, model.numel, data.num_clients)
    algorithm.store = ControlVariateStore(model.numel, memory_limit_bytes=args.store_limit_mb * 2**20)
    backend = make_backend("sequential", model, data, settings, 0)
    rss_after_data = _status_mb("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    state = ServerState(0, params, make_server_optimizer("sgd", lr=1.0), algorithm)
    policy = ReplyPolicy(model.numel)
    for r in range(1, args.rounds + 1):
        replies = backend.train(state.params, _sample(r, args.population, args.per_round), r, algorithm)
        state, _ = run_round(state, r, replies, MeanAggregator, policy)
    return {"rounds": args.rounds, "clients_with_state": len(algorithm.store), "spilled": algorithm.store.num_spilled,
            "control_gb": len(algorithm.store) * model.numel * 4 / 2**30, "round_s": (time.perf_counter() - start)
            / args.rounds, "rss_after_data_mb": rss_after_data, "peak_mb": _status_mb("VmHWM")}


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# eval: one evaluation of the global model, three ways, in this process
# --------------------------------------------------------------------------------------------


def run_eval(args) -> dict:
    from fedgma.backends import make_backend
    from fedgma.client import LocalSGD, PlainClient
    from fedgma.data.federated import hold_out_validation
    from fedgma.evaluation import BLOCK, evaluate_all
    from fedgma.models import FlatModel

    torch.set_num_threads(1)
    data = hold_out_validation(_federated(args.alpha, 100), 0.1, 0)
    model = FlatModel(_build(args.model, data.input_shape, data.num_classes))
    params = model.params.clone()

    @torch.no_grad()
    def one_pass() -> dict:  # the simulator's evaluation before fedgma.evaluation: the whole block at once
        model.load(params)
        metrics = {}
        for name, dataset in [("test", data.test), *data.extra_tests.items()]:
            loss_sum, correct = 0.0, 0
            for start in range(0, len(dataset), BLOCK):
                x, y = dataset.x[start : start + BLOCK], dataset.y[start : start + BLOCK]
                logits = model(x)
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
            metrics[f"{name}_loss"], metrics[f"{name}_accuracy"] = loss_sum / len(dataset), correct / len(dataset)
        return metrics

    backend = make_backend("multiprocess", model, data, LocalSGD(batch_size=32, lr=0.01), 0, workers=2)
    try:
        list(backend.train(params, [0, 1], 1, PlainClient(LocalSGD(batch_size=32, lr=0.01))))  # starts the workers
        ways = {
            "parent, one pass per 1,000": one_pass,
            "parent, chunks of 100": lambda: evaluate_all(model, params, data),
            "multiprocess workers (2)": lambda: evaluate_all(model, params, data, backend.evaluate_blocks),
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        results = {}
        for _ in range(args.repeats):  # interleaved
            for name, way in ways.items():
                start = time.perf_counter()
                results[name] = way()
                times[name].append(time.perf_counter() - start)
    finally:
        backend.close()
    reference = results["parent, one pass per 1,000"]
    same = all({k: r[k] for k in reference} == reference for r in results.values())
    return {"times": times, "same_bits": same, "metrics": reference,
            "samples": len(data.test) + len(data.extra_tests["validation"])}


def _child(part: str, **options) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", part]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {part} {options} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_train(model: str, rounds: int, repeats: int, alpha: float, modes: list[str]) -> list[dict]:
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(repeats):  # interleaved: every mode once per repeat
        for mode in modes:
            runs[mode].append(_child("train", mode=mode, model=model, rounds=rounds, alpha=alpha))
    rows = []
    for mode in modes:
        round_s = [t for run in runs[mode] for t in run["round_s"][1:] or run["round_s"]]  # drop the warm-up round
        steps = [s for run in runs[mode] for s in run["steps"][1:] or run["steps"]]
        rows.append({"mode": mode, "round_s": statistics.median(round_s),
                     "steps_per_s": sum(steps) / sum(round_s), "peak_mb": max(r["peak_mb"] for r in runs[mode]),
                     "checksum": runs[mode][0]["checksum"], "params_sha256": runs[mode][0]["params_sha256"]})
    plain = [r for r in rows if r["mode"].startswith("plain")]
    best = max(plain, key=lambda r: r["steps_per_s"]) if plain else None
    for row in rows:
        row["vs_plain"] = row["steps_per_s"] / best["steps_per_s"] if best else float("nan")
    return rows


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}")
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one part in a fresh process
    parser.add_argument("--quick", action="store_true",
                        help="a small run of every part in about a minute (MLP only, 2 rounds, 1 repeat, K=20 "
                             "updates of d=1e6, 500 SCAFFOLD clients for 2 rounds): checks that the benchmark "
                             "works; not for figures")
    parser.add_argument("--parts", default="train,agg,eval,scale",
                        help="comma list: train (rounds/s per backend), agg (aggregation vs memory floor), "
                             "eval (one evaluation: parent vs the multiprocess workers), "
                             "scale (SCAFFOLD with many clients) (default: %(default)s)")
    parser.add_argument("--models", default="mlp,cnn",
                        help="train, eval: models to time; cnn-maxpool2d is the CNN with nn.MaxPool2d pools, to "
                             "measure fedgma.pooling (default: %(default)s)")
    parser.add_argument("--modes", default=",".join(STEP_MODES),
                        help="train: backends × threads to time (default: %(default)s)")
    parser.add_argument("--mode", default="sequential-1t", help=argparse.SUPPRESS)  # internal, for --child
    parser.add_argument("--model", default="mlp", help=argparse.SUPPRESS)  # internal, for --child
    parser.add_argument("--rounds", type=int, default=6, help="train: rounds per MLP run (default: %(default)s)")
    parser.add_argument("--cnn-rounds", type=int, default=3, help="train: rounds per CNN run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are shown "
                                                                "(default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.5, help="train: Dirichlet α of the 100-client split "
                                                                  "(default: %(default)s)")
    parser.add_argument("--k", type=int, default=100, help="agg: client updates K (default: %(default)s)")
    parser.add_argument("--d", type=int, default=10_000_000, help="agg: floats per update d; memory ≈ 4·K·d bytes "
                                                                  "(default: %(default)s, about 4 GB)")
    parser.add_argument("--threads", type=int, default=2, help="agg: torch threads (default: %(default)s)")
    parser.add_argument("--population", type=int, default=10_000, help="scale: SCAFFOLD clients "
                                                                       "(default: %(default)s)")
    parser.add_argument("--per-round", type=int, default=100, help="scale: clients per round (default: %(default)s)")
    parser.add_argument("--scale-rounds", type=int, default=100, help="scale: rounds (default: %(default)s)")
    parser.add_argument("--store-limit-mb", type=int, default=1024,
                        help="scale: RAM for SCAFFOLD's c_i before they spill to disk, MB (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.quick:  # small sizes for every part; explicit options given with --quick are overridden
        args.models, args.modes, args.rounds, args.repeats = "mlp", "plain-1t,sequential-1t", 2, 1
        args.k, args.d, args.population, args.per_round, args.scale_rounds = 20, 1_000_000, 500, 10, 2

    if args.child:
        result = {"train": run_train, "agg": run_agg, "scale": run_scale, "eval": run_eval}[args.child](args)
        print(json.dumps(result))
        return

    parts = args.parts.split(",")
    print(f"fedgma bench: torch {torch.__version__}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start; medians of interleaved repeats, ratios within this run")
    if "train" in parts:
        steps_per_s: dict[tuple[str, str], float] = {}
        final_sha: dict[tuple[str, str], str] = {}  # SHA-256 of the final parameters' bytes
        for model in args.models.split(","):
            rounds = args.cnn_rounds if model.startswith("cnn") else args.rounds
            rows = bench_train(model, rounds, args.repeats, args.alpha, args.modes.split(","))
            _print_table(
                f"train: {model}, Fashion-MNIST, 100 clients Dirichlet({args.alpha}), 10/round, batch 32, lr 0.01, "
                f"1 epoch; {rounds} rounds × {args.repeats} repeats (first round of each run dropped)",
                ["mode", "s/round", "steps/s", "peak MB", "× plain (best)", "checksum"],
                [[r["mode"], f"{r['round_s']:.3f}", f"{r['steps_per_s']:.0f}", f"{r['peak_mb']:.0f}",
                  f"{r['vs_plain']:.2f}", f"{r['checksum']:.4f}"] for r in rows],
            )
            steps_per_s.update({(model, r["mode"]): r["steps_per_s"] for r in rows})
            final_sha.update({(model, r["mode"]): r["params_sha256"] for r in rows})
        pairs = [(m, m + "-maxpool2d") for m in args.models.split(",") if m + "-maxpool2d" in args.models.split(",")]
        for new, old in pairs:  # fedgma.pooling's gain: the same modes with nn.MaxPool2d
            _print_table(f"train: {new} (fedgma.pooling.MaxPool2x2) against {old} (nn.MaxPool2d), steps/s",
                         ["mode", old, new, "× faster", "same final params (bits)"],
                         [[mode, f"{steps_per_s[old, mode]:.0f}", f"{steps_per_s[new, mode]:.0f}",
                           f"{steps_per_s[new, mode] / steps_per_s[old, mode]:.2f}",
                           "yes" if final_sha[old, mode] == final_sha[new, mode] else "NO"]
                          for mode in args.modes.split(",")])
    if "agg" in parts:
        result = _child("agg", k=args.k, d=args.d, threads=args.threads, repeats=args.repeats)
        med = {name: statistics.median(t) for name, t in result["times"].items()}
        _print_table(
            f"agg: K = {args.k} updates of d = {args.d:.0e} float32, {args.threads} threads, {args.repeats} repeats; "
            f"extra = peak RSS above the inputs, in units of one d-sized buffer ({result['d_mb']:.0f} MB); "
            f"aggregation kernel: {result['native']}",
            ["method", "seconds", "× floor", "× flower-mean", "extra (d-buffers)"],
            [[name, f"{t:.3f}", f"{t / med['floor']:.2f}", f"{t / med['flower-mean']:.2f}",
              f"{result['extra_mb'][name] / result['d_mb']:.1f}"] for name, t in med.items()],
        )
    if "eval" in parts:
        metrics = {}
        for model in args.models.split(","):
            result = _child("eval", model=model, repeats=args.repeats, alpha=args.alpha)
            metrics[model] = result["metrics"]
            med = {name: statistics.median(t) for name, t in result["times"].items()}
            first = next(iter(med.values()))
            _print_table(
                f"eval: {model}, one evaluation of {result['samples']} Fashion-MNIST images (test + validation), "
                f"parent at 1 thread, {args.repeats} repeats; same bits every way: "
                f"{'yes' if result['same_bits'] else 'NO'}",
                ["way", "seconds", "× one pass"],
                [[name, f"{t:.3f}", f"{t / first:.2f}"] for name, t in med.items()],
            )
        for model in args.models.split(","):
            if model + "-maxpool2d" in metrics:
                same = metrics[model] == metrics[model + "-maxpool2d"]
                print(f"eval: {model} and {model}-maxpool2d give the same metrics (bits): {'yes' if same else 'NO'}")
    if "scale" in parts:
        result = _child("scale", population=args.population, per_round=args.per_round, rounds=args.scale_rounds,
                        store_limit_mb=args.store_limit_mb)
        _print_table(
            f"scale: SCAFFOLD, MLP, {args.population} clients (IID), {args.per_round}/round, "
            f"{args.scale_rounds} rounds, store RAM limit {args.store_limit_mb} MB",
            ["clients with c_i", "spilled to disk", "c_i total GB", "s/round", "RSS after data MB", "peak RSS MB"],
            [[str(result["clients_with_state"]), str(result["spilled"]), f"{result['control_gb']:.2f}",
              f"{result['round_s']:.2f}", f"{result['rss_after_data_mb']:.0f}", f"{result['peak_mb']:.0f}"]],
        )


if __name__ == "__main__":
    main()
