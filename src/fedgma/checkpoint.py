"""Checkpoints of a run, written atomically and checked on load, so a killed run can be resumed exactly.

A checkpoint is one file ``<run>/checkpoints/round-NNNNNN.pt``: a magic line, the SHA-256 of the
payload, then the payload (``torch.save`` of a plain dict of tensors and numbers). It is written to a
temporary file, flushed to disk, then renamed over its final name, so a crash at any moment leaves
either the old set of checkpoints or the new one, never a half-written file under a final name
(the approach of NVFlare's snapshots and of most databases). On load the checksum is verified; a
corrupt or truncated file raises :class:`CheckpointError`, and :func:`latest_checkpoint` falls back to
the previous good one with a warning. The newest ``keep`` checkpoints are kept.

:func:`truncate_jsonl` cuts a run's ``metrics.jsonl`` / ``rounds.jsonl`` back to the checkpointed round
(dropping a half-written last line), so the resumed run appends exactly what the killed one would have.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "truncate_jsonl",
]

MAGIC = b"FEDGMA-CHECKPOINT v1\n"
KEEP = 2
_NAME = re.compile(r"^round-(\d{6,})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or belongs to another config; the message names the file."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(round, path)`` of every checkpoint file in the run folder, oldest first (contents not checked)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, round_index: int, state: dict[str, Any], keep: int = KEEP) -> Path:
    """Write ``state`` as the checkpoint of ``round_index`` (temp file, fsync, rename); keep the newest ``keep``."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    path = folder / f"round-{round_index:06d}.pt"
    temporary = folder / f".{path.name}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(MAGIC + digest + b"\n" + payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_dir(folder)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and verify one checkpoint file; raise :class:`CheckpointError` if it is truncated or corrupt."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    header = len(MAGIC) + 64 + 1
    if not raw.startswith(MAGIC) or len(raw) < header or raw[header - 1 : header] != b"\n":
        raise CheckpointError(f"checkpoint {path} is truncated or not a fedgma checkpoint (bad header)")
    expected, payload = raw[len(MAGIC) : header - 1].decode("ascii", "replace"), raw[header:]
    if hashlib.sha256(payload).hexdigest() != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (SHA-256 checksum mismatch)")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as error:  # a payload with a valid checksum that torch cannot read: wrong writer
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from None


def latest_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The newest checkpoint that passes its checksum (warning about each bad one skipped), or None."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as error:
            warnings.warn(f"{error}; falling back to the previous checkpoint", RuntimeWarning, stacklevel=2)
    return None


def truncate_jsonl(path: str | Path, last_round: int) -> list[dict[str, Any]]:
    """Keep only the records of ``path`` with ``round ≤ last_round`` (rewritten atomically); return them.

    A line that is not valid JSON (the half-written last line of a killed run) is dropped.
    """
    path = Path(path)
    kept: list[dict[str, Any]] = []
    lines: list[str] = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("round"), int) and record["round"] <= last_round:
                kept.append(record)
                lines.append(line + "\n")  # verbatim, so kept lines stay byte-identical
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(lines))
    os.replace(temporary, path)
    return kept
