"""fedgma works without flwr: only fedgma.flower needs it, and says what to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.flower

BLOCK_FLWR = textwrap.dedent(
    """
    import sys
    sys.modules["flwr"] = None  # as if flwr were not installed: `import flwr` raises ImportError
    import fedgma.aggregation, fedgma.cli, fedgma.config, fedgma.simulation
    assert not any(name == "flwr" or name.startswith("flwr.") for name in sys.modules if sys.modules[name])
    try:
        import fedgma.flower
    except ImportError as error:
        print("IMPORT-ERROR:", error)
    from click.testing import CliRunner
    result = CliRunner().invoke(fedgma.cli.main, ["run", sys.argv[1], "--engine", "flower", "--quiet"])
    print("CLI:", result.exit_code, result.output.strip())
    """
)


def test_fedgma_imports_without_flwr_and_fedgma_flower_says_what_to_install(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('rounds = 1\n[data]\ndataset = "digits"\nnum_clients = 4\n[server]\nclients_per_round = 2\n')
    out = subprocess.run([sys.executable, "-c", BLOCK_FLWR, str(config)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORT-ERROR: fedgma.flower needs the Flower framework: pip install 'fedgma[flower]'" in out.stdout
    assert "CLI: 2 Error: config key 'engine': 'flower' needs the Flower extra" in out.stdout
