"""Run Triton kernels under the interpreter on machines without CUDA.

Import this before anything that imports ``kvtide.kernels.triton_*``: ``@triton.jit`` reads
``TRITON_INTERPRET`` when a kernel module is imported. With CUDA the kernels compile and the
``cuda`` cases run (marked ``gpu``); without it they run on CPU tensors in the interpreter.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

DEVICES = [
    pytest.param("cpu", id="interpret", marks=pytest.mark.skipif(not INTERPRET, reason="TRITON_INTERPRET is off")),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA without the interpreter"),
    ]),
]
