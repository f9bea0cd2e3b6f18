"""Where the Flower engine's time goes, against the simulator: start-up and time per round, measured in one run.

    .venv/bin/python benchmarks/flower_engine.py                 # quickstart MLP and CNN, 6 rounds each
    .venv/bin/python benchmarks/flower_engine.py --models mlp --rounds 4

For each model it runs configs/quickstart.toml (Fashion-MNIST, 100 clients, 10 per round, eval every
round here) with ``fedgma.simulation.run`` and with ``fedgma.flower.launch.run_flower`` (``fedgma run
--engine flower``), and splits each run's wall time into

* ``launch``: before the ServerApp starts (the SuperLink, ``flwr run``, the simulation process and
  its imports; 0 for the simulator): the command's wall time less the summary's ``wall_s``;
* ``setup``: the run's own start (data, model, initial evaluation): ``wall_s`` less the rounds;
* ``round 1``: the first round (on Flower it includes starting Ray's ClientApp actors, each of
  which imports torch and fedgma and builds the federated data set once);
* ``per round``: the median of rounds 2..R (``round_s`` in rounds.jsonl, evaluation included).

It prints each figure on both engines and their ratio (flower / simulator).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from fedgma.config import load_config
from fedgma.flower.launch import run_flower
from fedgma.simulation import run

ROOT = Path(__file__).resolve().parent.parent


def measure(engine: str, model: str, rounds: int, out: Path) -> dict[str, float]:
    config = load_config(ROOT / "configs" / "quickstart.toml",
                         [f"model.name={model}", f"rounds={rounds}", "eval_every=1", f"engine={engine}"])
    start = time.perf_counter()
    summary = run(config, out, progress=False) if engine == "fedgma" else run_flower(config, out, progress=False)
    wall = time.perf_counter() - start
    round_s = [json.loads(line)["round_s"] for line in (out / "rounds.jsonl").read_text().splitlines()]
    return {
        "total": wall,
        "launch": wall - summary["wall_s"],
        "setup": summary["wall_s"] - sum(round_s),
        "round 1": round_s[0],
        "per round": statistics.median(round_s[1:]),
        "accuracy": summary["final"]["test_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            ours = measure("fedgma", model, args.rounds, Path(tmp) / f"{model}-fedgma")
            theirs = measure("flower", model, args.rounds, Path(tmp) / f"{model}-flower")
            print(f"\n{model}, {args.rounds} rounds   simulator    flower   ratio")
            for key in ("total", "launch", "setup", "round 1", "per round"):
                ratio = theirs[key] / ours[key] if ours[key] > 1e-3 else float("nan")
                print(f"  {key:<12} {ours[key]:9.2f} s {theirs[key]:8.2f} s {ratio:7.1f}x")
            print(f"  final test accuracy {ours['accuracy']:.4f} / {theirs['accuracy']:.4f}")


if __name__ == "__main__":
    main()
