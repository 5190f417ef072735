"""Every entry of ``fastvit_kernels.bench.cases.REGISTRY`` under pytest-benchmark: for each case, dtype
and variant (eager, the entry's extra baselines, torch.compile, the fused module per backend), the
variant is checked against float64 and timed. bench/conftest.py parametrizes ``op, case, dtype, impl``
from the registry, so an op or model registered later is benchmarked here with no edit.

    pytest bench/ --benchmark-only                    # every entry, quick cases
    pytest bench/ --benchmark-only -m "not model"     # the ops only
"""


def test_registry_entry(bench_variant, op, case, dtype, impl):
    bench_variant(op, case, dtype, impl)
