"""SCAFFOLD's control-variate store: values read back exactly whether kept in RAM or spilled to disk, and a
checkpoint is a small reference that restores its values bit for bit after a kill at any point."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedgma.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedgma.client import LocalSGD, ScaffoldClient
from fedgma.control_store import ControlVariateStore


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




# -- checkpoints of a store with a spill_dir ----------------------------------------------------------------

_SPECIAL = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -3.4e38], dtype=torch.float32)


def _bits(value: torch.Tensor) -> torch.Tensor:
    return value.contiguous().view(torch.int32)


def _special(client_id: int, numel: int) -> torch.Tensor:
    """A value with signed zeros, infinities, a denormal and NaNs of varied payloads (client-dependent)."""
    value = _value(client_id, numel)
    value[: len(_SPECIAL)] = _SPECIAL[:numel]
    if numel > len(_SPECIAL):
        value.view(torch.int32)[len(_SPECIAL)] = 0x7FC00000 + client_id  # a NaN whose payload names the client
    return value


def _assert_holds(store: ControlVariateStore, expected: dict[int, torch.Tensor], numel: int) -> None:
    assert len(store) == len(expected)
    for client, value in expected.items():
        assert torch.equal(_bits(store.get(client)), _bits(value)), f"client {client}"
    assert torch.equal(store.get(10**9), torch.zeros(numel))


def _state_bytes(state: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return len(buffer.getvalue())


@pytest.mark.parametrize("limit", [None, 0, 3 * 4 * 12])
@pytest.mark.parametrize("load_limit", [None, 0, 2 * 4 * 12])
def test_checkpoint_round_trip_is_bit_exact_across_spill_and_no_spill(tmp_path, limit, load_limit) -> None:
    """Saved in RAM / on disk / split, restored into a store with another split: the same bits, zeros elsewhere."""
    numel = 12
    store = ControlVariateStore(numel, memory_limit_bytes=limit, spill_dir=tmp_path)
    expected = {client: _special(client, numel) for client in (4, 9, 2, 7, 30, 11)}
    for client, value in expected.items():
        store.set(client, value)
    path = save_checkpoint(tmp_path / "run", 1, {"controls": store.state_dict()})
    store.close()  # the process ends
    restored = ControlVariateStore(numel, memory_limit_bytes=load_limit, spill_dir=tmp_path)
    restored.load_state_dict(load_checkpoint(path)["controls"])  # through a real checkpoint file (weights_only)
    _assert_holds(restored, expected, numel)
    assert restored.num_spilled == {None: 0, 0: 6, 96: 4}[load_limit] if limit is None else restored.num_spilled >= 3
    with pytest.raises(ValueError, match="control variates have 12 entries, the model has 5"):
        ControlVariateStore(5, spill_dir=tmp_path).load_state_dict(store.state_dict())


def test_anonymous_spill_file_state_materialises_values_and_round_trips(tmp_path) -> None:
    """spill_dir=None: the state holds every value (format 1), and loads into either kind of store."""
    store = ControlVariateStore(6, memory_limit_bytes=2 * 24)
    expected = {client: _special(client, 6) for client in (4, 9, 2, 7)}
    for client, value in expected.items():
        store.set(client, value)
    state = store.state_dict()
    assert set(state) == {"numel", "values"} and store.num_spilled == 2
    for target in (ControlVariateStore(6, memory_limit_bytes=0), ControlVariateStore(6, spill_dir=tmp_path)):
        target.load_state_dict(state)
        _assert_holds(target, expected, 6)


def _kill_scenario(tmp_path, limit: int | None, keep: int = 2):
    """Checkpoints 0, 1, 2 of a store with writes between them, then writes after checkpoint 2 (then killed)."""
    numel = 10
    store = ControlVariateStore(numel, memory_limit_bytes=limit, spill_dir=tmp_path, keep_snapshots=keep)
    current: dict[int, torch.Tensor] = {}
    states, expected = [], []
    rng = np.random.default_rng(0)
    for checkpoint in range(4):
        for step in range(12):
            client = int(rng.integers(0, 9))
            current[client] = _special(1000 * checkpoint + 10 * step + client, numel)
            store.set(client, current[client])
        if checkpoint < 3:  # checkpoint 3 never happens: the run is killed mid-interval
            states.append(store.state_dict())
            expected.append(dict(current))
    return store, states, expected, numel


@pytest.mark.parametrize("limit", [None, 0, 4 * 40])
def test_a_fresh_store_restores_each_kept_checkpoint_after_a_kill(tmp_path, limit) -> None:
    store, states, expected, numel = _kill_scenario(tmp_path, limit)
    del store  # killed: never closed, files left as they were
    for k in (2, 1):  # the newest two checkpoints are kept
        restored = ControlVariateStore(numel, memory_limit_bytes=limit, spill_dir=tmp_path)
        restored.load_state_dict(states[k])
        _assert_holds(restored, expected[k], numel)
    # resumed from checkpoint 1, the run goes on: its writes never touch checkpoint 1's rows
    resumed = ControlVariateStore(numel, memory_limit_bytes=limit, spill_dir=tmp_path)
    resumed.load_state_dict(states[1])
    for client in range(12):
        resumed.set(client, _special(-client, numel))
    again = ControlVariateStore(numel, memory_limit_bytes=limit, spill_dir=tmp_path)
    again.load_state_dict(states[1])
    _assert_holds(again, expected[1], numel)


@pytest.mark.parametrize("limit", [None, 0, 4 * 40])
def test_a_checkpoint_whose_rows_were_reused_fails_with_one_line(tmp_path, limit) -> None:
    """Older than the newest keep_snapshots, or newer than the one a run resumed from: refused at load."""
    store, states, expected, numel = _kill_scenario(tmp_path / "aged", limit)
    store.state_dict()  # checkpoint 3 (RAM-held values reach the file only at checkpoints): 0 and 1 have aged out
    fresh = ControlVariateStore(numel, memory_limit_bytes=limit, spill_dir=tmp_path / "aged")
    with pytest.raises(CheckpointError, match=r"^control variate store: slot \d+ \(client \d+\) of .* was overwritten "
                       r"after this checkpoint was written .*; resume from the newest checkpoint$"):
        fresh.load_state_dict(states[0])
    # resume from checkpoint 1 and take checkpoints: checkpoint 2 is abandoned and its rows get reused
    store, states, expected, numel = _kill_scenario(tmp_path / "abandoned", limit)
    resumed = ControlVariateStore(numel, memory_limit_bytes=limit, spill_dir=tmp_path / "abandoned")
    resumed.load_state_dict(states[1])
    for round_index in range(3):
        for client in range(9):
            resumed.set(client, _special(100 * round_index - client, numel))
        resumed.state_dict()
    with pytest.raises(CheckpointError, match="was overwritten after this checkpoint was written"):
        abandoned = ControlVariateStore(numel, memory_limit_bytes=limit, spill_dir=tmp_path / "abandoned")
        abandoned.load_state_dict(states[2])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("keep", [1, 2, 3])
def test_random_sets_checkpoints_kills_and_resumes_match_a_reference(tmp_path, seed, keep) -> None:
    """Any interleaving of writes, checkpoints and kill-then-resume from any kept checkpoint gives the
    reference values; a resumed store is as good as the original."""
    rng = np.random.default_rng(seed)
    numel, limit = 7, int(rng.choice([0, 3 * 28, 10**6]))
    store = ControlVariateStore(numel, memory_limit_bytes=limit, spill_dir=tmp_path, keep_snapshots=keep)
    current: dict[int, torch.Tensor] = {}
    kept: list[tuple[dict, dict]] = []  # (state, values) of the checkpoints still on disk, oldest first
    for op in range(150):
        choice = rng.random()
        if choice < 0.75:
            client = int(rng.integers(0, 12))
            current[client] = _special(op * 100 + client, numel)
            store.set(client, current[client])
        elif choice < 0.92 or not kept:
            kept = (kept + [(store.state_dict(), dict(current))])[-keep:]
        else:  # kill, then resume from a random kept checkpoint (newer ones are abandoned)
            which = int(rng.integers(0, len(kept)))
            store = ControlVariateStore(numel, memory_limit_bytes=limit, spill_dir=tmp_path, keep_snapshots=keep)
            store.load_state_dict(kept[which][0])
            current, kept = dict(kept[which][1]), kept[: which + 1]
        _assert_holds(store, current, numel)
    for state, values in kept:
        restored = ControlVariateStore(numel, memory_limit_bytes=limit, spill_dir=tmp_path, keep_snapshots=keep)
        restored.load_state_dict(state)
        _assert_holds(restored, values, numel)


def test_checkpoint_bytes_do_not_grow_with_the_spilled_values(tmp_path) -> None:
    """The state is a reference: a few bytes per client whatever their size, and no RAM-held row either."""
    numel = 5000  # 20 kB a row
    sizes = {}
    for clients in (20, 420):
        store = ControlVariateStore(numel, memory_limit_bytes=10 * 4 * numel, spill_dir=tmp_path / str(clients))
        for client in range(clients):
            store.set(client, _value(client, numel))
        assert store.num_spilled == clients - 10
        sizes[clients] = _state_bytes(store.state_dict())
    assert sizes[20] < 4 * numel  # less than one row, with ten rows held in RAM
    assert (sizes[420] - sizes[20]) / 400 <= 32  # ≤ 32 bytes a client (int64 client, slot, crc; bool)
    anonymous = ControlVariateStore(numel, memory_limit_bytes=0)
    for client in range(20):
        anonymous.set(client, _value(client, numel))
    assert _state_bytes(anonymous.state_dict()) > 20 * 4 * numel  # format 1 materialises (documented)


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_the_spill_file_stays_bounded_over_many_checkpoints(tmp_path, keep) -> None:
    """Copy on write reuses freed slots: at most clients + keep × (rows changed per interval) rows, ever."""
    numel, clients, per_round = 16, 30, 5
    store = ControlVariateStore(numel, memory_limit_bytes=4 * 4 * numel, spill_dir=tmp_path, keep_snapshots=keep)
    rng = np.random.default_rng(1)
    for round_index in range(60):
        for client in rng.choice(clients, per_round, replace=False):
            store.set(int(client), _value(round_index * clients + int(client), numel))
        store.state_dict()
        rows = (os.path.getsize(tmp_path / "controls.bin") - 4096) // (4 * numel)
        assert rows <= clients + keep * per_round, f"round {round_index}: {rows} rows"


def test_missing_replaced_truncated_or_damaged_spill_files_fail_with_one_line(tmp_path) -> None:
    numel = 8
    store = ControlVariateStore(numel, memory_limit_bytes=2 * 4 * numel, spill_dir=tmp_path)
    for client in range(5):
        store.set(client, _value(client, numel))
    state = store.state_dict()
    store.close()
    data, index = tmp_path / "controls.bin", tmp_path / "controls.crc"
    pristine = data.read_bytes(), index.read_bytes()

    def fresh(spill_dir=tmp_path) -> ControlVariateStore:
        return ControlVariateStore(numel, memory_limit_bytes=0, spill_dir=spill_dir)

    with pytest.raises(CheckpointError, match=r"^control variate store: cannot open the spill files the checkpoint "
                       r"references in .*elsewhere: No such file or directory$"):
        fresh(tmp_path / "elsewhere").load_state_dict(state)
    with pytest.raises(CheckpointError, match="give the store the spill_dir that holds it"):
        ControlVariateStore(numel).load_state_dict(state)
    with pytest.raises(CheckpointError, match="unknown state format 9; expected 1 or 2"):
        fresh().load_state_dict({**state, "format": 9})

    data.write_bytes(pristine[0][: 4096 + 4 * numel * 4 + 3])  # cut inside slot 4
    with pytest.raises(CheckpointError, match=r"holds 4 slots, the checkpoint references slot 4: the file was trunc"):
        fresh().load_state_dict(state)

    damaged = bytearray(pristine[0])
    damaged[4096 + 4 * numel * 3 + 5] ^= 0x10  # one bit of slot 3
    data.write_bytes(bytes(damaged))
    store = fresh()
    store.load_state_dict(state)  # spilled rows are checked when first read
    slot_of = dict(zip(state["clients"].tolist(), state["slots"].tolist(), strict=True))
    client = next(c for c, s in slot_of.items() if s == 3)
    with pytest.raises(CheckpointError, match=r"slot 3 of .*controls.bin fails its CRC-32 check: the file was "
                       "changed or damaged after the checkpoint was written"):
        store.get(client)
    assert torch.equal(store.get((client + 1) % 5), _value((client + 1) % 5, numel))

    data.write_bytes(b"not a control file" + pristine[0][18:])
    with pytest.raises(CheckpointError, match="has a bad header"):
        fresh().load_state_dict(state)

    data.write_bytes(pristine[0])
    ControlVariateStore(numel, memory_limit_bytes=0, spill_dir=tmp_path).set(0, _value(0, numel))  # a fresh run here
    with pytest.raises(CheckpointError, match=r"controls.bin is generation [0-9a-f]{32}, the checkpoint references "
                       r"[0-9a-f]{32} \(the files were replaced by a later fresh run in this folder\)$"):
        fresh().load_state_dict(state)


def test_close_keeps_named_files_unless_asked_and_an_empty_store_checkpoints(tmp_path) -> None:
    empty = ControlVariateStore(4, spill_dir=tmp_path)
    state = empty.state_dict()
    assert state["uuid"] is None and not (tmp_path / "controls.bin").exists()
    restored = ControlVariateStore(4, spill_dir=tmp_path)
    restored.load_state_dict(state)
    assert len(restored) == 0
    store = ControlVariateStore(4, memory_limit_bytes=0, spill_dir=tmp_path)
    store.set(1, _value(1, 4))
    state = store.state_dict()
    store.close()
    assert (tmp_path / "controls.bin").exists() and store.num_spilled == 0
    store.load_state_dict(state)
    assert torch.equal(store.get(1), _value(1, 4))
    store.close(delete=True)
    assert not (tmp_path / "controls.bin").exists() and not (tmp_path / "controls.crc").exists()
    with pytest.raises(ValueError, match="keep_snapshots must be ≥ 1, got 0"):
        ControlVariateStore(4, keep_snapshots=0)


_SCALE_SCRIPT = r"""
import re, sys, torch
from fedgma.checkpoint import load_checkpoint, save_checkpoint
from fedgma.control_store import ControlVariateStore
clients, numel, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
store = ControlVariateStore(numel, memory_limit_bytes=64 << 20, spill_dir=folder + "/controls")
value = torch.ones(numel)
for client in range(clients):
    value[0] = client
    store.set(client, value)
    if client % 500 == 499:
        path = save_checkpoint(folder, client, {"controls": store.state_dict()})
