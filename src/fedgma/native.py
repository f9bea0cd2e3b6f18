"""An opt-in compiled kernel behind aggregation: one fused pass over memory for K updates.

Off unless ``FEDGMA_NATIVE=1``. Measured by its effect on whole rounds (docs/PERFORMANCE.md,
``benchmarks/round_effects.py``), it saves about 1% of a simulator round (client training dominates
there) but a large share of a server round that aggregates many replies of a large model (a Flower
server with 100 replies of 10^7 parameters), which is where to turn it on.

Folding an update into GMA's two running sums takes three PyTorch operations per chunk (weighted
add, sign, sign add), each a separate pass with its own dispatch cost; ``native_fold.c`` does them
in one loop, four clients per sweep over a cached block, which brings ``gma`` on a list of updates
to the memory-bandwidth floor (docs/PERFORMANCE.md). It gives the same bits as the PyTorch path.

The C file is compiled on first use with the system C compiler (``$CC``, else ``cc``), into a cache
folder (``$FEDGMA_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedgma``, else ``~/.cache/fedgma``), and loaded
with ctypes, which releases the GIL during the call so the aggregation threads run in parallel.
Without ``FEDGMA_NATIVE=1``, or without a compiler, :func:`fold_kernel` returns None and aggregation
uses PyTorch alone: slower, same numbers.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from torch import Tensor

__all__ = ["FoldKernel", "cache_dir", "disabled", "enabled", "fold_kernel", "native_status"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_fold.c")
_LOCK = threading.Lock()
_KERNEL: FoldKernel | None = None
_TRIED = False
_STATUS = "not loaded yet"
_FORCED_OFF = False
_FORCED_ON = False
_OFF = "off (opt in with FEDGMA_NATIVE=1); PyTorch path"


class FoldKernel:
    """``fold(total, signs, updates, weights, sign_weights, start, end)`` on float32 CPU tensors."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._function = library.fedgma_fold
        self._function.restype = None
        self._function.argtypes = [
            ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ]

    def prepare(
        self, updates: Sequence[Tensor], weights: Sequence[float], sign_weights: Sequence[float]
    ) -> Callable[[Tensor, Tensor | None, int, int], None]:
        """Pointer and weight arrays built once; the returned call folds the range [start, end)."""
        k = len(updates)
        pointers = (ctypes.c_void_p * k)(*[u.data_ptr() for u in updates])
        w = (ctypes.c_float * k)(*weights)  # float32, as ATen casts add's alpha
        s = (ctypes.c_float * k)(*sign_weights)
        function = self._function

        def fold(total: Tensor, signs: Tensor | None, start: int, end: int) -> None:
            function(k, pointers, w, s, total.data_ptr(), None if signs is None else signs.data_ptr(), start, end)

        return fold


def cache_dir() -> Path:
    """Where compiled kernels are kept (one file per source, compiler and machine)."""
    if os.environ.get("FEDGMA_CACHE_DIR"):
        return Path(os.environ["FEDGMA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedgma"


def _wanted() -> bool:
    if _FORCED_OFF:
        return False
    return _FORCED_ON or os.environ.get("FEDGMA_NATIVE", "0").strip().lower() in {"1", "true", "yes", "on"}


def native_status() -> str:
    """One line saying whether the compiled kernel is in use, and why not if it is not."""
    if not _wanted():
        return _OFF
    fold_kernel()
    return _STATUS


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """Within the block aggregation uses the kernel where it can be built, as with ``FEDGMA_NATIVE=1``."""
    global _FORCED_ON
    previous, _FORCED_ON = _FORCED_ON, True
    try:
        yield
    finally:
        _FORCED_ON = previous


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block aggregation takes the PyTorch path (benchmarks and tests compare the two)."""
    global _FORCED_OFF
    previous, _FORCED_OFF = _FORCED_OFF, True
    try:
        yield
    finally:
        _FORCED_OFF = previous


def fold_kernel() -> FoldKernel | None:
    """The compiled fold kernel if opted in, built and loaded on first call; None where it is off or cannot be."""
    global _KERNEL, _TRIED, _STATUS
    if not _wanted():
        return None
    if _TRIED:
        return _KERNEL
    with _LOCK:
        if _TRIED:
            return _KERNEL
        try:
            path = _build()
            _KERNEL = FoldKernel(ctypes.CDLL(str(path)), path)
            _STATUS = f"compiled kernel {path}"
        except (OSError, subprocess.SubprocessError, RuntimeError) as error:
            _STATUS = f"unavailable ({error}); PyTorch path"
            log.warning("fedgma: compiled aggregation kernel %s", _STATUS)
        _TRIED = True
        return _KERNEL


def _reset_for_tests() -> None:
    global _KERNEL, _TRIED, _STATUS
    with _LOCK:
        _KERNEL, _TRIED, _STATUS = None, False, "not loaded yet"


def _compiler() -> str:
    compiler = os.environ.get("CC") or "cc"
    found = shutil.which(compiler)
    if found is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH (set CC)")
    return found


def _build() -> Path:
    """Compile ``native_fold.c`` into the cache (once per source × compiler × machine)."""
    compiler = _compiler()
    source = SOURCE.read_bytes()
    machine = platform.machine().lower()
    attempts = [["-O3", "-DFEDGMA_CLONES"], ["-O3"]] if machine in {"x86_64", "amd64"} else [["-O3"]]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    errors = []
    for flags in attempts:
        key = hashlib.sha256(source + " ".join([compiler, version, machine, *flags]).encode()).hexdigest()[:16]
        target = cache_dir() / f"fold-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            command = [compiler, *flags, "-shared", "-fPIC", "-o", str(built), str(SOURCE), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if result.returncode == 0:
                os.replace(built, target)  # atomic: concurrent runs never load a half-written file
                return target
            errors.append(f"{' '.join(command)}: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
    raise RuntimeError("; ".join(errors))
