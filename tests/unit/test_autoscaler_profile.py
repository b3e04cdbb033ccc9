"""Engine profiles sized from an ISL/OSL distribution, through the one KV sizing function."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kvtide.cluster.autoscaler.cost_model import EngineCostModel
from kvtide.cluster.autoscaler.kv_capacity import kv_tokens_capacity
from kvtide.cluster.autoscaler.profile import EngineProfile
from kvtide.cluster.autoscaler.profile_build import ProfileOptions, build_profile
from kvtide.cluster.autoscaler.traces import read_arrivals, read_lengths
from kvtide.workers.config import CacheConfig, EngineConfig, ModelConfig, resolve
from tests.tiny import tiny_llama_config

# 2 layers x 2 KV heads x 16 dims, fp32: 2 * 2 * 2 * 16 * 4 = 512 bytes a token.
MODEL = tiny_llama_config(num_layers=2, num_kv_heads=2, head_dim=16, max_position=512)
MIB = 1 / 1024  # GiB: 2**20 bytes = 2048 tokens = 128 blocks of 16
ISL = [50] * 99 + [300]
OSL = [10] * 99 + [20]


def test_profile_sizes_max_model_len_to_the_p99_and_reports_the_concurrency_gain():
    report = build_profile(ISL, OSL, MODEL, ProfileOptions(name="chat", kv_cache_gib=MIB))
    p = report.profile
    assert p.max_model_len == 64  # p99 of ISL+OSL: the 99th of 100 values, 60, rounded up to 16
    assert report.kv_tokens == 2048 and report.model_max_kv_tokens == 2048
    assert report.concurrency == 32 and report.model_max_concurrency == 4  # 2048 // 64, 2048 // 512
    assert report.num_over == 1  # the 320-token request
    assert p.max_num_seqs == 32  # 2048 // the mean length (62.6) rounded up to 64
    assert p.max_prefill_chunk == 256 and p.max_num_batched_tokens == 288  # median prompt 50 -> the 256 floor
    text = report.describe()
    assert "gain x8.00, +28 concurrent requests" in text
    assert "1 requests (1.00%) are longer and would be refused" in text


def test_kv_capacity_is_what_the_engine_allocates():
    for kv_dtype in ("auto", "int8"):
        profile = EngineProfile("p", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64,
                                kv_cache_dtype=kv_dtype, kv_cache_gib=MIB)
        engine = resolve(EngineConfig(model=ModelConfig(device="cpu"), cache=CacheConfig(
            kv_cache_memory_gib=MIB, kv_cache_dtype=kv_dtype)), "unused", MODEL)
        assert kv_tokens_capacity(MODEL, profile) == engine.num_blocks * engine.block_size


def test_kv_capacity_follows_dtype_and_tensor_parallelism():
    base = EngineProfile("p", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64, kv_cache_gib=MIB)
    assert kv_tokens_capacity(MODEL, base) == 2048
    # int8 rows are 16 codes + a 4-byte scale: 2 * 2 * 2 * 20 = 160 bytes a token.
    assert kv_tokens_capacity(MODEL, dataclasses.replace(base, kv_cache_dtype="int8")) == 2**20 // (160 * 16) * 16
    assert kv_tokens_capacity(MODEL, dataclasses.replace(base, tp=2)) == 4096  # one KV head per device


def test_max_model_len_is_capped_at_the_models_context():
    report = build_profile([600] * 10, [100] * 10, MODEL, ProfileOptions(kv_cache_gib=MIB))
    assert report.profile.max_model_len == 512 and report.num_over == 10


def test_a_cost_model_bounds_the_chunk_by_the_itl_slo_and_sets_weights_and_capacity():
    cost = EngineCostModel(base_s=0.01, per_decode_row_s=0.001, per_prefill_token_s=0.001)
    report = build_profile(ISL, OSL, MODEL, ProfileOptions(kv_cache_gib=MIB, itl_slo_s=0.2), cost)
    p = report.profile
    # 32 decode rows cost 0.032 s; a chunk of 144 makes 0.186 s, 160 would make 0.202 s > 0.2.
    assert p.max_prefill_chunk == 144
    assert p.router_weights.decode_weight == 1.0  # a decode row costs one prefill token here
    assert p.capacity.prefill_tokens_per_s == pytest.approx(144 / 0.154)
    assert p.capacity.decode_tokens_per_s == pytest.approx(32 / 0.042)


def test_a_profile_that_cannot_hold_one_sequence_is_refused():
    with pytest.raises(ValueError, match="max_model_len 64 does not fit in the KV cache"):
        build_profile(ISL, OSL, MODEL, ProfileOptions(kv_cache_gib=2 * 512 * 16 / 2**30))


def test_profile_command_prints_the_profile_from_a_bench_records_file(tmp_path, capsys):
    import argparse

    from kvtide.cluster.autoscaler import profile_cmd

    records = tmp_path / "run.jsonl"
    records.write_text("".join(json.dumps({"isl": i, "osl": o, "ttft_s": 0.1}) + "\n" for i, o in zip(ISL, OSL)))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(MODEL))
    parser = argparse.ArgumentParser(prog="kvtide")
    profile_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["profile", str(records), "--hf-config", str(config), "--kv-cache-gib", str(MIB),
                              "--name", "chat", "--yaml"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "profile chat: max_model_len 64" in out
    assert "gain x8.00, +28 concurrent requests" in out
    assert "profiles:\n  chat:\n    max_model_len: 64\n" in out


def test_profile_command_takes_a_seasons_window_of_a_day_trace(tmp_path, capsys):
    import argparse

    from kvtide.cluster.autoscaler import profile_cmd

    day = tmp_path / "day.csv"
    # Mornings short, evenings long; times in seconds from local midnight.
    day.write_text("arrival_s,isl,osl,service\n" + "".join(f"{9 * 3600 + i},40,8,a\n" for i in range(50))
                   + "".join(f"{20 * 3600 + i},200,40,b\n" for i in range(50)))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(MODEL))
    parser = argparse.ArgumentParser(prog="kvtide")
    profile_cmd.add_parser(parser.add_subparsers(dest="command"))
    for window, length in (("08:00-12:00", 48), ("19:00-21:00", 240)):
        args = parser.parse_args(["profile", str(day), "--hf-config", str(config), "--kv-cache-gib", str(MIB),
                                  "--window", window])
        assert args.func(args) == 0
        out = capsys.readouterr().out
        assert f"requests arriving {window}" in out and "50 requests:" in out
        assert f"max_model_len {length} " in out
    with pytest.raises(ValueError, match="--window: '12:00-08:00' must end after it starts"):
        args.window = "12:00-08:00"
        args.func(args)


def test_traces_read_each_format(tmp_path):
    azure = tmp_path / "a.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,4808,10\n"
                     "2023-11-16 18:17:05.4799600,31,7\n")
    assert read_lengths(azure) == ([4808, 31], [10, 7])
    assert [a.arrival_s for a in read_arrivals(azure)] == [0.0, 1.5]
    mooncake = tmp_path / "m.jsonl"
    mooncake.write_text('{"timestamp": 500, "input_length": 9, "output_length": 3, "hash_ids": [1]}\n'
                        '{"timestamp": 0, "input_length": 5, "output_length": 2, "hash_ids": [2]}\n')
    assert [(a.arrival_s, a.isl, a.osl) for a in read_arrivals(mooncake)] == [(0.0, 5, 2), (0.5, 9, 3)]
    records = tmp_path / "records.jsonl"
    records.write_text('{"isl": 5, "osl": 2, "warmup": true, "error_code": null}\n'
                       '{"isl": 6, "osl": 3, "warmup": false, "error_code": null}\n'
                       '{"isl": 7, "osl": 0, "warmup": false, "error_code": "UNAVAILABLE"}\n')
    assert read_lengths(records) == ([6], [3])  # warmups and failures left out, as the bench's summary does
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"isl": 5, "osl": 2}\n{"isl": 0, "osl": 2}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2: isl must be a positive integer, got 0"):
        read_lengths(bad)
    untimed = tmp_path / "n.jsonl"
    untimed.write_text('{"isl": 5, "osl": 2}\n{"isl": 6, "osl": 2}\n')
    with pytest.raises(ValueError, match="2 of 2 requests have no arrival time"):
        read_arrivals(untimed)


def test_replica_capacity_weighs_contexts_by_token():
    from kvtide.cluster.autoscaler.cost_model import mix_contexts, replica_capacity

    contexts = mix_contexts([100, 300], [10, 30])
    assert contexts.prefill_offset == 125.0  # (100^2 + 300^2) / (2 * 400): the long prompt holds 3/4 of the tokens
    assert contexts.decode_context == 262.5  # (10 * 105 + 30 * 315) / 40
    cost = EngineCostModel(base_s=0.05, per_decode_row_s=0.01, per_prefill_token_s=0.001, per_prefill_pair_s=1e-6,
                           per_decode_pair_s=1e-5)
    cap = replica_capacity(cost, chunk_tokens=100, max_decode_rows=64, contexts=contexts, itl_slo_s=0.5)
    assert cap.prefill_tokens_per_s == pytest.approx(100 / (0.05 + 0.1 + 100 * 125 * 1e-6))
    # A row costs 0.01 + 262.5e-5 s; (0.5 - 0.05) / 0.012625 = 35.6: 35 rows per step.
    assert cap.decode_tokens_per_s == pytest.approx(35 / (0.05 + 35 * 0.012625))
