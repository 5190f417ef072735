"""The memory-bandwidth ceiling of the roofline: measured by one large copy, and the datasheet figure.

The ops are memory-bound, so each op row reports its achieved GB/s (minimum bytes over the median
time) as a share of what the device can actually move. That ceiling is *measured*: a datasheet figure
is never reached (a good copy kernel gets 85-93% of it), and a percentage of it would understate how
close a kernel is to the best possible. The datasheet figure is stored beside it for reference.

Equivalent to::

    src, dst = torch.empty(n, dtype=torch.uint8, device=d).fill_(1), torch.empty_like(src)
    dst.copy_(src)                                  # timed, several repeats
    gbps = 2 * n / median_seconds / 1e9             # every byte read once and written once
"""

from __future__ import annotations

import re
import statistics
import time
from typing import Optional, Tuple

import torch

# Copy sizes: far larger than any cache (H200 L2: 60 MB; a CPU's last-level cache: tens of MB) so the
# copy runs from DRAM, and small enough to allocate twice beside a benchmark. On the CPU smaller
# still, as a --quick run must stay under a minute on two cores.
COPY_BYTES = {"cuda": 2**30, "cpu": 256 * 2**20}
COPY_WARMUP = {"cuda": 2, "cpu": 1}
COPY_REPEATS = {"cuda": 10, "cpu": 5}

# DRAM bandwidth by the vendor's datasheets, in GB/s (10^9 bytes/s), matched against
# torch.cuda.get_device_name() in this order (first match wins; \b keeps "gh200" from matching "h200"):
#   NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4): 40GB SXM
#     1,555 GB/s, 80GB SXM 2,039 GB/s, 80GB PCIe 1,935 GB/s (the 40GB PCIe card has 1,555 too).
#   NVIDIA H100 Tensor Core GPU datasheet: H100 SXM 3.35 TB/s, H100 PCIe 2 TB/s, H100 NVL 3.9 TB/s.
#   NVIDIA H200 Tensor Core GPU datasheet: H200 SXM and H200 NVL 4.8 TB/s.
# torch names them e.g. "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3"
# (SXM5), "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200".
DATASHEET_GBPS = (
    (r"\bh200\b", 4800.0, "H200 SXM/NVL 141GB"),
    (r"\bh100\b.*\bnvl\b", 3900.0, "H100 NVL 94GB"),
    (r"\bh100\b.*\bpcie\b", 2000.0, "H100 PCIe 80GB"),
    (r"\bh100\b", 3350.0, "H100 SXM5 80GB"),
    (r"\ba100\b.*\b80gb\b.*\bpcie\b|\ba100\b.*\bpcie\b.*\b80gb\b", 1935.0, "A100 80GB PCIe"),
    (r"\ba100\b.*\b80gb\b", 2039.0, "A100 80GB SXM"),
    (r"\ba100\b", 1555.0, "A100 40GB"),
)


def datasheet_memory_bandwidth(device_name: str) -> Optional[Tuple[float, str]]:
    """``(GB/s, part)`` from NVIDIA's datasheet for an A100 / H100 / H200 named as
    ``torch.cuda.get_device_name`` names it, else None (other GPUs, CPUs)."""
    name = re.sub(r"[^a-z0-9]+", " ", device_name.lower())  # "A100-SXM4-80GB" -> "a100 sxm4 80gb"
    for pattern, gbps, part in DATASHEET_GBPS:
        if re.search(pattern, name):
            return gbps, part
    return None


def _time_copy(dst: torch.Tensor, src: torch.Tensor) -> float:
    if src.is_cuda:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - t0


def measure_copy_bandwidth(device: torch.device, nbytes: Optional[int] = None,
                           repeats: Optional[int] = None, warmup: Optional[int] = None) -> dict:
    """Median GB/s of ``dst.copy_(src)`` for ``nbytes``-byte tensors on ``device``, counting the bytes
    read plus the bytes written. Returns a JSON-ready dict (gbps, copy_bytes, repeats, spread)."""
    device = torch.device(device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    nbytes = nbytes or COPY_BYTES[kind]
    repeats = repeats or COPY_REPEATS[kind]
    warmup = COPY_WARMUP[kind] if warmup is None else warmup
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = min(nbytes, free // 4)  # two buffers, and room left for whatever else runs
    # Filled, not torch.empty: untouched CPU pages would be faulted in during the first timed copy.
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(warmup):  # page faults, lazy CUDA init, clocks ramping up
        _time_copy(dst, src)
    seconds = [_time_copy(dst, src) for _ in range(repeats)]
    del src, dst
    median = statistics.median(seconds)
    return {"gbps": 2 * nbytes / median / 1e9, "copy_bytes": nbytes, "repeats": repeats,
            "min_gbps": 2 * nbytes / max(seconds) / 1e9, "max_gbps": 2 * nbytes / min(seconds) / 1e9,
            "method": "dst.copy_(src), bytes read + bytes written, median of repeats after warm-up"}


__all__ = ["DATASHEET_GBPS", "datasheet_memory_bandwidth", "measure_copy_bandwidth"]
