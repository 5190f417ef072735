"""patch_attention under pytest-benchmark: eager (timm's unfold -> attention -> fold), the same around
SDPA, torch.compile and the fused op per backend, on the cases registered in
``fastvit_kernels.bench.cases``; bench/conftest.py parametrizes ``case, dtype, impl`` from that registry
and does the checking and timing."""

OP = "patch_attention"


def test_patch_attention(bench_variant, case, dtype, impl):
    bench_variant(OP, case, dtype, impl)
