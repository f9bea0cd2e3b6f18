"""Stage the science suite of issue 15 (where does GMA help?): a coarse stage, then the full one.

    python scripts/science.py coarse [--out runs/science] [--jobs 2] [--study NAME ...]
    python scripts/science.py full   [--out runs/science] [--jobs 2] [--study NAME ...]
    python scripts/science.py coarse --smoke --out /tmp/science-smoke   # digits, 2 rounds: checks the script
    python scripts/science.py report [--out runs/science] [--to docs/results/science]
    python scripts/science.py status [--out runs/science] [--study NAME ...]   # where each point stands

The studies are in scripts/science_suite.toml (each a grid of config overrides on configs/science/base.toml,
crossed with the aggregators compared). For every point of a study and every aggregator:

* **coarse**: one seed (``coarse_seed``), a short horizon (``coarse_rounds``); the server lr starts at the
  recipe's default times ``coarse_lrs`` and is widened on a log2 scale while the pick is on an edge
  (:func:`fedgma.sweep.tune_lr`). Picks go to ``<out>/coarse/lrs.json``.
* **full**: the grid {pick/2, pick, 2·pick} around the coarse pick (widened the same way), tuned on the
  ``tuning_seeds`` (≥ 2) by validation accuracy averaged over the last 20% of rounds
  (:func:`fedgma.report.protocol.select_lr`); then the ``evaluation_seeds`` (≥ 5, disjoint) at the chosen lr,
  which is what reports compare. Picks go to ``<out>/full/lrs.json``.

* **report**: ``fedgma report`` over the full stage's evaluation folders (the comparisons) into ``<to>``,
  and over its tuning folders into ``<to>/tuning`` (every lr, on the tuning seeds); a study with
  ``report = "<folder>"`` in the suite (the CNN) gets its own tables, and its own Holm family, in
  ``<to>/<folder>`` and ``<to>/<folder>/tuning``, leaving the main table's as they were; for every study
  (those with their own tables too), in ``<to>``: the lr choices of
  both stages as ``lr_choices.csv``; ``stages.jsonl``; and every run's config, summary, metrics and
  per-round log packed in ``runs.tar.xz``, so anyone can recompute the tables.

Every run is a ``fedgma sweep`` run (:func:`fedgma.sweep.plan_sweep` / :func:`~fedgma.sweep.run_sweep`):
finished runs are skipped and interrupted ones resume from their checkpoint, so running a stage again
after an interruption loses nothing. Each stage appends to ``<out>/stages.jsonl`` when it starts and when
it ends: the commit (and whether the tree had uncommitted changes), wall time and process time (CPU seconds
of this process and its workers).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from itertools import product
from pathlib import Path
from typing import Any

import tomllib

from fedgma.checkpoint import read_jsonl
from fedgma.config import load_config
from fedgma.report.protocol import check_seeds, select_lr
from fedgma.sweep import DIVERGED, log2_grid, plan_sweep, run_sweep, tune_lr

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "scripts" / "science_suite.toml"
BASE = ROOT / "configs" / "science" / "base.toml"
# --smoke: scikit-learn's digits, 2 rounds, every evaluation; checks the machinery in seconds.
SMOKE = ["data.dataset=digits", "data.num_clients=10", "data.partition.min_size=5", "rounds=2", "eval_every=1",
         "client.batch_size=16", "client.lr=0.05"]


def commit() -> dict[str, Any]:
    """The checked-out commit and whether the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def process_s() -> float:
    """CPU seconds (user + system) of this process and its finished children (sweep workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def points(study: dict[str, Any]) -> list[list[str]]:
    """Every combination of a study's grid as ``key=value`` overrides (values written as TOML)."""
    grid = study.get("grid", {})
    keys = list(grid)
    return [[f"{k}={_toml(v)}" for k, v in zip(keys, combo, strict=True)] for combo in product(*grid.values())]


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return value if value.startswith(("{", '"')) else json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _name(overrides: list[str]) -> str:
    """A folder name for a point: ``clients_per_round=5``, ``partition=dirichlet-alpha0.1-min_size10``, ``base``."""
    parts = []
    for override in overrides:
        key, _, value = override.partition("=")
        if value.startswith("{"):  # an inline table: its values, with the keys of the numbers
            table = tomllib.loads(f"v = {value}")["v"]
            value = "-".join(str(v) if isinstance(v, str) else f"{k}{v}" for k, v in table.items())
        parts.append(f"{key.split('.')[-1]}={value}")
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", "_".join(parts).replace('"', "") or "base").strip("-")


