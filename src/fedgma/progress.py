"""What a run prints while it trains, and where else it logs.

:class:`ProgressBar` shows a rich progress bar on a terminal; when standard output is not a terminal
(a cluster job log, ``| tee``, ``nohup``) it prints one plain line per evaluation instead
(:func:`evaluation_line`), flushed at once, so a log file follows the run. With a TensorBoard folder it
also writes every numeric per-round and per-evaluation metric there (``pip install 'fedgma[tensorboard]'``;
config ``tensorboard = true`` writes ``<run folder>/tensorboard``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import IO, Any

__all__ = ["ProgressBar", "TensorBoardLogger", "evaluation_line"]


def evaluation_line(round_index: int, total: int, record: dict[str, Any]) -> str:
    """``"round 5/50  test acc 0.8123  test loss 0.5432  elapsed 12.3 s"``: one evaluation as plain text.

    ``record`` is a metrics.jsonl record (``test_accuracy`` and ``test_loss`` as fractions and nats,
    ``elapsed_s`` in seconds since the run started); missing fields are left out.
    """
    parts = [f"round {round_index}/{total}"]
    if record.get("test_accuracy") is not None:
        parts.append(f"test acc {record['test_accuracy']:.4f}")
    if record.get("test_loss") is not None:
        parts.append(f"test loss {record['test_loss']:.4f}")
    if record.get("elapsed_s") is not None:
        parts.append(f"elapsed {record['elapsed_s']:.1f} s")
    return "  ".join(parts)


class TensorBoardLogger:
    """Every finite number of a per-round record (``rounds.jsonl``) under ``round/<key>`` and of an
    evaluation (``metrics.jsonl``) under ``eval/<key>``, at step = round, in ``log_dir``.

    Raises:
        fedgma.config.ConfigError: TensorBoard is not installed (the message gives the install command).
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            from fedgma.config import ConfigError

            raise ConfigError(f"config key 'tensorboard': true needs TensorBoard: pip install 'fedgma[tensorboard]' "
                              f"({error})") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, prefix: str, record: dict[str, Any]) -> None:
        step = int(record["round"])
        for key, value in record.items():
            if key == "round" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class ProgressBar:
    """A run's progress: a rich bar on a terminal, one plain line per evaluation otherwise, nothing when
    disabled; optionally a :class:`TensorBoardLogger` (``tensorboard_dir``) of every metric.

    ``update(round, record)`` is called after every round, with the evaluation record on evaluated
    rounds; ``log_round(record)`` with each per-round record; ``close()`` once at the end.
    """

    def __init__(self, total: int, enabled: bool, tensorboard_dir: str | Path | None = None,
                 stream: IO[str] | None = None) -> None:
        self.total = total
        self.bar = None
        self.stream = stream or sys.stdout
        self.plain = enabled and not _is_terminal(self.stream)
        self.tensorboard = TensorBoardLogger(tensorboard_dir) if tensorboard_dir is not None else None
        if enabled and not self.plain:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("round"), MofNCompleteColumn(), BarColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"), transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("rounds", total=total, status="")

    def update(self, round_index: int, record: dict[str, Any] | None = None) -> None:
        if record is not None and self.tensorboard is not None:
            self.tensorboard.log("eval", record)
        if self.plain and record is not None:
            print(evaluation_line(round_index, self.total, record), file=self.stream, flush=True)
        if self.bar is None:
            return
        status = None
        if record is not None:
            status = f"test acc {record['test_accuracy']:.4f}  loss {record['test_loss']:.4f}"
        self.bar.update(self.task, completed=round_index, **({"status": status} if status else {}))

    def log_round(self, record: dict[str, Any]) -> None:
        """A per-round record (train loss, update norm, GMA's mask statistics): to TensorBoard, if on."""
        if self.tensorboard is not None:
            self.tensorboard.log("round", record)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
