"""Aggregation memory: folding K updates needs a few d-sized buffers, independent of K.

Peak memory is read from the kernel (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) in
a fresh subprocess, so it counts every allocation torch makes, not only Python objects.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedgma.aggregation import GMAAggregator, MeanAggregator, gma, mean

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists() or sys.platform != "linux", reason="needs Linux /proc peak-RSS reset"
)

D = 1_000_000
K = 200

_SCRIPT = r"""
import json, re, sys, torch
torch.set_num_threads(2)
from fedgma.aggregation import GMAAggregator, gma, mean

def status(key):
    with open("/proc/self/status") as handle:
        return int(re.search(key + r":\s+(\d+)", handle.read()).group(1)) * 1024

def reset():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")

K, D = int(sys.argv[1]), int(sys.argv[2])
source = torch.randn(D, generator=torch.Generator().manual_seed(0))
updates = [source.roll(17 * k) for k in range(K)]  # K distinct d-sized tensors, cheaper than K randn
weights = [float(k % 5 + 1) for k in range(K)]

def stream():
    aggregator = GMAAggregator(threshold=0.4)
    for update, weight in zip(updates, weights):
        aggregator.add(update, weight)
    return aggregator.result()

def stream_and_free():  # the simulation's pattern: each update is freed once folded in
    aggregator = GMAAggregator(threshold=0.4)
    for k in range(K):
        update = source.roll(31 * k)
        aggregator.add(update, 1.0)
        del update
    return aggregator.result()

out = {}
for name, run in [("gma", lambda: gma(updates, weights, 0.4)), ("mean", lambda: mean(updates, weights)),
                  ("stream", stream), ("stream_and_free", stream_and_free)]:
    run()  # warm-up: allocator and thread pool
    base = status("VmRSS")
    reset()
    result = run()
    out[name] = (status("VmHWM") - base) / (4 * D)
    del result
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def peaks() -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(K), str(D)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["gma", "stream", "stream_and_free"])
def test_gma_peak_extra_memory_is_a_few_d_sized_buffers(peaks, name) -> None:
    # two running sums, the mask, the result and the statistics' transient: well under 6 buffers of d
    # floats, against K = 200 for stacking the updates
    assert peaks[name] < 6.0, f"{name}: peak extra memory {peaks[name]:.1f} × d floats"


def test_mean_peak_extra_memory_is_about_one_buffer(peaks) -> None:
    assert peaks["mean"] < 2.5, f"mean: peak extra memory {peaks['mean']:.1f} × d floats"


def test_streaming_gma_keeps_two_running_sums_only() -> None:
    """No d-sized scratch buffer: the state is Σ w·Δ and Σ sign Δ."""
    aggregator = GMAAggregator()
    aggregator.add(torch.randn(100_000), 2.0)
    d_sized = [v for v in vars(aggregator).values() if isinstance(v, torch.Tensor) and v.numel() == 100_000]
    assert len(d_sized) == 2


def test_chunked_forms_agree_bit_for_bit_across_chunk_boundaries() -> None:
    """List form, streaming form and tensor form give identical numbers, at sizes around the chunk size."""
    generator = torch.Generator().manual_seed(3)
    for d in (5, 32767, 32768, 32769, 3 * 32768 + 11, 600_001):
        updates = [torch.randn(d, generator=generator) * (torch.rand(d, generator=generator) > 0.3) for _ in range(7)]
        weights = [3.0, 1.0, 7.5, 2.0, 0.0, 4.0, 1.0]
        for kwargs in ({}, {"threshold": 0.0}, {"threshold": 0.6, "hard": True}, {"weighted_agreement": True}):
            listed, mask = gma(updates, weights, **kwargs)
            stacked, _ = gma(torch.stack(updates), weights, **kwargs)
            streaming = GMAAggregator(**kwargs)
            for update, weight in zip(updates, weights, strict=True):
                streaming.add(update, weight)
            streamed, stats = streaming.result()
            assert torch.equal(listed, streamed) and torch.equal(listed, stacked) and torch.equal(mask, stats["mask"])
        assert torch.equal(gma(updates, weights, threshold=0.0)[0], mean(updates, weights))
        plain = MeanAggregator()
        for update, weight in zip(updates, weights, strict=True):
            plain.add(update, weight)
        assert torch.equal(plain.average(), mean(updates, weights))


def test_result_is_unchanged_when_asked_twice() -> None:
    aggregator = GMAAggregator(threshold=0.5)
    for k in range(4):
        aggregator.add(torch.linspace(-1, 1, 70_000) * (k - 1.5), 1.0 + k)
    first, _ = aggregator.result()
    second, _ = aggregator.result()
    assert torch.equal(first, second)


def test_a_non_finite_update_is_named_even_past_the_first_chunk() -> None:
    updates = [torch.ones(100_000) for _ in range(4)]
    updates[2][90_000] = float("inf")
    updates[3][5] = float("nan")
    with pytest.raises(ValueError, match="client 2: update contains NaN or infinite values"):
        gma(updates)
    with pytest.raises(ValueError, match="client 2: update contains NaN or infinite values"):
        mean(updates)
    # the NaN of client 1 is reported before the shape error of client 2, as the streaming form does
    bad = [torch.ones(10), torch.full((10,), float("nan")), torch.ones(9)]
    with pytest.raises(ValueError, match="client 1: update contains NaN"):
        gma(bad)
    with pytest.raises(ValueError, match=r"client 2: update has shape \(9,\), expected \(10,\) like client 0"):
        gma([torch.ones(10), torch.ones(10), torch.ones(9)])


def test_huge_finite_values_are_not_mistaken_for_non_finite() -> None:
    """The finiteness check sums the update; an overflowing sum of finite values must still pass."""
    big = torch.full((1000,), 3e38)
    aggregator = MeanAggregator()
    aggregator.add(big, 1.0)
    assert torch.equal(aggregator.average(), big)
