"""Per-client state at scale: SCAFFOLD's control variates c_i, in RAM up to a limit, then on disk.

Two modes, chosen by ``spill_dir``:

* ``spill_dir=None``: values past the RAM limit go to an anonymous temporary file (deleted when the
  store is closed or the process ends), overwritten in place. Nothing outside the process can refer
  to that file, so :meth:`ControlVariateStore.state_dict` *materialises* every value (format 1,
  ``{"numel", "values"}``): a checkpoint then holds all control variates. Fine for small runs only.

* ``spill_dir=<folder>`` (the simulator passes ``<run>/controls``): a named, *log-structured* store
  whose files a checkpoint references instead of copying, so a checkpoint costs the rows changed
  since the previous one and a state dict of a few bytes per client, never the variates themselves.

Design of the named store (files ``controls.bin`` and ``controls.crc`` in ``spill_dir``):

* ``controls.bin`` is a 4 KiB header (magic, a random ``uuid`` naming this file's generation, ``numel``)
  followed by fixed-size float32 *slots*, one row each. ``controls.crc`` is a header with the same
  ``uuid`` followed by one 8-byte entry per slot: the CRC-32 of the row last written there.
* Every value has a durable slot as of the last snapshot: a spilled client's current slot holds its
  current value; a client kept in RAM has a *shadow* slot written at snapshot time when its value
  changed since the previous snapshot (so RAM-resident values cost a disk write per change, not per
  checkpoint).
* :meth:`~ControlVariateStore.state_dict` is a snapshot: it writes the changed RAM values to slots,
  fsyncs both files, and returns only the slot map (client, slot, CRC-32, in-RAM flag as int64 / bool
  tensors), the file's ``uuid`` and the slot sets of the older snapshots still kept.
* Copy on write: a slot referenced by one of the newest ``keep_snapshots`` snapshots is *frozen*: a
  later write of that client goes to a free slot instead, and the old slot becomes free only when
  every snapshot referencing it has aged out. Free slots are reused lowest first, so the file holds
  about (clients) + (keep_snapshots × rows changed per checkpoint interval) rows: the free list is the
  compaction, and the file never grows with the number of rounds.
* :meth:`~ControlVariateStore.load_state_dict` of a snapshot (after a kill at any point, in this
  process or a fresh one) checks the header's ``uuid`` and ``numel``, the file length, and that the
  CRC index still holds the snapshot's CRC for every slot it references: a snapshot whose slots were
  reused since (older than the newest ``keep_snapshots``, or a newer one abandoned by resuming from an
  older one) fails at load with one line. Rows are checked against their CRC-32 when first read
  (RAM-resident rows at load, spilled ones on first :meth:`~ControlVariateStore.get`), so a damaged
  file fails with one line naming the client and slot, never with wrong numbers.

A kill between snapshots leaves the rows of the kept snapshots untouched (only free or unfrozen slots
are ever written), so every kept checkpoint restores its values bit for bit. Older format-1 state
dicts (materialised values) still load. One store per ``spill_dir``: two live stores writing the same
folder would overwrite each other's free slots.
"""

from __future__ import annotations

import heapq
import json
import os
import tempfile
import uuid as uuid_module
import zlib
from collections import deque
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from fedgma.checkpoint import KEEP, CheckpointError

__all__ = ["ControlVariateStore"]

_DATA_NAME = "controls.bin"
_INDEX_NAME = "controls.crc"
_DATA_MAGIC = b"FEDGMA-CONTROLS v2\n"
_INDEX_MAGIC = b"FEDGMA-CONTROLS-CRC v2\n"
_HEADER = 4096  # bytes before slot 0 in both files
_VALID = 1 << 32  # an index entry is VALID | crc32; 0 marks a slot never written
_FORMAT = 2


