"""Where a benchmark ran: device, thread count, versions and backends, for the results JSON."""

from __future__ import annotations

import os
import platform
import re
from typing import Optional

import torch

from .. import info
from .bandwidth import datasheet_memory_bandwidth


def cpu_name() -> str:
    """The CPU's model name, with its family / model numbers and the vector ISA ATen runs when
    /proc/cpuinfo has them: a VM may report a bare "AMD EPYC" for CPUs generations apart (this
    project's CI machine was a Zen 3 with AVX2 and later a Zen 5 with AVX-512 under that name)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break  # the first processor's block is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    details = [torch.backends.cpu.get_cpu_capability()]
    if "cpu family" in fields and "model" in fields:
        details.insert(0, f"family {fields['cpu family']} model {fields['model']}")
    return f"{name} ({', '.join(details)})"


def available_cpu_threads() -> int:
    """The cores this process may run on (a container's CPU set, not the host's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def theoretical_memory_gbps(device: torch.device) -> Optional[float]:
    """DRAM bandwidth of a CUDA device from its memory clock and bus width as torch reports them, else
    None. A lead only: the reported clock is not always the one the memory runs at."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate: two transfers per clock


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def device_slug(device: torch.device) -> str:
    """A file-name-safe device name: ``cpu`` or e.g. ``cuda-nvidia-h100-80gb-hbm3``."""
    if device.type != "cuda":
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def describe(device: torch.device, measured_bandwidth: Optional[dict] = None) -> dict:
    """Device and software facts; ``versions`` and ``backends`` come from ``fastvit_kernels.info``.
    ``measured_bandwidth`` is :func:`bandwidth.measure_copy_bandwidth`'s result, measured once per run."""
    facts = info.collect()
    datasheet = datasheet_memory_bandwidth(device_name(device)) if device.type == "cuda" else None
    return {
        "device": {
            "type": device.type,
            "name": device_name(device),
            "cpu": cpu_name(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "threads": torch.get_num_threads(),
            # The roofline's bandwidth: what a large device-to-device copy achieved on this device.
            "peak_memory_gbps": measured_bandwidth["gbps"] if measured_bandwidth else None,
            "memory_bandwidth": {
                "measured": measured_bandwidth,
                "datasheet_gbps": datasheet[0] if datasheet else None,
                "datasheet_part": datasheet[1] if datasheet else None,
                "from_memory_clock_gbps": theoretical_memory_gbps(device),
            },
            # Other processes on a shared machine skew CPU timings; this says how busy it was.
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "versions": {
            "python": facts["python"],
            "torch": facts["torch"],
            "torch.version.cuda": facts["torch.version.cuda"],
            "triton": facts["triton"],
            "fastvit_kernels": facts["fastvit_kernels"],
            "platform": platform.platform(),
        },
        "backends": facts["backends"],
    }
