"""Sweeps: the Cartesian product of config values × seeds, one run folder each, resumable.

A run counts as finished when its folder holds a whole ``summary.json`` (written last) and
``final_model.pt``, or ``diverged.json``. A sweep started again skips finished runs and resumes
unfinished ones from their newest good checkpoint (rebuilding damaged final files the same way);
an unfinished run of another config starts over. The sweep folder is locked while a sweep runs
(a second sweep on the same ``--out`` is refused), and ``--jobs`` worker processes die with the
sweep (a parent-death signal on Linux, a watchdog thread elsewhere).

The evaluation protocol of issue 15 (:func:`tune_and_evaluate`, ``fedgma sweep --tune-server-lr``): for
every point of the grid, the server lr is tuned on at least two tuning seeds, on a log2 grid widened while
the pick lies on an edge, by validation accuracy averaged over the last 20% of rounds and over the tuning
seeds; then the evaluation seeds (disjoint from the tuning seeds) run at the chosen lr. Layout under the
sweep folder: ``<point>/tuning/lr=<lr>_seed<s>``, ``<point>/evaluation/seed<s>`` and ``lr_choices.json``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedgma.checkpoint import (
    FAILED,
    atomic_write,
    config_differences,
    final_files_problem,
    list_checkpoints,
    lock_folder,
    record_failure,
)
from fedgma.config import Config, ConfigError, load_config, parse_value

if TYPE_CHECKING:
    from fedgma.report.protocol import LrChoice

__all__ = [
    "DIVERGED", "EVALUATION", "FAILED", "LR_CAP", "LR_CHOICES", "MIN_EVALUATION_SEEDS", "TUNING", "SweepError",
    "SweepRun", "TunedPoint", "expand_grid", "log2_grid", "parse_grid", "plan_sweep", "run_sweep", "tune_and_evaluate",
    "tune_lr", "tuned_server_lrs", "widen_lr_grid",
]


@dataclass(frozen=True)
class SweepRun:
    """One point of a sweep: its overrides, the run folder, and the resolved config."""

    overrides: tuple[str, ...]
    run_dir: Path
    config: Config

    @property
    def finished(self) -> bool:
        """Done, either with whole final files (``summary.json``, ``final_model.pt``) or as a recorded divergence
        (deterministic: not worth redoing). Damaged final files do not count: the run is resumed to rebuild them."""
        if (self.run_dir / DIVERGED).is_file():
            return True
        return (self.run_dir / "summary.json").is_file() and final_files_problem(self.run_dir) is None


DIVERGED = "diverged.json"


def parse_grid(item: str) -> tuple[str, list[Any]]:
    """``key=v1,v2,...`` → (key, [v1, v2, ...]) with values parsed as TOML scalars."""
    if "=" not in item:
        raise ConfigError(f"--grid {item!r} must look like key=v1,v2,... e.g. server.aggregator.threshold=0,0.4,0.8")
    key, values = item.split("=", 1)
    parsed = [parse_value(v.strip()) for v in values.split(",") if v.strip()]
    if not parsed:
        raise ConfigError(f"--grid {key!r} has no values")
    return key.strip(), parsed


def expand_grid(grid: Sequence[tuple[str, list[Any]]]) -> list[tuple[str, ...]]:
    """Every combination of the grid as a tuple of ``key=value`` overrides (first key varies slowest)."""
    keys = [key for key, _ in grid]
    return [
        tuple(f"{k}={_format_value(v)}" for k, v in zip(keys, combo, strict=True))
        for combo in itertools.product(*(values for _, values in grid))
    ]


# Server lrs are never widened past these: [2^-12, 2^8] (a pick at a cap is reported as such, not widened).
LR_CAP = (2.0**-12, 2.0**8)


def log2_grid(center: float, below: int, above: int) -> list[float]:
    """``center · 2^k`` for k = −below, ..., above: a server-lr grid on a log2 scale, ascending.

    Raises:
        ValueError: a non-positive or non-finite center, or negative counts.
    """
    if not (center > 0 and math.isfinite(center)) or below < 0 or above < 0:
        raise ValueError(f"log2_grid needs a finite center > 0 and counts ≥ 0, got {center!r}, {below}, {above}")
    return [center * 2.0**k for k in range(-below, above + 1)]


def widen_lr_grid(scores: Mapping[float, float], steps: int = 1, cap: tuple[float, float] = LR_CAP,
                  best: float | None = None) -> list[float]:
    """The server lrs to add to a log2 grid whose pick lies on an edge; ``[]`` when the pick is interior.

    The pick (``best``, else the lr of highest score, the smallest on a tie) is an edge when it is the
    grid's smallest or largest lr: then the next ``steps`` halvings below the smallest (or doublings
    above the largest) are returned, keeping those inside ``cap`` (inclusive). A one-lr grid is on
    both edges. Run the returned lrs, score them, and call again until it returns ``[]``: the best lr
    is then interior (its neighbours on both sides scored lower) or at a cap.

    Args:
        scores: lr -> score (e.g. :func:`fedgma.report.protocol.select_lr`'s ``scores``: mean over
            tuning seeds of last-20% validation accuracy); lrs > 0.
        steps: how many factors of 2 to go beyond the edge (≥ 1).
        cap: the smallest and largest lr ever proposed.
        best: the chosen lr, if chosen elsewhere; must be one of ``scores``.

    Returns:
        The new lrs, ascending; none already in ``scores``.

    Raises:
        ValueError: no scores, a non-positive lr, ``steps`` < 1, or ``best`` not in ``scores``.
    """
    if not scores:
        raise ValueError("no lr scores to widen from")
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    grid = sorted(float(lr) for lr in scores)
    if grid[0] <= 0:
        raise ValueError(f"server lrs must be > 0, got {grid[0]!r}")
    if best is None:
        best = max(grid, key=lambda lr: (scores[lr], -lr))
    elif best not in scores:
        raise ValueError(f"best lr {best!r} is not in the grid {grid}")
    extra = []
    if best == grid[0]:
        extra += [grid[0] / 2.0**k for k in range(1, steps + 1)]
    if best == grid[-1]:
        extra += [grid[-1] * 2.0**k for k in range(1, steps + 1)]
    low, high = cap
    return sorted(lr for lr in set(extra) if low <= lr <= high and lr not in scores)


def tune_lr(score: Callable[[list[float]], Mapping[float, float]], grid: Sequence[float], steps: int = 1,
            cap: tuple[float, float] = LR_CAP, max_widenings: int = 6) -> tuple[float, dict[float, float]]:
    """Score ``grid``, then widen it (:func:`widen_lr_grid`) until the best lr is interior or at a cap.

    ``score(lrs)`` runs (or reads) the tuning runs of ``lrs`` and returns lr -> score, e.g. a resumable
    ``fedgma sweep`` over ``server.optimizer.lr`` scored by :func:`fedgma.report.protocol.select_lr`.
    Returns ``(best lr, every lr's score)``.

    Raises:
        RuntimeError: still on an edge after ``max_widenings`` widenings (say so rather than report an edge).
    """
    scores = dict(score(sorted(grid)))
    for _ in range(max_widenings):
        extra = widen_lr_grid(scores, steps, cap)
        if not extra:
            return max(scores, key=lambda lr: (scores[lr], -lr)), scores
        scores.update(score(extra))
    if widen_lr_grid(scores, steps, cap):
        raise RuntimeError(f"server lr still on an edge of {sorted(scores)} after {max_widenings} widenings")
    return max(scores, key=lambda lr: (scores[lr], -lr)), scores


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _name_parts(overrides: Sequence[str]) -> list[str]:
    """``key=value`` parts; a key is shortened to its last component unless two keys would clash
    (``server.lr`` and ``client.lr`` stay in full)."""
    keys = [item.split("=", 1)[0] for item in overrides]
    short = [key.split(".")[-1] for key in keys]
    parts = []
    for item, key, name in zip(overrides, keys, short, strict=True):
        value = item.split("=", 1)[1]
        shown = name if short.count(name) == 1 else key
        parts.append(f"{shown}={value.strip(chr(34))}")
    return parts


def _folder_name(overrides: Sequence[str], seed: int) -> str:
    """``key=value`` parts (:func:`_name_parts`) and ``seed<N>`` joined by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", "_".join([*_name_parts(overrides), f"seed{seed}"]))


def _point_name(overrides: Sequence[str]) -> str:
    """A grid point's folder name: its ``key=value`` parts joined by ``_``, or ``base`` for an empty grid."""
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", "_".join(_name_parts(overrides))) or "base"


def plan_sweep(
    config_path: str | Path | None,
    grid: Sequence[tuple[str, list[Any]]],
    seeds: int,
    out_dir: str | Path,
    base_overrides: Sequence[str] = (),
    server_lr: Mapping[tuple[str, str], float] | None = None,
) -> list[SweepRun]:
    """Resolve every run of the sweep (validating each config before anything runs).

    ``server_lr`` maps (algorithm, aggregator) to the server learning rate to use, e.g. the one
    :func:`tuned_server_lrs` chose on a tuning sweep's validation split; a run whose pair
    is missing from it is an error (the tuning did not cover it).
    """
    if seeds < 1:
        raise ConfigError(f"--seeds must be ≥ 1, got {seeds}")
    base = load_config(config_path, list(base_overrides))
    plan = []
    for combo in expand_grid(grid) or [()]:
        for offset in range(seeds):
            seed = base.seed + offset
            # each run resolves from the file, so recipe defaults follow the run's own algorithm
            overrides = [*base_overrides, *combo, f"seed={seed}"]
            config = load_config(config_path, overrides)
            if server_lr is not None:
                pair = (config.algorithm, config.server.aggregator.name)
                if pair not in server_lr:
                    known = ", ".join(f"{a}+{g}" for a, g in sorted(server_lr)) or "none"
                    raise ConfigError(f"no tuned server lr for {pair[0]}+{pair[1]} (tuned: {known})")
                config = load_config(config_path, [*overrides, f"server.optimizer.lr={server_lr[pair]!r}"])
            plan.append(SweepRun(tuple(combo), Path(out_dir) / _folder_name(combo, seed), config))
    names = [run.run_dir for run in plan]
    if len(set(names)) != len(names):
        raise ConfigError("two runs of the sweep would share a folder; give each --grid key distinct values")
    return plan


def _run_one(run: SweepRun, threads: int | None = None) -> dict[str, Any] | None:
    """Run one point: resumed from its checkpoint if its folder holds an unfinished run of the planned config,
    else from scratch (replacing whatever unfinished run of another config is there).

    Divergence (a non-finite model) is a result: it is recorded in ``diverged.json`` and the sweep
    goes on; any other error is written to ``error.txt`` and re-raised."""
    import torch

    from fedgma import simulation
    from fedgma.simulation import run as simulate

    # a non-finite model, or clients' non-finite updates computed from one, mean the run diverged
    divergence = (FloatingPointError, getattr(simulation, "BadUpdateError", FloatingPointError))
    if threads:
        torch.set_num_threads(threads)
    (run.run_dir / FAILED).unlink(missing_ok=True)  # a failure of an earlier attempt
    saved = run.run_dir / "config.toml"
    resume = (saved.is_file() and bool(list_checkpoints(run.run_dir))
              and not config_differences(run.config, saved))
    try:
        if run.config.engine == "flower":  # the point's own engine (Flower's simulation runtime, from round 1)
            from fedgma.flower.launch import run_flower

            return run_flower(run.config, run.run_dir, progress=False)
        return simulate(run.config, run.run_dir, progress=False, resume=resume, overwrite=True)
    except divergence as error:
        record = {"status": "diverged", "error": str(error), "algorithm": run.config.algorithm,
                  "aggregator": run.config.server.aggregator.name, "seed": run.config.seed}
        atomic_write(run.run_dir / DIVERGED, json.dumps(record, indent=2).encode())
        return None
    except Exception:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        record_failure(run.run_dir)
        raise


def _die_with_parent(parent: int) -> None:
    """Initializer of a ``--jobs`` worker: exit when the sweep process dies, even by SIGKILL.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere a daemon thread polls the parent's pid. A
    parent already gone when this runs (the race the signal cannot cover) ends the worker at once.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    else:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="fedgma-parent-watch").start()
    if os.getppid() != parent:
        os._exit(1)


def run_sweep(
    plan: Sequence[SweepRun],
    jobs: int = 1,
    on_done: Callable[[SweepRun, dict[str, Any] | None], None] | None = None,
) -> list[SweepRun]:
    """Run every unfinished run of ``plan``, ``jobs`` at a time in separate processes.

    ``on_done(run, summary)`` is called once per run: with ``None`` for a run finished earlier or one
    that diverged. A run that fails otherwise does not stop the others; once all have been tried, the
    first failure is raised as a :class:`SweepError` naming every failed run folder.

    Each folder holding runs of the plan is locked for the sweep's life: a second sweep there gets
    :class:`~fedgma.checkpoint.FolderInUseError`, naming the folder.
    """
    with contextlib.ExitStack() as locks:
        for folder in sorted({run.run_dir.parent for run in plan}):
            locks.enter_context(lock_folder(folder, "sweep"))
        return _run_sweep(plan, jobs, on_done)


def _run_sweep(
    plan: Sequence[SweepRun], jobs: int, on_done: Callable[[SweepRun, dict[str, Any] | None], None] | None
) -> list[SweepRun]:
    if jobs < 1:
        raise ConfigError(f"--jobs must be ≥ 1, got {jobs}")
    finished = [run.finished for run in plan]  # once: it loads each final model
    for run, done in zip(plan, finished, strict=True):
        if done:
            check_same_config(run)
    todo = [run for run, done in zip(plan, finished, strict=True) if not done]
    for run, done in zip(plan, finished, strict=True):
        if done and on_done:
            on_done(run, None)
    failures: list[tuple[SweepRun, BaseException]] = []
    if jobs <= 1:
        for run in todo:
            try:
                summary = _run_one(run)
            except Exception as error:  # noqa: BLE001  (reported below, after the other runs)
                failures.append((run, error))
                continue
            if on_done:
                on_done(run, summary)
    else:
        import multiprocessing

        threads = max(1, (os.cpu_count() or 1) // jobs)  # share the cores instead of oversubscribing them
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(_run_one, run, threads): run for run in todo}
            for future in as_completed(futures):
                try:
                    summary = future.result()
                except Exception as error:  # noqa: BLE001
                    failures.append((futures[future], error))
                    continue
                if on_done:
                    on_done(futures[future], summary)
    if failures:
        names = ", ".join(str(run.run_dir) for run, _ in failures)
        raise SweepError(f"{len(failures)} run(s) failed (see error.txt in each): {names}") from failures[0][1]
    return todo


def check_same_config(run: SweepRun) -> None:
    """A finished run is only reused if it ran the planned config (e.g. not an older tuned server lr)."""
    path = run.run_dir / "config.toml"
    if not path.is_file():
        return
    differ = config_differences(run.config, path)
    if differ:
        raise ConfigError(
            f"run folder {run.run_dir} holds a finished run of another config ({', '.join(differ[:3])}); "
            "use another --out or remove that folder"
        )


class SweepError(RuntimeError):
    """Some runs of a sweep failed; the message names their folders."""


# The evaluation protocol (issue 15): tune the server lr per grid point on tuning seeds, evaluate on others.

TUNING, EVALUATION, LR_CHOICES = "tuning", "evaluation", "lr_choices.json"
MIN_EVALUATION_SEEDS = 5  # the protocol's evaluation seeds per reported comparison (fewer: a warning)
_LR_KEYS = ("server.optimizer.lr", "server.lr")


@dataclass(frozen=True)
class TunedPoint:
    """One grid point of :func:`tune_and_evaluate`: its ``overrides``, its ``folder`` (``<out>/<point>``), the
    chosen server ``lr`` and every tried lr's ``scores`` (validation accuracy averaged over the last 20% of
    rounds and over the tuning seeds; a diverged run scores 0). ``edge`` is "low" or "high" when the pick
    is still the grid's smallest or largest lr: then ``capped`` says whether widening stopped at
    :data:`LR_CAP` (true) or after the allowed number of widenings (false)."""

    overrides: tuple[str, ...]
    folder: Path
    lr: float
    scores: dict[float, float]
    edge: str | None
    capped: bool

    @property
    def name(self) -> str:
        return self.folder.name

    def record(self, tuning_seeds: Sequence[int], evaluation_seeds: Sequence[int]) -> dict[str, Any]:
        """The point's entry of ``lr_choices.json``."""
        return {"overrides": list(self.overrides), "lr": self.lr,
                "scores": {repr(lr): score for lr, score in sorted(self.scores.items())},
                "edge": self.edge, "on_cap": self.capped,
                "metric": "validation_accuracy, mean over the last 20% of rounds and over the tuning seeds",
                "tuning_seeds": list(tuning_seeds), "evaluation_seeds": list(evaluation_seeds)}


