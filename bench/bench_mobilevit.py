"""MobileViT XXS / XS / S under pytest-benchmark: timm's model (eager), torch.compile of it and
``fastvit_kernels.models.create_model`` with the same weights per backend, on the cases registered in
``fastvit_kernels.bench.cases``; bench/conftest.py parametrizes ``op, case, dtype, impl`` from that
registry and does the checking and timing. Slow on a CPU (seconds per call, minutes of compile):

    pytest bench/bench_mobilevit.py --benchmark-only -k mobilevit_xxs
"""

OPS = ("mobilevit_xxs", "mobilevit_xs", "mobilevit_s")


def test_mobilevit(bench_variant, op, case, dtype, impl):
    bench_variant(op, case, dtype, impl)
