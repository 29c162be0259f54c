import os

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. The variable is read when kernels
# are defined, so it must be set before any test imports quant.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
