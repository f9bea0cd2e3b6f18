"""`fedgma --help` and `--version` start fast: they import neither torch nor the simulator, and `import fedgma`
alone does not import torch (its public names load on first use)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from fedgma.cli import main

PROBE = """
import sys
from fedgma.cli import main
try:
    main([{args}], standalone_mode=False)
finally:
    heavy = sorted(m for m in ("torch", "numpy", "matplotlib", "fedgma.simulation", "fedgma.aggregation")
                   if m in sys.modules)
    print("HEAVY=" + ",".join(heavy))
"""


@pytest.mark.parametrize("args", ["'--help'", "'--version'", "'run', '--help'", "'report', '--help'"])
def test_help_and_version_do_not_import_torch(args: str) -> None:
    result = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True,
                            timeout=60, check=True)
    assert "HEAVY=\n" in result.stdout, result.stdout[-300:]
    assert "Usage" in result.stdout or "version" in result.stdout


def test_import_fedgma_is_lazy_and_still_exposes_gma() -> None:
    code = ("import sys, fedgma; assert 'torch' not in sys.modules, 'torch imported'; "
            "fedgma.gma; assert 'torch' in sys.modules; print(fedgma.__version__, 'gma' in dir(fedgma))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split()[1] == "True"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import fedgma

        fedgma.nope  # noqa: B018


def test_version_takes_under_half_a_second() -> None:
    """Best of three fresh interpreters (the machine may be busy with other work)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "from fedgma.cli import main; main(['--version'])"],
                       capture_output=True, timeout=60)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.5, times


def test_bench_help_lists_documented_options_and_quick() -> None:
    result = CliRunner().invoke(main, ["bench", "--", "--help"])
    assert result.exit_code == 0, result.output
    assert "--quick" in result.output and "a small run of every part" in result.output
    assert "--child" not in result.output  # internal
