"""SCAFFOLD's control-variate store: values read back exactly whether kept in RAM or spilled to disk."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from fedgma.client import ControlVariateStore, LocalSGD, ScaffoldClient


def _value(client_id: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(client_id))


def test_unseen_clients_read_as_zeros_and_cost_nothing(tmp_path) -> None:
    store = ControlVariateStore(10, memory_limit_bytes=0, spill_dir=str(tmp_path))
    assert torch.equal(store.get(123), torch.zeros(10))
    assert len(store) == 0 and store.num_spilled == 0


@pytest.mark.parametrize("limit", [None, 0, 3 * 40])
def test_values_round_trip_exactly(tmp_path, limit) -> None:
    """In RAM (None), all on disk (0), or the first three in RAM and the rest on disk."""
    store = ControlVariateStore(10, memory_limit_bytes=limit, spill_dir=str(tmp_path))
    for client in range(8):
        store.set(client, _value(client, 10))
    store.set(5, _value(50, 10))  # overwrite, in place wherever it lives
    for client in range(8):
        assert torch.equal(store.get(client), _value(50 if client == 5 else client, 10))
    assert len(store) == 8
    assert store.num_spilled == {None: 0, 0: 8, 120: 5}[limit]


def test_state_dict_round_trip_through_a_spilling_store(tmp_path) -> None:
    store = ControlVariateStore(6, memory_limit_bytes=2 * 24, spill_dir=str(tmp_path))
    for client in (4, 9, 2, 7):
        store.set(client, _value(client, 6))
    state = store.state_dict()
    restored = ControlVariateStore(6, memory_limit_bytes=0, spill_dir=str(tmp_path))
    restored.load_state_dict(state)
    assert restored.num_spilled == 4
    for client in (4, 9, 2, 7):
        assert torch.equal(restored.get(client), _value(client, 6))
    with pytest.raises(ValueError, match="control variates have 6 entries, the model has 5"):
        ControlVariateStore(5).load_state_dict(state)


def test_bad_values_are_rejected_with_the_client_named(tmp_path) -> None:
    store = ControlVariateStore(4, memory_limit_bytes=0, spill_dir=str(tmp_path))
    with pytest.raises(ValueError, match="client 3: control variate has 5 entries, expected 4"):
        store.set(3, torch.zeros(5))
    with pytest.raises(ValueError, match="client 1: the spill file stores float32 control variates"):
        store.set(1, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="memory_limit_bytes must be ≥ 0 or None, got -1"):
        ControlVariateStore(4, memory_limit_bytes=-1)


def test_scaffold_is_identical_with_a_spilling_store(tmp_path) -> None:
    """The store is a storage choice only: SCAFFOLD's state evolves bit for bit the same."""
    settings = LocalSGD(lr=0.1)
    numel, clients = 50, 6
    in_ram = ScaffoldClient(settings, numel, clients)
    on_disk = ScaffoldClient(settings, numel, clients)
    on_disk.store = ControlVariateStore(numel, memory_limit_bytes=0, spill_dir=str(tmp_path))
    from fedgma.client import ClientResult

    for round_index in range(3):
        for algorithm in (in_ram, on_disk):
            algorithm.begin_round(torch.zeros(numel))
            results = []
            for client in range(round_index, round_index + 3):
                update = _value(100 * round_index + client, numel) - algorithm.correction(client)
                result = ClientResult(client, update, num_samples=10, num_steps=4, train_loss=0.0)
                algorithm.finish_client(result)
                results.append(result)
            algorithm.end_round(results)
    assert torch.equal(in_ram.server_control, on_disk.server_control)
    assert on_disk.store.num_spilled == 5
    for client in range(clients):
        assert torch.equal(in_ram.store.get(client), on_disk.store.get(client))


_SCALE_SCRIPT = r"""
import re, sys, torch
from fedgma.control_store import ControlVariateStore
clients, numel = int(sys.argv[1]), int(sys.argv[2])
store = ControlVariateStore(numel, memory_limit_bytes=64 << 20, spill_dir=sys.argv[3])
value = torch.ones(numel)
for client in range(clients):
    value[0] = client
    store.set(client, value)
assert float(store.get(clients - 1)[0]) == clients - 1 and float(store.get(7)[0]) == 7
with open("/proc/self/status") as handle:
    print(int(re.search(r"VmHWM:\s+(\d+)", handle.read()).group(1)) // 1024, store.num_spilled)
"""


@pytest.mark.slow  # writes 1.5 GB to the temporary folder
@pytest.mark.skipif(sys.platform != "linux", reason="reads peak RSS from /proc")
def test_store_memory_does_not_grow_with_the_population(tmp_path) -> None:
    """2,000 clients × 199,210 floats (the MLP; 1.5 GB of control variates) in well under 1 GB of RSS."""
    done = subprocess.run([sys.executable, "-c", _SCALE_SCRIPT, "2000", "199210", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_mb, spilled = (int(v) for v in re.findall(r"\d+", done.stdout.strip().splitlines()[-1]))
    assert spilled > 1900
    assert peak_mb < 700, f"peak RSS {peak_mb} MB"