def tune_and_evaluate(
    config_path: str | Path | None,
    grid: Sequence[tuple[str, list[Any]]],
    out_dir: str | Path,
    tuning_seeds: Sequence[int],
    seeds: int,
    base_overrides: Sequence[str] = (),
    start_grid: Sequence[float] | None = None,
    jobs: int = 1,
    on_plan: Callable[[list[SweepRun]], None] | None = None,
    on_done: Callable[[SweepRun, dict[str, Any] | None], None] | None = None,
    on_tuned: Callable[[list[TunedPoint]], None] | None = None,
    steps: int = 1,
    cap: tuple[float, float] = LR_CAP,
    max_widenings: int = 6,
) -> list[TunedPoint]:
    """The protocol as a sweep: per point of ``grid``, tune ``server.optimizer.lr``, then run the evaluation seeds.

    For every point, the tuning runs (``<out>/<point>/tuning/lr=<lr>_seed<s>``, one per lr and tuning
    seed) start from ``start_grid`` (default: the point's resolved server lr × {0.5, 1, 2}, a log2
    grid) and the grid is widened by factors of 2 (:func:`widen_lr_grid`, within ``cap``, at most
    ``max_widenings`` times) while the pick lies on an edge; lrs are scored by
    :func:`fedgma.report.protocol.select_lr` (validation accuracy averaged over the last 20% of rounds
    and over the tuning seeds). The ``seeds`` evaluation seeds (the config's seed, seed + 1, ...) then
    run at the chosen lr in ``<out>/<point>/evaluation/seed<s>``, and ``<out>/lr_choices.json`` maps each
    point to its choice (:meth:`TunedPoint.record`; entries of other points already there are kept).

    All points advance together, so ``jobs`` processes share every stage's runs. Finished runs are
    skipped and their scores read again from their metrics, so a rerun after an interruption replays
    the same widenings at no cost and goes on where it stopped. ``on_plan(runs)`` is called before each
    stage's runs, ``on_done`` as in :func:`run_sweep`, ``on_tuned(points)`` once the lrs are chosen.

    Raises:
        ConfigError: fewer than 2 tuning seeds, a tuning seed among the evaluation seeds, a point without a
            validation split (``data.validation_fraction`` = 0), the server lr or the seed as a grid key, a
            non-positive lr in ``start_grid``, or points sharing a folder.
        SweepError: runs of a stage failed (after every run of that stage was tried).
    """
    from fedgma.checkpoint import read_jsonl
    from fedgma.report.protocol import check_seeds, select_lr

    if seeds < 1:
        raise ConfigError(f"--seeds must be ≥ 1, got {seeds}")
    out_dir = Path(out_dir)
    tuning_seeds = list(dict.fromkeys(int(s) for s in tuning_seeds))  # a seed given twice is one seed
    evaluation_seeds = [load_config(config_path, list(base_overrides)).seed + i for i in range(seeds)]
    try:
        check_seeds(tuning_seeds, evaluation_seeds, min_evaluation=1)
    except ValueError as error:
        raise ConfigError(f"--tuning-seeds: {error} (evaluation seeds: {evaluation_seeds})") from None
    for key, _ in grid:
        if key in _LR_KEYS or key == "seed":
            raise ConfigError(f"--grid {key}: with --tune-server-lr the server lr is tuned and the seeds are "
                              "--tuning-seeds and --seeds; drop this --grid")
    if start_grid is not None:
        start_grid = sorted({float(lr) for lr in start_grid})
        if not start_grid or not all(0 < lr < math.inf for lr in start_grid):
            raise ConfigError(f"--tune-server-lr: the start grid needs server lrs > 0, got {start_grid}")

    points: list[tuple[tuple[str, ...], Path, list[float]]] = []
    for combo in expand_grid(grid) or [()]:
        config = load_config(config_path, [*base_overrides, *combo])
        if not config.data.validation_fraction > 0:
            where = f" (grid point {' '.join(combo)})" if combo else ""
            raise ConfigError(f"--tune-server-lr chooses the server lr on validation accuracy, but "
                              f"data.validation_fraction = 0{where}; set it, e.g. --set data.validation_fraction=0.1")
        lrs = list(start_grid) if start_grid is not None else log2_grid(config.server.optimizer.lr, 1, 1)
        points.append((tuple(combo), out_dir / _point_name(combo), lrs))
    if len({folder for _, folder, _ in points}) != len(points):
        raise ConfigError("two points of the sweep would share a folder; give each --grid key distinct values")

    def tuning_plan(combo: tuple[str, ...], folder: Path, lrs: list[float]) -> list[SweepRun]:
        return [run for seed in tuning_seeds
                for run in plan_sweep(config_path, [("server.optimizer.lr", lrs)], 1, folder / TUNING,
                                      [*base_overrides, *combo, f"seed={seed}"])]

    with lock_folder(out_dir, "sweep"):
        runs: dict[int, dict[float, dict[int, Any]]] = {i: {} for i in range(len(points))}
        choices: dict[int, LrChoice] = {}
        pending = {i: lrs for i, (_, _, lrs) in enumerate(points)}
        widenings = 0
        while pending:
            plans = {i: tuning_plan(*points[i][:2], lrs) for i, lrs in pending.items()}
            stage = [run for plan in plans.values() for run in plan]
            if on_plan:
                on_plan(stage)
            run_sweep(stage, jobs, on_done)
            for i, plan in plans.items():
                for run in plan:
                    lr, seed = float(run.config.server.optimizer.lr), run.config.seed
                    diverged = (run.run_dir / DIVERGED).is_file()
                    runs[i].setdefault(lr, {})[seed] = None if diverged else read_jsonl(run.run_dir / "metrics.jsonl")
                try:
                    choices[i] = select_lr(runs[i], min_seeds=len(tuning_seeds))
                except ValueError as error:
                    raise ConfigError(f"{points[i][1] / TUNING}: {error}") from None
            widenings += 1
            pending = {}
            if widenings <= max_widenings:
                for i, choice in choices.items():
                    extra = widen_lr_grid(choice.scores, steps, cap, best=choice.lr)
                    if extra:
                        pending[i] = extra
        tuned = []
        for i, (combo, folder, _) in enumerate(points):
            choice = choices[i]
            capped = choice.edge is not None and not widen_lr_grid(choice.scores, steps, cap, best=choice.lr)
            tuned.append(TunedPoint(combo, folder, choice.lr, dict(choice.scores), choice.edge, capped))
        path = out_dir / LR_CHOICES
        recorded = json.loads(path.read_text()) if path.is_file() else {}
        recorded.update({point.name: point.record(tuning_seeds, evaluation_seeds) for point in tuned})
        atomic_write(path, (json.dumps(recorded, indent=2) + "\n").encode())
        if on_tuned:
            on_tuned(tuned)
        stage = [run for point in tuned
                 for run in plan_sweep(config_path, [], seeds, point.folder / EVALUATION,
                                       [*base_overrides, *point.overrides, f"server.optimizer.lr={point.lr!r}"])]
        if on_plan:
            on_plan(stage)
        run_sweep(stage, jobs, on_done)
    return tuned


