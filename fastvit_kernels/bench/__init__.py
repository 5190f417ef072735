"""Benchmarks of the fused ops (later: models) against eager PyTorch and ``torch.compile``.

Command line: ``python -m fastvit_kernels.bench --help`` (or ``fastvit-bench``). What is benchmarked is
the registry in :mod:`fastvit_kernels.bench.cases`; the pytest-benchmark suites under ``bench/`` run the
same cases through :mod:`fastvit_kernels.bench.runner`.
"""

from .cases import REGISTRY, Benchmark, Case, register
from .report import plot_speedups

__all__ = ["REGISTRY", "Benchmark", "Case", "plot_speedups", "register"]
