"""Fetching a public data file over HTTP(S) into a local path, atomically (no half-written files)."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

from fedgma.data.datasets import DatasetError

__all__ = ["download"]


def download(url: str, target: Path) -> None:
    """Download ``url`` to ``target`` through a ``.part`` file renamed when complete.

    Raises:
        DatasetError: the download failed (the partial file is removed).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise DatasetError(f"download of {url} failed: {error}") from None
    partial.replace(target)
