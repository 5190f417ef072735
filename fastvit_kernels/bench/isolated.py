"""``--isolate``: each variant of a case timed in a fresh Python process of its own.

Why: on the CPU, eager PyTorch spends much of a model's time faulting in fresh pages (glibc returns
large freed blocks to the OS and maps them anew), and how much depends on what the process allocated
before: a timm model timed after other variants in one process ran in 105 ms, alone in a fresh
process in 135-150 ms (EdgeNeXt-XXS, batch 8, CI machine, 2026-11-29). A user's process runs one
model; so does each of these. Every child builds the case as the parent would (same seeds), runs its
variant once on the first input, warms it up and times it, and only then checks that first output
against float64 (the float64 forward's frees would change glibc's state for an eager variant, see
runner.prepare_case), and prints one JSON line.

``--isolate N`` repeats that N times per variant, the variants taking turns (see run_isolated).

    python -m fastvit_kernels.bench.isolated OP CASE_LABEL DTYPE VARIANT WARMUP REPEATS [--quick] [--device D]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

import torch

from . import runner
from .cases import REGISTRY
from .timing import Timing

RESULT_PREFIX = "ISOLATED-RESULT "


def _child(op: str, label: str, dtype: str, variant: str, warmup: int, repeats: int, quick: bool,
           device: torch.device) -> dict:
    benchmark = REGISTRY[op]
    case = next(c for c in runner.select_cases(benchmark, quick, device) if c.label == label)
    backend = variant[len("fused-"):] if variant.startswith("fused-") else None
    torch.manual_seed(0)
    # Timed before the float64 check, which would change glibc's state for an eager variant
    # (runner.prepare_case): the child's process is then as a user's running only this model.
    prepared = runner.prepare_case(benchmark, case, runner.DTYPES[dtype], device, [backend] if backend else [],
                                   use_compile=variant == runner.COMPILED, check=False)
    if variant in prepared.skipped:
        return {"skipped": prepared.skipped[variant], "compile_s": prepared.compile_s}
    prepared.variants = [v for v in prepared.variants if v.name == variant]
    timings = runner.time_variants(prepared, warmup, repeats)
    runner.check_against_float64(prepared)
    result = {"tolerance": prepared.tolerance, "compile_s": prepared.compile_s}
    if variant not in timings:
        return {**result, "skipped": prepared.skipped.get(variant, "timing failed")}
    error = prepared.errors[variant]
    return {**result, "error": error if math.isfinite(error) else None,
            "per_call_s": timings[variant].per_call_s, "calls_per_repeat": timings[variant].calls_per_repeat}


def run_isolated(benchmark, case, dtype: str, device: torch.device, backend_names: List[str], quick: bool,
                 warmup: int, repeats: int, timeout_s: Optional[float] = None,
                 processes: int = 1) -> Tuple[runner.PreparedCase, Dict[str, Timing]]:
    """A PreparedCase holding what the children measured (no inputs) and their timings, for
    ``runner.make_rows``.

    ``processes`` > 1 times every variant but torch.compile (whose compilation takes minutes; it
    runs once) in that many fresh processes, the variants taking turns in an order rotated each
    round, so that a slow spell of the machine falls on all of them; a variant's timing pools the
    repeats of all its processes."""
    prepared = runner.PreparedCase(benchmark, case, runner.DTYPES[dtype], device, [], None, math.inf)
    timings: Dict[str, Timing] = {}
    names = runner.variant_names(benchmark, backend_names)
    for round_index in range(processes):
        todo = [n for n in names if n not in prepared.skipped and (round_index == 0 or n != runner.COMPILED)]
        shift = round_index % max(1, len(todo))
        for name in todo[shift:] + todo[:shift]:
            result = _run_child(benchmark, case, dtype, device, name, quick, warmup, repeats, timeout_s)
            if "tolerance" in result:
                prepared.tolerance = result["tolerance"]  # the same in every child: one eager run, one seed
            if name == runner.COMPILED and result.get("compile_s"):
                prepared.compile_s = result["compile_s"]
            if "skipped" in result:
                prepared.skipped[name] = result["skipped"]
                timings.pop(name, None)
                prepared.variants = [v for v in prepared.variants if v.name != name]
                continue
            error = math.inf if result["error"] is None else result["error"]
            if name in timings:
                timings[name].per_call_s.extend(result["per_call_s"])
                prepared.errors[name] = max(prepared.errors[name], error)
                continue
            kind = runner.FUSED if name.startswith("fused-") else runner.BASELINE
            backend = name[len("fused-"):] if kind == runner.FUSED else None
            prepared.variants.append(runner.Variant(name, kind, None, backend))
            prepared.errors[name] = error
            timings[name] = Timing(list(result["per_call_s"]), result["calls_per_repeat"])
    # make_rows lists the variants in prepare_case's order, whatever order they ran in.
    prepared.variants.sort(key=lambda v: names.index(v.name))
    return prepared, timings


def _run_child(benchmark, case, dtype: str, device: torch.device, name: str, quick: bool, warmup: int,
               repeats: int, timeout_s: Optional[float]) -> dict:
    """One variant timed in a fresh process: the child's result, or ``{"skipped": reason}``."""
    command = [sys.executable, "-m", __name__, benchmark.name, case.label, dtype, name, str(warmup),
               str(repeats), "--device", device.type] + (["--quick"] if quick else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"skipped": f"isolated run took over {timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"isolated run failed (exit {done.returncode}): {tail[:300]}"}
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvit_kernels.bench.isolated",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("op", choices=sorted(REGISTRY))
    parser.add_argument("case")
    parser.add_argument("dtype", choices=sorted(runner.DTYPES))
    parser.add_argument("variant")
    parser.add_argument("warmup", type=int)
    parser.add_argument("repeats", type=int)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        from .environment import available_cpu_threads

        torch.set_num_threads(available_cpu_threads())
    result = _child(args.op, args.case, args.dtype, args.variant, args.warmup, args.repeats, args.quick, device)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
