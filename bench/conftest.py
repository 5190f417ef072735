"""pytest-benchmark glue: the registry's cases, built and checked by ``fastvit_kernels.bench.runner``
exactly as the CLI does, timed by pytest-benchmark. ``bench/bench_registry.py`` takes every registry
entry (ops and whole models; an entry registered later is picked up with no edit here).

    pytest bench/ --benchmark-only                         # every entry, its --quick cases
    pytest bench/ --benchmark-only -m "not model"          # the ops only (models compile for minutes on a CPU)
    pytest bench/ --benchmark-only -k xca_attention        # one entry
    FASTVIT_BENCH_FULL=1 pytest bench/ --benchmark-only    # the full cases, as the CLI with no --quick

The CLI (``python -m fastvit_kernels.bench``) is the tool for quoted numbers: on CUDA it times with
events over batches of calls, while pytest-benchmark's host clock needs a synchronize after every call.
"""

import functools
import os

import pytest
import torch

from fastvit_kernels.bench import REGISTRY, runner
from fastvit_kernels.bench.bandwidth import measure_copy_bandwidth
from fastvit_kernels.bench.environment import available_cpu_threads

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Quick by default: the suite is a check that every entry runs and is correct, with a timing of each;
# quoted numbers come from the CLI. FASTVIT_BENCH_QUICK=0 is the old spelling of FULL=1.
QUICK = not (os.environ.get("FASTVIT_BENCH_FULL", "0") == "1" or os.environ.get("FASTVIT_BENCH_QUICK") == "0")
BACKENDS, BACKENDS_LEFT_OUT = runner.default_backends(DEVICE)


def benchmark_params(op):
    """(case, dtype, variant) triples for ``pytest.mark.parametrize``, case-major so that each case is
    prepared (inputs generated, torch.compile run) once, and ids that name them."""
    entry = REGISTRY[op]
    params = [(case, dtype, impl) for case in runner.select_cases(entry, QUICK, DEVICE)
              for dtype in runner.default_dtypes(DEVICE) for impl in runner.variant_names(entry, BACKENDS)]
    ids = [f"{case.label.replace(' ', '-')}-{dtype}-{impl}" for case, dtype, impl in params]
    return params, ids


def pytest_generate_tests(metafunc):
    """A test taking ``op, case, dtype, impl`` runs every registry entry (or the entries its module
    names in ``OPS``); one naming a single entry in ``OP`` takes ``case, dtype, impl``. Whole-model
    entries carry the ``model`` mark."""
    names = set(metafunc.fixturenames)
    op = getattr(metafunc.module, "OP", None)
    if op is not None and {"case", "dtype", "impl"} <= names:
        params, ids = benchmark_params(op)
        metafunc.parametrize("case,dtype,impl", params, ids=ids)
    elif {"op", "case", "dtype", "impl"} <= names:
        params = []
        for name in getattr(metafunc.module, "OPS", None) or sorted(REGISTRY):
            marks = [pytest.mark.model] if REGISTRY[name].kind == "model" else []
            op_params, op_ids = benchmark_params(name)
            params += [pytest.param(name, *p, marks=marks, id=f"{name}-{i}") for p, i in zip(op_params, op_ids)]
        metafunc.parametrize("op,case,dtype,impl", params)


def pytest_configure(config):
    config.addinivalue_line("markers", "model: a whole-model entry (slow on a CPU: torch.compile takes minutes)")
    if DEVICE.type == "cpu":
        torch.set_num_threads(available_cpu_threads())


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps() -> float:
    """The device's memory bandwidth by a large copy, measured once per session on first use."""
    return measure_copy_bandwidth(DEVICE)["gbps"]


@pytest.fixture(scope="session")
def prepared_case():
    """``prepared_case(op, case, dtype)``: the runner's PreparedCase, kept only for the latest case
    (its rotated inputs span 128 MiB)."""
    cache = {}

    def get(op, case, dtype):
        key = (op, case.label, dtype)
        if key not in cache:
            cache.clear()
            torch.manual_seed(0)
            cache[key] = runner.prepare_case(REGISTRY[op], case, runner.DTYPES[dtype], DEVICE, BACKENDS)
        return cache[key]

    return get


@pytest.fixture
def bench_variant(benchmark, prepared_case):
    """``bench_variant(op, case, dtype, impl)``: check ``impl`` against float64, then time it."""

    def run(op, case, dtype, impl):
        try:
            prepared = prepared_case(op, case, dtype)
        except runner.CaseSkipped as e:
            pytest.skip(str(e))
        if impl in prepared.skipped:
            pytest.skip(f"{impl}: {prepared.skipped[impl]}")
        variant = next(v for v in prepared.variants if v.name == impl)
        error, tolerance = prepared.errors[impl], prepared.tolerance
        benchmark.group = f"{op} {case.label} {dtype}"
        benchmark.extra_info.update(max_abs_error=error, tolerance=tolerance, passed=error <= tolerance)
        # Only our kernels fail the run; a baseline over tolerance is recorded in extra_info.
        if variant.kind == runner.FUSED:
            assert error <= tolerance, f"{impl}: max error {error:.3g} > tolerance {tolerance:.3g}"

        inputs, position = prepared.inputs, [0]

        def call():
            # Rotate through the pre-generated inputs so no call reads a cache-warm input.
            variant.fn(inputs[position[0] % len(inputs)])
            position[0] += 1
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()

        warmup, rounds = runner.settings_for(REGISTRY[op], QUICK)
        with torch.inference_mode(), variant.context():
            benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup, iterations=1)

        stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
        if stats is not None:
            seconds = stats.stats.median
            itemsize = torch.empty((), dtype=prepared.dtype).element_size()
            min_bytes, flops = REGISTRY[op].min_bytes(case, itemsize), REGISTRY[op].flops(case)
            if min_bytes:
                benchmark.extra_info["GB/s"] = min_bytes / seconds / 1e9
                benchmark.extra_info["% of copy bandwidth"] = 100 * min_bytes / seconds / 1e9 / copy_bandwidth_gbps()
            if flops:
                benchmark.extra_info["GFLOP/s"] = flops / seconds / 1e9
            if "batch" in case.params:
                benchmark.extra_info["images/s"] = case.params["batch"] / seconds

    return run
