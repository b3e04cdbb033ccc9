"""``kvtide size`` (cluster/size_cmd.py) and what it prints from: the GPU catalog, the roofline
(workers/roofline.py) by hand, measured engine profiles, and bad flags named in errors."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from kvtide.cluster import size_cmd
from kvtide.workers.gpu_catalog import GPUS, get_gpu
from kvtide.workers.model_shapes import KNOWN_CONFIGS
from kvtide.workers.roofline import (
    EngineProfileMeasurement,
    SpeedEstimate,
    cost_per_million_output_tokens,
    peak_flops,
    roofline_speed,
)
from kvtide.workers.sizing import GpuMemory, ModelShape, ParallelLayout, gpu_shares, plan_kv_cache

LLAMA_8B = ModelShape.from_hf_config(KNOWN_CONFIGS["llama-3-8b"])


def run(capsys, *argv: str) -> tuple[int, dict[str, str]]:
    """Run the command; its output as {label: value}, one per ``label: value`` line."""
    rc = size_cmd.main(list(argv))
    lines = capsys.readouterr().out.splitlines()
    assert all(": " in line for line in lines), lines
    return rc, dict(line.split(": ", 1) for line in lines)


def test_catalog_and_help_agree_and_ampere_has_no_fp8():
    assert size_cmd.KNOWN_GPUS == ", ".join(GPUS)
    assert size_cmd.KNOWN_MODELS == ", ".join(KNOWN_CONFIGS)
    for gpu in GPUS.values():
        assert gpu.memory_bytes > 0 and gpu.bandwidth_bytes_per_s > 0 and gpu.usd_per_hour > 0
        assert gpu.fp32_flops < gpu.bf16_flops
        # FP8 doubles the 16-bit rate (the sheets round: L40S 362.05 and 733 TFLOP/s).
        assert gpu.fp8_flops is None or gpu.fp8_flops == pytest.approx(2 * gpu.bf16_flops, rel=0.03)
    assert [n for n, g in GPUS.items() if g.fp8_flops is None] == ["a100-40gb", "a100-80gb", "a10g"]
    assert get_gpu("H100").with_price(1.5).usd_per_hour == 1.5
    with pytest.raises(ValueError, match="--gpu 'v100' is not in the catalog; known GPUs: h100, h200"):
        get_gpu("v100")


def test_peak_flops_follow_the_weights_format():
    h100, a100 = GPUS["h100"], GPUS["a100-80gb"]
    assert peak_flops(h100, torch.bfloat16, "none") == 989.5e12
    assert peak_flops(h100, torch.bfloat16, "fp8") == 1979e12
    assert peak_flops(a100, torch.bfloat16, "fp8") == 312e12  # no FP8 tensor cores: upcast
    assert peak_flops(h100, torch.bfloat16, "int8") == 989.5e12  # weight-only
    assert peak_flops(h100, torch.float32, "none") == 67e12


def test_roofline_and_cost_by_hand():
    """Llama-3-8B, bf16, one H100: ISL 1024, OSL 256, batch 32, chunks of 1024 tokens,
    0.5 of peak FLOP/s and 0.8 of peak bandwidth."""
    gpu = GPUS["h100"]
    shares = gpu_shares(LLAMA_8B, ParallelLayout(), torch.bfloat16)
    speed = roofline_speed(LLAMA_8B, ParallelLayout(), shares, gpu, 989.5e12, isl=1024, osl=256, batch=32,
                     max_num_batched_tokens=1024, compute_efficiency=0.5, bandwidth_efficiency=0.8)  # fmt: skip
    flops, bandwidth = 0.5 * 989.5e12, 0.8 * 3.35e12
    weights = 8_030_261_248 * 2
    # Prefill: 2 x params + attention (4 x 32 layers x 32 heads x 128 x 512 mean context) per token;
    # a 1024-token chunk takes 33.8 ms of compute against 6.0 ms of weight reads: compute-bound.
    prefill_flops = 2 * 8_030_261_248 + 4 * 32 * 32 * 128 * 512
    assert 1024 * prefill_flops / flops > weights / bandwidth
    assert speed.prefill_tokens_per_s == pytest.approx(flops / prefill_flops, rel=1e-12)
    assert round(speed.prefill_tokens_per_s) == 30_299
    # Decode: 32 sequences at mean context 1024 + 128 read the weights and 32 x 1152 x 128 KiB of KV.
    step_bytes = weights + 32 * 1152 * 131072
    step_flops = 32 * (2 * 8_030_261_248 + 4 * 32 * 32 * 128 * 1152)
    assert step_bytes / bandwidth > step_flops / flops  # memory-bound
    assert speed.decode_step_s == pytest.approx(step_bytes / bandwidth, rel=1e-12)
    assert "decode memory-bound" in speed.source
    # Cost: $2.99 an hour over 32 / 7.80 ms tokens a second; with prefill, a cycle prefills the
    # 32 prompts and then decodes 256 steps.
    cost = cost_per_million_output_tokens(speed, 2.99, 1, isl=1024, osl=256, batch=32)
    assert cost.decode_usd_per_m_output == pytest.approx(2.99 / 3600 / (32 / speed.decode_step_s) * 1e6)
    cycle_s = 32 * 1024 / speed.prefill_tokens_per_s + 256 * speed.decode_step_s
    assert cost.usd_per_m_output == pytest.approx(2.99 / 3600 * cycle_s / (32 * 256) * 1e6)
    assert round(cost.decode_usd_per_m_output, 4) == 0.2023


def test_pipeline_micro_batches_in_the_decode_roofline():
    """PP=2: one sequence crosses both stages in turn; four run as two micro-batches of two,
    and the busiest stage's work on both sets the step."""
    layout = ParallelLayout(pp=2)
    shares = gpu_shares(LLAMA_8B, layout, torch.bfloat16)
    gpu = GPUS["h100"]
    bandwidth = 0.8 * gpu.bandwidth_bytes_per_s

    def step(batch):
        return roofline_speed(LLAMA_8B, layout, shares, gpu, 989.5e12, isl=100, osl=100, batch=batch,
                        max_num_batched_tokens=1024).decode_step_s  # fmt: skip

    def memory(share, b):
        return (share.weight_bytes + b * 150 * share.kv_bytes_per_token) / bandwidth

    assert step(1) == pytest.approx(memory(shares[0], 1) + memory(shares[1], 1))
    assert step(4) == pytest.approx(max(2 * memory(shares[0], 2), 2 * memory(shares[1], 2),
                                        memory(shares[0], 2) + memory(shares[1], 2)))  # fmt: skip


