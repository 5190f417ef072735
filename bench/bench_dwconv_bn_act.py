"""dwconv_bn_act under pytest-benchmark: eager, eager with BN folded, torch.compile and the fused module
per backend, on the cases registered in ``fastvit_kernels.bench.cases``; bench/conftest.py parametrizes
``case, dtype, impl`` from that registry and does the checking and timing."""

OP = "dwconv_bn_act"


def test_dwconv_bn_act(bench_variant, case, dtype, impl):
    bench_variant(OP, case, dtype, impl)
