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

The run folder's own files follow the same rules: :func:`atomic_write` (temp file, fsync, rename)
writes ``final_model.pt`` and then ``summary.json``, the summary last as the mark of a finished run;
:func:`final_files_problem` says whether both are whole; :func:`read_json` names the file it cannot
parse; :func:`lock_folder` holds an advisory lock (``fcntl.flock``) on a run or sweep folder for a
writer's life, so a second writer is refused in one line. A run that failed (a sweep's run, a Flower
ServerApp) leaves its traceback in ``error.txt`` (:data:`FAILED`, :func:`record_failure`), whose last
line :func:`failure_line` reads back.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "FAILED",
    "CheckpointError",
    "FolderInUseError",
    "RunFolderError",
    "atomic_write",
    "checkpoint_dir",
    "config_differences",
    "failure_line",
    "final_files_problem",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_final_model",
    "lock_folder",
    "read_json",
    "read_jsonl",
    "read_toml",
    "record_failure",
    "save_checkpoint",
    "truncate_jsonl",
]

MAGIC = b"FEDGMA-CHECKPOINT v1\n"
FAILED = "error.txt"  # a failed run's traceback, in its folder
KEEP = 2
_NAME = re.compile(r"^round-(\d{6,})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or belongs to another config; the message names the file."""


class RunFolderError(ValueError):
    """A file of a run folder (``summary.json``, ``final_model.pt``, a log) is unreadable; the message names it."""


class FolderInUseError(OSError):
    """Another process holds the folder's lock (a run or sweep writing there); the message names the folder.

    An ``OSError`` (like the ``BlockingIOError`` of the lock it reports), so the CLI prints it as one line."""


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
    import torch  # here, so that readers of run folders (fedgma report) need not load torch

    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    path = folder / f"round-{round_index:06d}.pt"
    atomic_write(path, MAGIC + digest + b"\n" + payload)
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
    import torch

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
    atomic_write(path, "".join(lines).encode())
    return kept


def record_failure(run_dir: str | Path) -> None:
    """Write the traceback of the exception being handled to ``run_dir/error.txt`` (:func:`atomic_write`).

    Call it from an ``except`` block; :func:`failure_line` and ``fedgma report`` read it back.
    """
    atomic_write(Path(run_dir) / FAILED, traceback.format_exc().encode())


def failure_line(run_dir: str | Path) -> str | None:
    """The last non-blank line of ``run_dir/error.txt`` (the error's type and message), stripped; ``""`` when
    the file is blank, None when there is none."""
    path = Path(run_dir) / FAILED
    if not path.is_file():
        return None
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``.<name>.tmp`` beside it: write, fsync, rename, fsync the folder.

    A crash or a full disk at any moment leaves the old file (or none) under ``path``, never a part
    of the new one; an ``OSError`` (e.g. no space left) removes the temporary file and is re-raised.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``; :class:`RunFolderError` naming the file if it cannot be read or parsed."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise RunFolderError(f"cannot read {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunFolderError(f"{path} is truncated or corrupt, not valid JSON ({error})") from None


def read_jsonl(path: str | Path) -> list[Any]:
    """The JSON value of every non-blank line of ``path``; :class:`RunFolderError` naming the file and the line
    if it cannot be read or a line is not JSON (e.g. a log of a run killed mid-line and never resumed)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise RunFolderError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    values = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise RunFolderError(f"{path} line {number} is truncated or corrupt, not valid JSON ({error}); "
                                     "resume the run (fedgma run --resume) or remove the folder") from None
    return values


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML table in ``path``; :class:`RunFolderError` naming the file if it cannot be read or parsed."""
    import tomllib

    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise RunFolderError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise RunFolderError(f"{path} is truncated or corrupt, not valid TOML ({error})") from None


def load_final_model(path: str | Path) -> dict[str, Any]:
    """``final_model.pt`` (``{"round", "params"}``); :class:`RunFolderError` naming the file if it is damaged."""
    import torch

    path = Path(path)
    try:
        model = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunFolderError(f"{path} is missing") from None
    except Exception as error:  # torch raises many kinds on a truncated zip
        raise RunFolderError(f"{path} is truncated or corrupt ({type(error).__name__}: {error})") from None
    if not isinstance(model, dict) or not isinstance(model.get("params"), torch.Tensor):
        raise RunFolderError(f"{path} is not a fedgma final model (no 'params' tensor)")
    return model


def final_files_problem(run_dir: str | Path) -> str | None:
    """None if the run folder holds a whole ``summary.json`` (a finished run's) and a loadable ``final_model.pt``;
    otherwise why not, naming the file. A folder without ``summary.json`` is simply not finished."""
    run_dir = Path(run_dir)
    try:
        summary = read_json(run_dir / "summary.json")
        if not isinstance(summary, dict) or summary.get("status") != "finished":
            return f"{run_dir / 'summary.json'} is not the summary of a finished run"
        load_final_model(run_dir / "final_model.pt")
    except RunFolderError as error:
        return str(error)
    return None


@contextlib.contextmanager
def lock_folder(folder: str | Path, what: str = "run") -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder`` (file ``.lock`` inside, created with the folder).

    ``.lock`` holds ``"<pid> <what>"`` of the holder. Raises :class:`FolderInUseError` at once, naming
    the folder, what holds it (``run``, ``sweep``) and its pid, when another process or open file holds it.
    The lock goes with the process (closing the file or dying releases it).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "a+")  # noqa: SIM115  (closed below)
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid, _, holder = handle.read().strip().partition(" ")
            raise FolderInUseError(
                f"{folder} is in use by another fedgma {holder or 'process'} (pid {pid or 'unknown'}); "
                "wait for it to end or use another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {what}")
        handle.flush()
        yield
    finally:
        handle.close()


def config_differences(config: Any, saved_toml: str | Path) -> list[str]:
    """How ``config`` differs from the config saved in a run folder (a ``config.toml`` path or its text).

    Keys on one side only (schema additions, unset values) and ``name`` are not compared; each
    difference reads ``key = saved there, planned here``. A saved file that is not TOML raises
    :class:`RunFolderError` naming it.
    """
    import tomllib

    from fedgma.config import config_to_dict, flatten

    found = flatten(read_toml(saved_toml) if isinstance(saved_toml, Path) else tomllib.loads(saved_toml))
    planned = flatten(config_to_dict(config))
    return [f"{k} = {found[k]!r} there, {planned[k]!r} planned" for k in sorted(planned.keys() & found.keys())
            if k != "name" and planned[k] != found[k]]