def test_engine_profile_round_trip_interpolation_and_range(tmp_path):
    profile = EngineProfileMeasurement("llama-3-8b", "H100 SXM 80GB", 1, 1, "bfloat16", 2e-5, ((1, 0.01), (9, 0.03)))
    assert EngineProfileMeasurement.from_json(profile.to_json()) == profile
    assert profile.decode_step_at(1) == 0.01
    assert profile.decode_step_at(5) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="batch 10 is outside the profile's measured batch sizes 1-9"):
        profile.decode_step_at(10)
    data = json.loads(profile.to_json()) | {"extra": 1}
    with pytest.raises(ValueError, match="an engine profile has exactly the keys"):
        EngineProfileMeasurement.from_json(json.dumps(data))
    with pytest.raises(ValueError, match=r"decode_step_s\[4\] must be finite and > 0, got 0.0"):
        EngineProfileMeasurement("m", "d", 1, 1, "bfloat16", 1e-5, ((4, 0.0),))


def test_size_prints_the_seed_case_on_an_l4(capsys):
    rc, out = run(capsys, "--model", "llama-3-8b", "--gpu", "l4", "--weight-dtype", "fp16")
    assert rc == 0
    assert out["weight memory per GPU"] == "16.06 GB (14.96 GiB)"
    assert out["memory left after weights per GPU (before any reserve)"] == "7.94 GB (7.39 GiB)"
    assert "24.00 GB (22.35 GiB) each, the catalog's figure" in out["gpu"]
    assert out["kv bytes per token"].startswith("131072 (128.0 KiB) whole model")
    # The same numbers as the sizing function's, and the printed capacity follows from them.
    plan = plan_kv_cache(LLAMA_8B, dtype=torch.float16, block_size=16, memory=GpuMemory(24 * 10**9, 0.9))
    assert out["kv cache tokens"] == f"{plan.num_tokens} ({plan.num_blocks} blocks of 16)"
    assert out["concurrent requests"].startswith(f"{plan.num_blocks // 80} at ISL 1024 + OSL 256 (80 blocks each")
    assert out["speed source"].startswith("roofline: 0.5 x 121 TFLOP/s, 0.8 x 300 GB/s")
    step_ms = float(out["decode step at batch 32"].split(" ms")[0])
    expected_s = (16_060_522_496 + 32 * 1152 * 131072) / (0.8 * 300e9)
    assert step_ms == pytest.approx(expected_s * 1e3, abs=0.005)
    decode_cost = float(out["cost per million output tokens"].split()[0].lstrip("$"))
    assert decode_cost == pytest.approx(0.80 / 3600 * expected_s / 32 * 1e6, abs=0.0005)