restored = ControlVariateStore(numel, memory_limit_bytes=64 << 20, spill_dir=folder + "/controls")
restored.load_state_dict(load_checkpoint(path)["controls"])
assert float(restored.get(clients - 1)[0]) == clients - 1 and float(restored.get(7)[0]) == 7
with open("/proc/self/status") as handle:
    print(int(re.search(r"VmHWM:\s+(\d+)", handle.read()).group(1)) // 1024, store.num_spilled)
"""


@pytest.mark.slow  # writes 1.5 GB to the temporary folder
@pytest.mark.skipif(sys.platform != "linux", reason="reads peak RSS from /proc")
def test_store_memory_does_not_grow_with_the_population_or_checkpoints(tmp_path) -> None:
    """2,000 clients × 199,210 floats (the MLP; 1.5 GB of control variates), checkpointed four times and
    restored, in well under 1 GB of RSS."""
    done = subprocess.run([sys.executable, "-c", _SCALE_SCRIPT, "2000", "199210", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_mb, spilled = (int(v) for v in re.findall(r"\d+", done.stdout.strip().splitlines()[-1]))
    assert spilled > 1900
    assert peak_mb < 700, f"peak RSS {peak_mb} MB"


# -- through the simulator -----------------------------------------------------------------------------------

_DIGITS = [
    "data.dataset=digits", "data.partition=dirichlet", "data.alpha=0.5", "data.num_clients=12", "data.min_size=5",
    "server.clients_per_round=4", "client.batch_size=32", "client.lr=0.05", "eval_every=2", "threads=1",
    "algorithm=scaffold", "rounds=6",
]


class _Crash(Exception):
    pass


@pytest.mark.parametrize(("memory_mb", "at_round", "before_saving"), [(0, 4, True), (0, 3, False), (1, 5, True)])
def test_a_spilling_scaffold_run_killed_between_commit_and_checkpoint_resumes_exactly(
        tmp_path, monkeypatch, memory_mb, at_round, before_saving) -> None:
    """Round ``at_round`` has written its c_i to the spill file when the run dies (before or after its checkpoint):
    the resumed run's logs and final model equal an uninterrupted run's, and the checkpoints hold no variates."""
    import json

    import fedgma.simulation as simulation
    from fedgma.config import load_config

    config = load_config(None, [*_DIGITS, f"client.algorithm.memory_mb={memory_mb}"])
    simulation.run(config, tmp_path / "straight", progress=False)
    save = simulation.save_checkpoint

    def dying_save(run_dir, round_index, state, *args, **kwargs):
        if round_index == at_round and before_saving:
            raise _Crash
        path = save(run_dir, round_index, state, *args, **kwargs)
        if round_index == at_round:
            raise _Crash
        return path

    with monkeypatch.context() as patch:
        patch.setattr(simulation, "save_checkpoint", dying_save)
        with pytest.raises(_Crash):
            simulation.run(config, tmp_path / "resumed", progress=False)
    assert (tmp_path / "resumed" / "controls" / "controls.bin").stat().st_size > 4096
    simulation.run(config, tmp_path / "resumed", progress=False, resume=True)

    def logged(run: str) -> list[dict]:
        lines = (tmp_path / run / "rounds.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "round_s"} for line in lines]

    assert logged("straight") == logged("resumed")
    final = [torch.load(tmp_path / run / "final_model.pt")["params"] for run in ("straight", "resumed")]
    assert torch.equal(final[0], final[1])
    checkpoint = load_checkpoint(sorted((tmp_path / "resumed" / "checkpoints").glob("round-*.pt"))[-1])
    stores = [v for v in _walk(checkpoint) if isinstance(v, dict) and v.get("format") == 2]
    assert len(stores) == 1 and stores[0]["in_memory"].sum() <= (memory_mb << 20) // (4 * stores[0]["numel"])
    assert not any(isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.numel() == stores[0]["numel"]
                   for v in _walk(stores[0]))


def _walk(value):
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _walk(item)