class Stage:
    def __init__(self, name: str, out: Path, jobs: int, smoke: bool, protocol: dict[str, Any]) -> None:
        self.name, self.out, self.jobs, self.smoke, self.protocol = name, out / name, jobs, smoke, protocol

    def runs(self, folder: Path, overrides: list[str], lr: float, first_seed: int, seeds: int) -> list[Path]:
        """Run (or reuse) ``seeds`` seeds from ``first_seed`` at server lr ``lr``; their folders."""
        plan = plan_sweep(BASE, [("server.optimizer.lr", [lr])], seeds, folder,
                          [*overrides, f"seed={first_seed}"])
        run_sweep(plan, self.jobs)
        return [run.run_dir for run in plan]

    def scores(self, folder: Path, overrides: list[str], seeds: list[int], min_seeds: int):
        def score(lrs: list[float]) -> dict[float, float]:
            by_lr = {}
            for lr in lrs:
                dirs = self.runs(folder, overrides, lr, seeds[0], len(seeds))
                by_lr[lr] = {i: None if (d / DIVERGED).is_file() else read_jsonl(d / "metrics.jsonl")
                             for i, d in enumerate(dirs)}
            return select_lr(by_lr, fraction=self.protocol["fraction"], min_seeds=min_seeds).scores

        return score


def picks_of(folder: Path) -> dict[str, Any]:
    """A stage's server-lr picks, ``<folder>/lrs.json`` (``{}`` before its first point is done)."""
    path = folder / "lrs.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_stage(stage: Stage, suite: dict[str, Any], studies: list[str]) -> dict[str, Any]:
    protocol = suite["protocol"]
    # picks of earlier runs of this stage (other studies) are kept: a stage run per group of studies
    # must not drop the record of the groups before it
    picks = picks_of(stage.out)
    coarse = {} if stage.name == "coarse" else json.loads((stage.out.parent / "coarse" / "lrs.json").read_text())
    for name in studies:
        study = suite["studies"][name]
        for point in points(study):
            for method in study["methods"]:
                overrides = [*(SMOKE if stage.smoke else []), *study.get("overrides", []), *point,
                             f"server.aggregator={{name = {json.dumps(method)}}}"]
                key = f"{name}/{_name(point)}/{method}"
                folder = stage.out / name / _name(point) / method
                if stage.name == "coarse":
                    overrides.append(f"rounds={2 if stage.smoke else protocol['coarse_rounds']}")
                    default = load_config(BASE, overrides).server.optimizer.lr
                    grid = [default * f for f in protocol["coarse_lrs"]]
                    score = stage.scores(folder / "tuning", overrides, [protocol["coarse_seed"]], 1)
                    best, scores = tune_lr(score, grid)
                    picks[key] = {"lr": best, "scores": {f"{lr:g}": s for lr, s in sorted(scores.items())}}
                    continue
                tuning = protocol["tuning_seeds"]
                evaluation = study.get("evaluation_seeds", protocol["evaluation_seeds"])
                check_seeds(tuning, evaluation, min_evaluation=3 if "evaluation_seeds" in study else 5)  # the CNN: 3
                score = stage.scores(folder / "tuning", overrides, tuning, 2)
                best, scores = tune_lr(score, log2_grid(coarse[key]["lr"], 1, 1))
                stage.runs(folder / "evaluation", overrides, best, evaluation[0], len(evaluation))
                picks[key] = {"lr": best, "scores": {f"{lr:g}": s for lr, s in sorted(scores.items())}}
            (stage.out / "lrs.json").write_text(json.dumps(picks, indent=2))
    return picks


RUN_FILES = ("config.toml", "summary.json", "metrics.jsonl", "rounds.jsonl")