def test_size_uses_a_measured_profile_and_says_so(capsys, tmp_path):
    path = tmp_path / "profile.json"
    profile = EngineProfileMeasurement("llama-3-8b", "H100 SXM 80GB", 1, 1, "bfloat16", 1e-4, ((1, 0.01), (64, 0.02)))
    path.write_text(profile.to_json())
    rc, out = run(capsys, "--model", "llama-3-8b", "--gpu", "h100", "--batch", "32", "--profile", str(path))
    assert rc == 0
    assert out["speed source"].startswith(f"measured: {path}")
    assert out["prefill"] == "10000 tokens/s"
    expected = 0.01 + 0.01 * 31 / 63
    assert out["decode step at batch 32"] == f"{expected * 1e3:.2f} ms, {32 / expected:.0f} output tokens/s"
    cost = cost_per_million_output_tokens(SpeedEstimate(1e4, expected, ""), 2.99, 1, 1024, 256, 32)
    assert out["cost per million output tokens"].startswith(
        f"${cost.decode_usd_per_m_output:.3f} decode only, ${cost.usd_per_m_output:.3f} with prefill"
    )


def test_size_by_hand_and_with_pipeline_stages(capsys):
    rc, out = run(capsys, "--params", "8B", "--layers", "32", "--kv-heads", "8", "--head-dim", "128",
                  "--gpu", "a100-40gb", "--tp", "2", "--pp", "2", "--gpu-cost-per-hour", "1")  # fmt: skip
    assert rc == 0
    assert out["model"].startswith("by hand: 8.00 B parameters, 32 layers, 8 KV heads")
    assert out["weight memory per GPU, stage 0 (layers 0-15)"] == "4.00 GB (3.73 GiB)"
    assert out["kv bytes per token"].startswith("131072 (128.0 KiB) whole model, 32768 per GPU of stage ")
    assert "$1/GPU-hour x 4: given on the command line" in out["cost per million output tokens"]


def test_small_models_count_in_millions(capsys):
    rc, out = run(capsys, "--model", "smollm2-135m", "--gpu", "l4", "--weight-dtype", "fp32")
    assert rc == 0
    assert out["model"] == "smollm2-135m: 134.52 M parameters, 30 layers, 9 heads, 3 KV heads, head_dim 64"
    assert out["weight memory per GPU"] == "0.54 GB (0.50 GiB)"  # 134,515,008 x 4 bytes


def test_a_model_that_does_not_fit_says_why(capsys):
    rc, out = run(capsys, "--model", "llama-3-70b", "--gpu", "l4")
    assert rc == 1
    assert out["does not fit"].startswith("max_model_len 8192 does not fit in the KV cache")


LLAMA = ["--model", "llama-3-8b"]
BY_HAND = ["--layers", "32", "--kv-heads", "8", "--head-dim", "128"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*LLAMA, "--tp", "3"], "--tp 3 --pp 1: tp 3 does not split this model"),
        ([*LLAMA, "--gpu-memory-utilization", "0"], r"--gpu-memory-utilization must be in \(0, 1\], got 0.0"),
        ([*LLAMA, "--isl", "8000", "--osl", "500"], r"--isl 8000 \+ --osl 500 = 8500 tokens exceeds max_model_len 8192"),
        ([*LLAMA, "--weight-dtype", "int4"], "--weight-dtype must be one of fp32, bf16, fp16, fp8, int8; got 'int4'"),
        (["--model", "gpt-5"], "--model 'gpt-5' is neither a known name"),
        (["--params", "8B", "--layers", "32"], "give --model, or all of --params, --layers, --kv-heads and --head-dim"),
        (["--params", "lots", *BY_HAND], "--params 'lots' is not a count"),
        ([*LLAMA, "--batch", "0"], "--batch must be >= 1, got 0"),
        ([*LLAMA, "--block-size", "12"], "--block-size must be a power of two, got 12"),
    ],
)
def test_bad_flags_are_named_with_their_value_and_limit(capsys, argv, message):
    assert size_cmd.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvtide: error: ")
    assert re.search(message, err), err


def test_add_parser_registers_the_command():
    parser = argparse.ArgumentParser(prog="kvtide")
    size_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["size", "--model", "qwen2-7b"])
    assert args.func is size_cmd.run and args.threads is None
