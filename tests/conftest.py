import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. The variable is read when kernels
# are defined, so it must be set before any test imports quant.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def interpreter_loops():
    """Triton 3.6's interpreter turns a loop bound computed at run time into a 1-element array that
    numpy >= 2.4 refuses to convert to an int (triton-lang/triton#9171, fixed after 3.6); the GEMM
    kernels (quant.kernels_int8) loop over K and over tiles with such bounds."""
    from quant import kernels
    if not kernels.INTERPRET:
        yield
        return
    from triton.runtime import interpreter
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched
    yield
    interpreter._patch_lang_tensor = patch_tensor