class ControlVariateStore:
    """Per-client control variates c_i (float32 vectors of ``numel`` entries), zeros until first set.

    Values live in RAM until they would take more than ``memory_limit_bytes``; from then on new
    clients' values spill to disk, one fixed-size slot per value, read and written with positioned
    I/O. The file is never memory-mapped, so what the OS caches of it is reclaimable page cache, not
    process memory: ``fedgma run`` of SCAFFOLD with 10,000 clients, 100 per round, the 199,210-parameter
    MLP, 100 rounds (4.8 GB of control variates) and a checkpoint every round peaks at 0.94 GB of RSS
    with a 16 MB limit, 1.93 GB with the default 1 GiB (``benchmarks/scaffold_scale.py``). Values read
    back bit for bit, so the choice is a memory/speed trade only.
    ``memory_limit_bytes=0`` puts every value on disk; ``None`` keeps everything in RAM.

    ``spill_dir=None`` spills to an anonymous temporary file and :meth:`state_dict` materialises
    every value; with a folder, :meth:`state_dict` returns a reference of a few bytes per client and
    the newest ``keep_snapshots`` state dicts stay loadable (see the module docstring). Set
    ``keep_snapshots`` to at least the number of checkpoint files kept (default: the checkpoint
    module's ``KEEP``).

    Raises ``ValueError`` for a negative ``memory_limit_bytes`` or ``keep_snapshots < 1``.
    """

    DEFAULT_MEMORY_LIMIT = 1 << 30  # 1 GiB

    def __init__(
        self,
        numel: int,
        device: torch.device | str = "cpu",
        memory_limit_bytes: int | None = DEFAULT_MEMORY_LIMIT,
        spill_dir: str | os.PathLike[str] | None = None,
        keep_snapshots: int = KEEP,
    ) -> None:
        if memory_limit_bytes is not None and memory_limit_bytes < 0:
            raise ValueError(f"control variate store: memory_limit_bytes must be ≥ 0 or None, got {memory_limit_bytes}")
        if keep_snapshots < 1:
            raise ValueError(f"control variate store: keep_snapshots must be ≥ 1, got {keep_snapshots}")
        self.numel = numel
        self.device = torch.device(device)
        self.memory_limit_bytes = memory_limit_bytes
        self.spill_dir = None if spill_dir is None else str(spill_dir)
        self.keep_snapshots = keep_snapshots
        self._values: dict[int, Tensor] = {}  # clients kept in RAM
        self._slots: dict[int, int] = {}  # spilled client -> slot holding its current value
        self._file: BinaryIO | None = None
        # named (log-structured) mode only
        self._index: BinaryIO | None = None
        self._uuid: str | None = None
        self._shadow: dict[int, int] = {}  # RAM client -> slot holding its value as of the last snapshot
        self._dirty: set[int] = set()  # RAM clients changed since the last snapshot
        self._crc: dict[int, int] = {}  # slot -> CRC-32 of the row last written there
        self._unverified: set[int] = set()  # slots adopted from a snapshot, checked on first read
        self._snapshots: deque[frozenset[int]] = deque()  # slot sets of the kept snapshots, oldest first
        self._frozen: set[int] = set()  # union of the kept snapshots' slots: never overwritten
        self._free: list[int] = []  # heap of reusable slots
        self._num_slots = 0

    # -- files --------------------------------------------------------------------------------

    @property
    def _named(self) -> bool:
        return self.spill_dir is not None

    def _row_bytes(self) -> int:
        return self.numel * 4

    def _data_path(self) -> Path:
        assert self.spill_dir is not None
        return Path(self.spill_dir) / _DATA_NAME

    def _index_path(self) -> Path:
        assert self.spill_dir is not None
        return Path(self.spill_dir) / _INDEX_NAME

    def _offset(self, slot: int) -> int:
        return (_HEADER if self._named else 0) + slot * self._row_bytes()

    def _open_file(self) -> BinaryIO:
        if self._file is not None:
            return self._file
        if not self._named:
            # an unnamed file (unlinked at once): deleted when closed or when the process ends
            self._file = tempfile.TemporaryFile(prefix="fedgma-controls-")  # noqa: SIM115
            return self._file
        # a fresh store: start a new generation of the files (what a previous run left is replaced)
        os.makedirs(self.spill_dir, exist_ok=True)  # type: ignore[arg-type]
        self._uuid = uuid_module.uuid4().hex
        header = json.dumps({"uuid": self._uuid, "numel": self.numel}).encode()
        self._file = open(self._data_path(), "w+b", buffering=0)  # noqa: SIM115
        self._file.write((_DATA_MAGIC + header + b"\n").ljust(_HEADER, b"\0"))
        self._index = open(self._index_path(), "w+b", buffering=0)  # noqa: SIM115
        self._index.write((_INDEX_MAGIC + self._uuid.encode() + b"\n").ljust(_HEADER, b"\0"))
        return self._file

    def _attach(self, file_uuid: str) -> None:
        """Open the named files of generation ``file_uuid`` (a snapshot's), checking their headers."""
        if self._file is not None and self._uuid == file_uuid:
            return
        self._close_files()
        data_path, index_path = self._data_path(), self._index_path()
        try:
            data = open(data_path, "r+b", buffering=0)  # noqa: SIM115
            index = open(index_path, "r+b", buffering=0)  # noqa: SIM115
        except OSError as error:
            raise CheckpointError(
                f"control variate store: cannot open the spill files the checkpoint references in {self.spill_dir}: "
                f"{error.strerror}"
            ) from None
        head = os.pread(data.fileno(), _HEADER, 0)
        try:
            assert head.startswith(_DATA_MAGIC)
            meta = json.loads(head[len(_DATA_MAGIC) :].split(b"\n", 1)[0])
            index_uuid = os.pread(index.fileno(), _HEADER, 0)[len(_INDEX_MAGIC) :].split(b"\n", 1)[0].decode()
            assert os.pread(index.fileno(), len(_INDEX_MAGIC), 0) == _INDEX_MAGIC
        except (AssertionError, ValueError, UnicodeDecodeError):
            data.close()
            index.close()
            raise CheckpointError(f"control variate store: {data_path} or {index_path} has a bad header") from None
        if meta.get("uuid") != file_uuid or index_uuid != file_uuid:
            data.close()
            index.close()
            raise CheckpointError(
                f"control variate store: {data_path} is generation {meta.get('uuid')}, the checkpoint references "
                f"{file_uuid} (the files were replaced by a later fresh run in this folder)"
            )
        if meta.get("numel") != self.numel:
            data.close()
            index.close()
            raise CheckpointError(
                f"control variate store: {data_path} holds rows of {meta.get('numel')} entries, expected {self.numel}"
            )
        self._file, self._index, self._uuid = data, index, file_uuid

    def _close_files(self) -> None:
        for handle in (self._file, self._index):
            if handle is not None:
                handle.close()
        self._file = self._index = None

    def _read(self, slot: int) -> Tensor:
        out = torch.empty(self.numel, dtype=torch.float32)
        buffer = out.numpy()
        fd, offset = self._open_file().fileno(), self._offset(slot)
        if hasattr(os, "preadv"):
            count = os.preadv(fd, [buffer], offset)
        else:  # pragma: no cover - platforms without preadv
            raw = os.pread(fd, self._row_bytes(), offset)
            count = len(raw)
            buffer.view(np.uint8)[:count] = np.frombuffer(raw, dtype=np.uint8)
        if count != self._row_bytes():
            raise CheckpointError(
                f"control variate store: short read of slot {slot} from the spill file "
                f"({count} of {self._row_bytes()} bytes): the file was truncated"
            )
        if slot in self._unverified:
            if zlib.crc32(buffer) != self._crc[slot]:
                raise CheckpointError(
                    f"control variate store: slot {slot} of {self._data_path()} fails its CRC-32 check: the file was "
                    "changed or damaged after the checkpoint was written"
                )
            self._unverified.discard(slot)
        return out

    def _write(self, slot: int, value: Tensor) -> None:
        row = value.detach().to("cpu", torch.float32).contiguous().numpy()
        fd = self._open_file().fileno()
        if self._named:
            assert self._index is not None
            crc = zlib.crc32(row)
            # the index entry first: a kill between the two writes leaves a mismatch only in a slot no
            # kept snapshot references (those are frozen), and a stale snapshot naming it fails at load
            os.pwrite(self._index.fileno(), (_VALID | crc).to_bytes(8, "little"), _HEADER + 8 * slot)
            self._crc[slot] = crc
            self._unverified.discard(slot)
        if os.pwrite(fd, row, self._offset(slot)) != self._row_bytes():
            raise OSError(f"control variate store: short write of slot {slot} to the spill file (disk full?)")

    def _allocate(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        self._num_slots += 1
        return self._num_slots - 1

    def _write_cow(self, slot: int | None, value: Tensor) -> int:
        """Write ``value`` to ``slot``, or to a free slot when it is None or frozen; the slot written."""
        if slot is None or slot in self._frozen:
            slot = self._allocate()
        self._write(slot, value)
        return slot

    # -- public interface ---------------------------------------------------------------------

    def get(self, client_id: int) -> Tensor:
        """Client ``client_id``'s control variate, shape ``(numel,)`` on ``device`` (zeros if never set).

        A value held in RAM is returned as stored, not copied: do not modify it in place (use :meth:`set`).
        Raises :class:`~fedgma.checkpoint.CheckpointError` when a row restored from a checkpoint fails its
        CRC-32 check or the spill file is shorter than the checkpoint says.
        """
        value = self._values.get(client_id)
        if value is not None:
            return value.to(self.device)
        slot = self._slots.get(client_id)
        if slot is not None:
            return self._read(slot).to(self.device)
        return torch.zeros(self.numel, device=self.device)

    def set(self, client_id: int, value: Tensor) -> None:
        """Store ``value`` (``numel`` entries; float32 whenever it may reach disk) for ``client_id``.

        Raises ``ValueError`` for a wrong number of entries, or a non-float32 value that would go to
        disk (spilled, or any value of a store with a ``spill_dir``).
        """
        if value.numel() != self.numel:
            raise ValueError(f"client {client_id}: control variate has {value.numel()} entries, expected {self.numel}")
        in_memory = client_id in self._values or (client_id not in self._slots and self._fits_in_memory())
        if value.dtype != torch.float32 and (self._named or not in_memory):
            raise ValueError(f"client {client_id}: the spill file stores float32 control variates, got {value.dtype}")
        if in_memory:
            self._values[client_id] = value.detach().clone()
            if self._named:
                self._dirty.add(client_id)
            return
        if self._named:
            self._slots[client_id] = self._write_cow(self._slots.get(client_id), value)
        else:
            slot = self._slots.setdefault(client_id, len(self._slots))
            self._write(slot, value)

    def _fits_in_memory(self) -> bool:
        if self.memory_limit_bytes is None:
            return True
        return (len(self._values) + 1) * self._row_bytes() <= self.memory_limit_bytes

    @property
    def num_spilled(self) -> int:
        """How many clients' values live on disk."""
        return len(self._slots)

    def __len__(self) -> int:
        return len(self._values) + len(self._slots)

    def close(self, delete: bool = False) -> None:
        """Close the spill file and forget the spilled values (RAM values stay).

        An anonymous spill file is deleted. The named files in ``spill_dir`` stay, since checkpoints
        reference them, unless ``delete`` (then no checkpoint of this store can be loaded any more).
        """
        self._close_files()
        if delete and self._named:
            self._data_path().unlink(missing_ok=True)
            self._index_path().unlink(missing_ok=True)
        self._slots = {}
        self._shadow, self._dirty, self._crc, self._unverified = {}, set(self._values), {}, set()
        self._snapshots, self._frozen, self._free, self._num_slots = deque(), set(), [], 0
        self._uuid = None

    def state_dict(self) -> dict[str, Any]:
        """A snapshot of every value, to pass to :meth:`load_state_dict` later.

        With a ``spill_dir``: writes the RAM values changed since the last snapshot to the spill file,
        fsyncs it, and returns only a reference (``format`` 2: the file's ``uuid``; int64 tensors
        ``clients``, ``slots``, ``crc32`` and bool ``in_memory`` of one entry per client; ``protected``,
        the slot sets of the older kept snapshots): a few bytes per client, whatever ``numel``. The
        newest ``keep_snapshots`` snapshots stay loadable. Without one: every value as a CPU tensor
        (``format`` 1, materialising spilled values in memory).
        """
        if not self._named:
            values = {k: v.cpu() for k, v in self._values.items()}
            values.update({k: self._read(slot) for k, slot in self._slots.items()})
            return {"numel": self.numel, "values": values}
        for client in sorted(self._dirty):
            self._shadow[client] = self._write_cow(self._shadow.get(client), self._values[client])
        self._dirty.clear()
        clients = sorted(self._values) + sorted(self._slots)
        kept = list(self._snapshots)[max(0, len(self._snapshots) + 1 - self.keep_snapshots) :]  # still kept after this
        slots = [self._shadow[c] for c in sorted(self._values)] + [self._slots[c] for c in sorted(self._slots)]
        if self._file is not None:
            assert self._index is not None
            sync = getattr(os, "fdatasync", os.fsync)
            sync(self._file.fileno())
            sync(self._index.fileno())
        state = {
            "format": _FORMAT,
            "numel": self.numel,
            "uuid": self._uuid if clients else None,
            "clients": torch.tensor(clients, dtype=torch.int64),
            "slots": torch.tensor(slots, dtype=torch.int64),
            "crc32": torch.tensor([self._crc[s] for s in slots], dtype=torch.int64),
            "in_memory": torch.tensor([c in self._values for c in clients], dtype=torch.bool),
            "protected": [torch.tensor(sorted(s), dtype=torch.int64) for s in kept],  # older kept snapshots
        }
        self._push_snapshot(frozenset(slots))
        return state

    def _push_snapshot(self, slots: frozenset[int]) -> None:
        self._snapshots.append(slots)
        while len(self._snapshots) > self.keep_snapshots:
            self._snapshots.popleft()
        self._frozen = set().union(*self._snapshots)
        current = set(self._slots.values()) | set(self._shadow.values())
        self._free = [s for s in range(self._num_slots) if s not in self._frozen and s not in current]
        heapq.heapify(self._free)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the values of a :meth:`state_dict` snapshot exactly (either format).

        Raises ``ValueError`` when ``numel`` differs; :class:`~fedgma.checkpoint.CheckpointError` (one
        line) when the spill files it references are missing, of another generation, truncated, or
        were overwritten since the snapshot (it is older than the newest ``keep_snapshots``, or was
        abandoned by resuming from an older one), and when a format-2 state meets a store without
        ``spill_dir``.
        """
        if state.get("numel") != self.numel:
            raise ValueError(f"control variates have {state.get('numel')} entries, the model has {self.numel}")
        version = state.get("format", 1)
        if version == 1:
            self.close()
            self._values, self._dirty = {}, set()
            for k, v in state["values"].items():
                self.set(int(k), v.to(self.device))
            return
        if version != _FORMAT:
            raise CheckpointError(f"control variate store: unknown state format {version!r}; expected 1 or 2")
        if not self._named:
            raise CheckpointError(
                "control variate store: the checkpoint references spilled control variates in "
                f"{_DATA_NAME}; give the store the spill_dir that holds it"
            )
        clients, slots = state["clients"].tolist(), state["slots"].tolist()
        crcs, in_memory = state["crc32"].tolist(), state["in_memory"].tolist()
        self._values, self._slots, self._shadow, self._dirty = {}, {}, {}, set()
        self._crc, self._unverified = {}, set()
        if not clients:
            self._close_files()
            self._snapshots, self._frozen, self._free, self._num_slots = deque(), set(), [], 0
            self._uuid = None
            return
        self._attach(state["uuid"])
        assert self._file is not None and self._index is not None
        size = os.fstat(self._file.fileno()).st_size
        self._num_slots = max(0, (size - _HEADER) // self._row_bytes())
        if max(slots) >= self._num_slots:
            raise CheckpointError(
                f"control variate store: {self._data_path()} holds {self._num_slots} slots, the "
                f"checkpoint references slot {max(slots)}: the file was truncated"
            )
        raw = os.pread(self._index.fileno(), 8 * self._num_slots, _HEADER)
        index = np.frombuffer(raw[: len(raw) // 8 * 8], dtype="<u8")
        for client, slot, crc in zip(clients, slots, crcs, strict=True):
            if slot >= len(index) or int(index[slot]) != _VALID | crc:
                raise CheckpointError(
                    f"control variate store: slot {slot} (client {client}) of {self._data_path()} was overwritten "
                    f"after this checkpoint was written (it is older than the newest {self.keep_snapshots}, or a "
                    "later one was resumed from an earlier checkpoint); resume from the newest checkpoint"
                )
            self._crc[slot] = crc
            self._unverified.add(slot)
        for client, slot, resident in zip(clients, slots, in_memory, strict=True):
            if resident and self._fits_in_memory():
                self._values[client] = self._read(slot).to(self.device)
                self._shadow[client] = slot
            else:
                self._slots[client] = slot
        protected = [frozenset(t.tolist()) for t in state.get("protected", [])]
        self._snapshots = deque(protected[-(self.keep_snapshots - 1) :] if self.keep_snapshots > 1 else [])
        self._push_snapshot(frozenset(slots))
