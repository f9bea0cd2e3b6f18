"""Reading run folders: a run's config (upgraded to the per-part shape), evaluations and summary.

A run folder holds ``config.toml``, ``metrics.jsonl`` (one JSON object per evaluation),
``summary.json`` and, for GMA, ``rounds.jsonl``; a run that stopped on a non-finite model holds
``diverged.json`` instead of a summary. Configs written before the per-part tables
(``server.threshold``, ``server.lr``, ``data.alpha``, ...) are read through
:func:`fedgma.config.upgrade_raw`, so old and new run folders answer the same keys
(``server.aggregator.threshold``, ``server.optimizer.lr``, ``data.partition.alpha``, ...).
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgma.checkpoint import failure_line, read_json, read_jsonl, read_toml  # errors name the damaged file
from fedgma.config import ConfigError, upgrade_raw

__all__ = [
    "PART_KEYS", "RunRecord", "find_diverged", "find_incomplete", "find_runs", "group_runs", "load_run", "part_name",
    "read_config",
]


@dataclass(frozen=True)
class RunRecord:
    """A finished run: where it is, its config, its evaluations and its summary.

    ``setting`` is the folder the run sits in, relative to the folder a report was asked for
    (e.g. ``dir0.1`` for ``runs/paper/dir0.1/<run>``), so that runs of different settings with the
    same folder name are never mixed.
    """

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    setting: str = ""

    @property
    def label(self) -> str:
        """The run's identity without its seed: setting / folder name minus ``seedN``."""
        name = self.path.name
        head, _, tail = name.rpartition("seed")
        base = head.rstrip("_") if tail.isdigit() and head else name
        return f"{self.setting}/{base}" if self.setting else base

    def rounds(self) -> list[dict[str, Any]]:
        """The per-round records (``rounds.jsonl``: train loss, GMA mask statistics), read on demand."""
        path = self.path / "rounds.jsonl"
        if not path.is_file():
            return []
        return read_jsonl(path)


#: Config keys that name a part; a bare name there is the table ``{"name": ...}``.
PART_KEYS = ("server.aggregator", "server.optimizer", "client.algorithm", "data.dataset", "data.partition", "backend")


def read_config(raw: dict[str, Any], where: str | Path = "") -> dict[str, Any]:
    """A run's raw config dict (either shape) in the per-part shape, every part written as a table.

    The earlier flat keys are moved by :func:`fedgma.config.upgrade_raw`; a flat key that the run's
    part did not take (e.g. ``server.threshold`` of a plain-averaging run of an old sweep) had no
    effect on the run and is dropped, so every finished run folder can be reported.

    Raises:
        ConfigError: the config cannot be upgraded for another reason (``where`` names the folder).
    """
    raw = copy.deepcopy(raw)
    for _ in range(64):
        try:
            upgraded = upgrade_raw(copy.deepcopy(raw))
            break
        except ConfigError as error:
            unused = re.match(r"config key '([\w.]+)' is now '[\w.]+', and ", str(error))
            if unused is None or not _pop(raw, unused.group(1)):
                raise ConfigError(f"run folder {where}: {error}") from None
    else:  # pragma: no cover - a config has far fewer keys
        raise ConfigError(f"run folder {where}: config could not be upgraded")
    for key in PART_KEYS:
        *parents, leaf = key.split(".")
        node = upgraded
        for parent in parents:
            node = node.get(parent, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and isinstance(node.get(leaf), str):
            node[leaf] = {"name": node[leaf]}
    return upgraded


def _pop(raw: dict[str, Any], dotted: str) -> bool:
    *parents, leaf = dotted.split(".")
    node = raw
    for parent in parents:
        node = node.get(parent) if isinstance(node, dict) else None
    if isinstance(node, dict) and leaf in node:
        del node[leaf]
        return True
    return False


def part_name(config: dict[str, Any], key: str) -> str | None:
    """The name of part ``key`` (e.g. ``"server.aggregator"``) in a config read by :func:`read_config`."""
    node: Any = config
    for parent in key.split("."):
        node = node.get(parent) if isinstance(node, dict) else None
    return node.get("name") if isinstance(node, dict) else node


def load_run(path: str | Path, setting: str = "") -> RunRecord:
    """The run in folder ``path``; its config in the per-part shape (:func:`read_config`)."""
    path = Path(path)
    metrics = read_jsonl(path / "metrics.jsonl")
    return RunRecord(
        path,
        read_config(read_toml(path / "config.toml"), path),
        metrics,
        read_json(path / "summary.json"),
        setting,
    )


def find_runs(root: str | Path) -> list[RunRecord]:
    """Every finished run folder (one holding ``summary.json``) under ``root``, in name order."""
    root = Path(root)
    return [load_run(marker.parent, _setting(root, marker.parent)) for marker in sorted(root.rglob("summary.json"))]


def _setting(root: Path, folder: Path) -> str:
    """The sub-folder of ``root`` that holds run ``folder`` ("" for a run in ``root`` or one level below)."""
    parent = folder.parent
    return "" if folder == root or parent == root else parent.relative_to(root).as_posix()


def group_runs(runs: Iterable[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs grouped by label (same settings, different seeds)."""
    groups: dict[str, list[RunRecord]] = defaultdict(list)
    for run in runs:
        groups[run.label].append(run)
    return dict(groups)


def find_diverged(root: str | Path) -> list[dict[str, Any]]:
    """Runs under ``root`` that stopped on a non-finite model (``diverged.json``), with their config and
    ``setting`` (the sub-folder, as :attr:`RunRecord.setting`)."""
    root = Path(root)
    found = []
    for marker in sorted(root.rglob("diverged.json")):
        config_path = marker.parent / "config.toml"
        config = read_config(read_toml(config_path), marker.parent) if config_path.is_file() else {}
        found.append({"path": marker.parent, "config": config, "setting": _setting(root, marker.parent),
                      **read_json(marker)})
    return found


def find_incomplete(root: str | Path) -> list[dict[str, Any]]:
    """Run folders under ``root`` (holding ``config.toml``) with neither ``summary.json`` nor
    ``diverged.json``: ``{"path", "status", "error"}`` where status is ``"failed"`` (the sweep wrote
    ``error.txt``; ``error`` is its last line) or ``"unfinished"`` (still running, or killed; ``error`` is
    ``""``), in path order. Report folders (no ``config.toml``) are not runs."""
    found = []
    for marker in sorted(Path(root).rglob("config.toml")):
        folder = marker.parent
        if (folder / "summary.json").is_file() or (folder / "diverged.json").is_file():
            continue
        error = failure_line(folder)
        if error is not None:
            found.append({"path": folder, "status": "failed", "error": error})
        else:
            found.append({"path": folder, "status": "unfinished", "error": ""})
    return found
