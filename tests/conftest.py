import os

import torch

# Triton kernels run in the interpreter on CPU tensors when there is no GPU; this must be set before
# triton is first imported (torch does not import it on its own).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests compare float32 results with float64 references and with timm / vit-pytorch run in
# float32. cuDNN runs float32 convolutions in TF32 by default (10-bit mantissa): both sides would
# then differ by TF32 rounding, at random, not by what the code under test does (seen on an H200:
# CvT, LeViT and EdgeNeXt training comparisons off by ~1e-4). Plain float32 everywhere in the tests;
# the benchmarks keep PyTorch's defaults, as users run it.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