def lr_rows(out: Path) -> list[dict[str, Any]]:
    """One row per stage, study point and method: the chosen server lr, whether it is the grid's edge, every score."""
    rows = []
    for stage in ("coarse", "full"):
        for key, pick in picks_of(out / stage).items():
            study, point, method = key.split("/")
            lrs = sorted(float(lr) for lr in pick["scores"])
            rows.append({"stage": stage, "study": study, "point": point, "method": method, "lr": pick["lr"],
                         "on_edge": pick["lr"] in (lrs[0], lrs[-1]),
                         "scores": " ".join(f"{lr:g}:{pick['scores'][f'{lr:g}']:.4f}" for lr in lrs)})
    return rows


def status(out: Path, suite: dict[str, Any], studies: list[str]) -> list[dict[str, Any]]:
    """Where each point and method of ``studies`` stands: its coarse pick, and its full stage's finished tuning
    and evaluation runs against the planned ones (3 lrs × the tuning seeds, more if the grid widens; the
    evaluation seeds). Reads the run folders only; starts nothing."""
    protocol = suite["protocol"]

    def finished(folder: Path) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(folder.glob("*/summary.json"))]

    coarse, full = picks_of(out / "coarse"), picks_of(out / "full")
    rows = []
    for name in studies:
        study = suite["studies"][name]
        evaluation = study.get("evaluation_seeds", protocol["evaluation_seeds"])
        for point in points(study):
            for method in study["methods"]:
                key = f"{name}/{_name(point)}/{method}"
                folder = out / "full" / name / _name(point) / method
                tuning, evaluated = finished(folder / "tuning"), finished(folder / "evaluation")
                rows.append({
                    "key": key,
                    "coarse_lr": coarse.get(key, {}).get("lr"),
                    "tuning_runs": len(tuning),
                    "tuning_planned": max(3 * len(protocol["tuning_seeds"]), len(tuning)),
                    "evaluation_runs": len(evaluated),
                    "evaluation_planned": len(evaluation),
                    "done": key in full,
                    "wall_s": [r["wall_s"] for r in tuning + evaluated if "wall_s" in r],
                })
    return rows


def print_status(rows: list[dict[str, Any]]) -> None:
    """The table of :func:`status`, and the runs left with a rough wall-time estimate: each method's runs left at
    the median wall of its finished runs (of its point's, where it has none yet; of the stage's, where neither has).
    Methods differ: a SCAFFOLD run of the CNN study takes longer than a FedAvg one."""
    print(f"{'point / method':<75} {'coarse lr':>9} {'tuning':>7} {'evaluation':>10}  done")
    for r in rows:
        lr = "—" if r["coarse_lr"] is None else f"{r['coarse_lr']:g}"
        print(f"{r['key']:<75} {lr:>9} {r['tuning_runs']:>3}/{r['tuning_planned']:<3} "
              f"{r['evaluation_runs']:>5}/{r['evaluation_planned']:<4}  {'yes' if r['done'] else 'no'}")
    stage = [w for r in rows for w in r["wall_s"]]

    def wall(row: dict[str, Any]) -> float:
        point = [w for r in rows if r["key"].rsplit("/", 1)[0] == row["key"].rsplit("/", 1)[0] for w in r["wall_s"]]
        return statistics.median_high(row["wall_s"] or point or stage)

    pending = [(r, r["tuning_planned"] - r["tuning_runs"] + r["evaluation_planned"] - r["evaluation_runs"])
               for r in rows if not r["done"]]
    left = sum(n for _, n in pending)
    done = f"full stage: {sum(r['done'] for r in rows)} of {len(rows)} points and methods done"
    if not left:
        print(f"{done}; no run left")
        return
    estimate = (f", ≈ {sum(n * wall(r) for r, n in pending if n) / 3600:.1f} h of wall at each method's median "
                "finished run" if stage else "")
    print(f"{done}; at least {left} run{'s' if left > 1 else ''} left (more where a grid widens){estimate}; "
          "resumed runs report only their last part's wall time")