def tuned_server_lrs(root: str | Path, key: str = "validation_accuracy",
                     min_seeds: int = 1) -> dict[tuple[str, str], LrChoice]:
    """Per (algorithm, aggregator) of the finished runs under ``root``, the server lr chosen by
    :func:`fedgma.report.protocol.select_lr`: ``key`` averaged over the last 20% of each run's rounds,
    then over its runs (seeds); a diverged run scores 0; a tie goes to the smallest lr.

    Returns:
        ``{(algorithm, aggregator): LrChoice}`` (``lr``, every lr's ``scores``, ``edge``).

    Raises:
        ValueError: no finished run under ``root``, a run without ``key`` (tuning needs
            ``data.validation_fraction`` > 0), or an lr with fewer than ``min_seeds`` runs.
    """
    from fedgma.report.protocol import select_lr
    from fedgma.report.runs import find_diverged, find_runs, part_name

    def server_lr(config: Mapping[str, Any], where: Path) -> float:
        lr = config.get("server", {}).get("optimizer", {}).get("lr")
        if lr is None:
            raise ValueError(f"run {where}: config.toml has no server.optimizer.lr")
        return float(lr)

    runs: dict[tuple[str, str], dict[float, dict[str, Any]]] = {}
    for run in find_runs(root):
        pair = (run.summary["algorithm"], run.summary["aggregator"])
        runs.setdefault(pair, {}).setdefault(server_lr(run.config, run.path), {})[str(run.path)] = run.metrics
    for item in find_diverged(root):
        config = item["config"]
        if config:
            pair = (config["algorithm"], part_name(config, "server.aggregator"))
            runs.setdefault(pair, {}).setdefault(server_lr(config, item["path"]), {})[str(item["path"])] = None
    if not runs:
        raise ValueError(f"no finished tuning runs under {root}")
    chosen = {}
    for pair, by_lr in sorted(runs.items()):
        try:
            chosen[pair] = select_lr(by_lr, key, min_seeds=min_seeds)
        except ValueError as error:
            raise ValueError(f"--server-lr-from {root}, {pair[0]}+{pair[1]}: {error}") from None
    return chosen
