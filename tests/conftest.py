import os

import torch

# Triton kernels run in the interpreter on CPU tensors when there is no GPU; this must be set before
# triton is first imported (torch does not import it on its own).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