def report(out: Path, to: Path) -> int:
    """Tables of the full stage (``fedgma report``), the lr choices, the stage log and the packed runs, into ``to``."""
    fedgma = shutil.which("fedgma") or str(Path(sys.executable).parent / "fedgma")
    # only points whose full stage is complete (in full/lrs.json, written once a point's evaluation seeds
    # have all run): a stage cut short must not report a point on fewer seeds than the protocol asks
    done = picks_of(out / "full")
    # a study with `report = "<folder>"` in the suite answers its own question (the CNN): its own tables in
    # <to>/<folder>, its own Holm family, and the main table's comparisons and corrections stay as they were
    separate = {name: study["report"] for name, study in tomllib.loads(SUITE.read_text())["studies"].items()
                if "report" in study}
    tables = {to: ("science suite", [k for k in sorted(done) if k.split("/")[0] not in separate])}
    for name, folder in separate.items():
        tables[to / folder] = (f"science suite, {name} study", [k for k in sorted(done) if k.split("/")[0] == name])
    if not any(keys for _, keys in tables.values()):
        print(f"science report: no evaluation runs under {out / 'full'}; run the full stage first", file=sys.stderr)
        return 1
    for folder, (title, keys) in tables.items():
        if not keys:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        evaluation = [out / "full" / key / "evaluation" for key in keys]
        tuning = [out / "full" / key / "tuning" for key in keys]
        subprocess.run([fedgma, "report", *map(str, evaluation), "--out", str(folder),
                        "--title", f"{title}, evaluation seeds ({len(keys)} points and methods)"], check=True)
        subprocess.run([fedgma, "report", *map(str, tuning), "--out", str(folder / "tuning"),
                        "--title", f"{title}, tuning seeds ({len(keys)} points and methods)"], check=True)
    rows = lr_rows(out)
    with (to / "lr_choices.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["stage", "study", "point", "method", "lr", "on_edge", "scores"])
        writer.writeheader()
        writer.writerows(rows)
    shutil.copyfile(out / "stages.jsonl", to / "stages.jsonl")
    with tarfile.open(to / "runs.tar.xz", "w:xz") as archive:
        for summary in sorted(out.glob("*/**/summary.json")):
            for name in RUN_FILES:
                if (summary.parent / name).is_file():
                    archive.add(summary.parent / name, arcname=str((summary.parent / name).relative_to(out)))
    print(f"science report: {len(done)} evaluation folders, {len(rows)} lr choices; tables in "
          + ", ".join(str(folder) for folder, (_, keys) in tables.items() if keys))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["coarse", "full", "report", "status"])
    parser.add_argument("--to", type=Path, default=ROOT / "docs" / "results" / "science",
                        help="report: the folder the tables go to")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "science")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--study", action="append", help="only these studies (repeatable); default: all")
    parser.add_argument("--smoke", action="store_true", help="digits, 2 rounds: check the script, not the science")
    args = parser.parse_args(argv)
    if args.stage == "report":
        return report(args.out, args.to)
    suite = tomllib.loads(SUITE.read_text())
    studies = args.study or list(suite["studies"])
    unknown = sorted(set(studies) - set(suite["studies"]))
    if unknown:
        parser.error(f"unknown studies {unknown}; known: {', '.join(suite['studies'])}")
    if args.stage == "status":
        print_status(status(args.out, suite, studies))
        return 0
    stage = Stage(args.stage, args.out, args.jobs, args.smoke, suite["protocol"])
    stage.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "stages.jsonl"
    start, cpu = time.time(), process_s()
    record = {"stage": args.stage, "studies": studies, "smoke": args.smoke, **commit(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with log.open("a") as file:
        file.write(json.dumps({**record, "event": "start"}) + "\n")
    before = set(picks_of(stage.out))
    picks = run_stage(stage, suite, studies)
    points_run = len(set(picks) - before) or len(picks)
    with log.open("a") as file:
        file.write(json.dumps({**record, "event": "end", "wall_s": round(time.time() - start, 1),
                               "process_s": round(process_s() - cpu, 1), "points": points_run}) + "\n")
    print(f"{args.stage}: {points_run} points in {time.time() - start:.0f} s; lrs in {stage.out / 'lrs.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
