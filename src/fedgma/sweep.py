"""Sweeps: the Cartesian product of config values × seeds, one run folder each, resumable.

A run counts as finished when its folder holds ``summary.json`` (written last), so a sweep
started again skips finished runs and redoes only unfinished ones.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgma.config import Config, ConfigError, load_config, parse_value

__all__ = ["SweepRun", "expand_grid", "parse_grid", "plan_sweep", "run_sweep"]


@dataclass(frozen=True)
class SweepRun:
    """One point of a sweep: its overrides, the run folder, and the resolved config."""

    overrides: tuple[str, ...]
    run_dir: Path
    config: Config

    @property
    def finished(self) -> bool:
        return (self.run_dir / "summary.json").is_file()


def parse_grid(item: str) -> tuple[str, list[Any]]:
    """``key=v1,v2,...`` → (key, [v1, v2, ...]) with values parsed as TOML scalars."""
    if "=" not in item:
        raise ConfigError(f"--grid {item!r} must look like key=v1,v2,... e.g. server.threshold=0,0.4,0.8")
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


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _folder_name(overrides: Sequence[str], seed: int) -> str:
    parts = []
    for item in overrides:
        key, value = item.split("=", 1)
        parts.append(f"{key.split('.')[-1]}={value.strip(chr(34))}")
    name = "_".join([*parts, f"seed{seed}"])
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", name)


def plan_sweep(
    config_path: str | Path | None,
    grid: Sequence[tuple[str, list[Any]]],
    seeds: int,
    out_dir: str | Path,
    base_overrides: Sequence[str] = (),
) -> list[SweepRun]:
    """Resolve every run of the sweep (validating each config before anything runs)."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be ≥ 1, got {seeds}")
    base = load_config(config_path, list(base_overrides))
    plan = []
    for combo in expand_grid(grid) or [()]:
        for offset in range(seeds):
            seed = base.seed + offset
            # each run resolves from the file, so recipe defaults follow the run's own algorithm
            config = load_config(config_path, [*base_overrides, *combo, f"seed={seed}"])
            plan.append(SweepRun(tuple(combo), Path(out_dir) / _folder_name(combo, seed), config))
    return plan


def _run_one(run: SweepRun, threads: int | None = None) -> dict[str, Any]:
    import torch

    from fedgma.simulation import run as simulate

    if threads:
        torch.set_num_threads(threads)
    if run.run_dir.exists():
        shutil.rmtree(run.run_dir)  # an unfinished run: start it again from scratch
    return simulate(run.config, run.run_dir, progress=False)


def run_sweep(
    plan: Sequence[SweepRun],
    jobs: int = 1,
    on_done: Callable[[SweepRun, dict[str, Any] | None], None] | None = None,
) -> list[SweepRun]:
    """Run every unfinished run of ``plan``, ``jobs`` at a time in separate processes."""
    todo = [run for run in plan if not run.finished]
    for run in plan:
        if run.finished and on_done:
            on_done(run, None)
    if jobs <= 1:
        for run in todo:
            summary = _run_one(run)
            if on_done:
                on_done(run, summary)
        return todo
    import multiprocessing
    import os

    threads = max(1, (os.cpu_count() or 1) // jobs)  # share the cores instead of oversubscribing them
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_one, run, threads): run for run in todo}
        for future in as_completed(futures):
            summary = future.result()
            if on_done:
                on_done(futures[future], summary)
    return todo
