"""The Triton attention kernels compile for an H100/H200 (sm_90) here, on a machine without a
GPU, with the ptxas that ships in the triton wheel.

The interpreter runs the kernels' Python, not Triton's compiler: a construct the compiler
rejects, or a dot that silently leaves the tensor cores, passes every interpreted test. This
compiles each attention kernel for ``GPUTarget("cuda", 90, 32)`` per query dtype (and a
quantized cache) and reads the PTX: half-precision queries must reach the tensor cores with
their own dtype (``mma``/``wgmma`` with ``bf16.bf16`` or ``f16.f16`` operands, fp32
accumulation); fp32 stays off them (exact fp32 dots, not TF32).

Runs in a child process without ``TRITON_INTERPRET``: in this test session the kernel modules
may already be imported as interpreted functions, which the compiler cannot take.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import inspect, json, sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvtide.kernels import triton_decode, triton_prefill

def compile_sm90(fn, types, consts):
    # Arguments not named in `types` or `consts`: *_ptr are fp32 pointers, scale_log2 an fp32,
    # the rest (lengths, strides, sizes) int32.
    sig, constexprs = {}, {}
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in consts:
            sig[name], constexprs[(i,)] = "constexpr", consts[name]
        else:
            sig[name] = types.get(name, "*fp32" if name.endswith("_ptr") else "fp32" if name == "scale_log2" else "i32")
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))

def mma(ptx):
    return sorted({line.split()[0] for line in ptx.splitlines() if "mma" in line and "." in line.split()[0]})

out = {}
for query, cache, quantized in (("fp32", "fp32", False), ("fp16", "fp16", False), ("bf16", "bf16", False),
                                ("bf16", "i8", True)):
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[query]
    dot = triton_decode.dot_config(dtype, triton_prefill._prefill_kernel)
    types = {"q_ptr": "*" + query, "out_ptr": "*" + query, "k_cache_ptr": "*" + cache, "v_cache_ptr": "*" + cache,
             "block_tables_ptr": "*i64", "query_start_loc_ptr": "*i64", "seq_lens_ptr": "*i64"}
    common = dict(GROUP=3, HEAD_DIM=64, BLOCK_N=64, QUANTIZED=quantized, DOT=dot)
    key = query + ("/" + cache if quantized else "")
    out["prefill " + key] = mma(compile_sm90(triton_prefill._prefill_kernel, types,
                                             dict(common, GROUP_PAD=4, BLOCK_Q=16)).asm["ptx"])
    out["decode " + key] = mma(compile_sm90(triton_decode._decode_split_kernel, types,
                                            dict(common, GROUP_PAD=16, SINGLE_SPLIT=False)).asm["ptx"])
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def mma_by_kernel(tmp_path_factory) -> dict[str, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when it is unset
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("kernel", ["prefill", "decode"])
def test_half_precision_queries_dot_on_the_tensor_cores_in_their_own_dtype(mma_by_kernel, kernel):
    for key, operands in (("fp16", "f16.f16"), ("bf16", "bf16.bf16"), ("bf16/i8", "bf16.bf16")):
        found = mma_by_kernel[f"{kernel} {key}"]
        products = [i for i in found if i.startswith("mma.") or i.startswith("wgmma.mma_async.")]
        assert products and all(f".f32.{operands}" in i for i in products), (key, found)


@pytest.mark.parametrize("kernel", ["prefill", "decode"])
def test_fp32_queries_stay_exact_off_the_tensor_cores(mma_by_kernel, kernel):
    assert mma_by_kernel[f"{kernel} fp32"] == []
