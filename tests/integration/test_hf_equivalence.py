"""kvtide's greedy output is token-identical to Hugging Face transformers' on SmolLM2-135M.

The reference is transformers' LlamaForCausalLM on the same converted weights
(tests/integration/test_model_files.py checks the conversion against transformers' own GGUF
loader). Every engine mode must reproduce the same tokens:
one request at a time, all at once, prefix caching on and off, small prefill chunks, and a
KV cache too small for the whole batch (preemption by recompute).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from kvtide.workers.config import EngineConfig, resolve
from kvtide.workers.engine import Engine
from kvtide.workers.model_files import resolve_model
from kvtide.workers.model_loader import load_model, read_hf_config
from kvtide.workers.sampling_params import SamplingParams
from kvtide.workers.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

NEW_TOKENS = 64
PROSE = (Path(__file__).parent.parent / "data" / "prose.txt").read_text()


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def prompts(model_dir) -> list[list[int]]:
    tok = Tokenizer.from_dir(model_dir)
    prose = tok.encode(PROSE)
    assert len(prose) >= 1000
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}]))
    return [
        tok.encode("The capital of France is")[:5],
        tok.encode("def fibonacci(n):\n    "),
        chat,
        prose[:61],
        prose[:160],  # exactly 10 blocks of 16
        prose[:333],
        prose[:600],
        prose[:1000],
    ]


@pytest.fixture(scope="module")
def hf_outputs(model_dir, prompts) -> list[list[int]]:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gc = copy.deepcopy(hf.generation_config)
    # EOS is banned on both sides (min_new_tokens / min_tokens) so every prompt yields 64 tokens.
    gc.update(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=2)
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
            outs.append(out[0, len(p) :].tolist())
    return outs


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


def _engine(model, model_dir, **kwargs) -> Engine:
    config = EngineConfig.from_kwargs(model=str(model_dir), **kwargs)
    return Engine.from_model(model, resolve(config, str(model_dir), read_hf_config(model_dir)))


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)


def _run_all(engine: Engine, prompts, order=None) -> list[list[int]]:
    outs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for i in order or range(len(prompts)):
        engine.add_request(str(i), prompts[i], GREEDY)
    while engine.has_unfinished_requests():
        for d in engine.step():
            outs[d.request_id].extend(d.token_ids)
    return [outs[str(i)] for i in range(len(prompts))]


def _run_one_at_a_time(engine: Engine, prompts) -> list[list[int]]:
    return [_run_all(engine, [p])[0] for p in prompts]


def test_one_at_a_time(model, model_dir, prompts, hf_outputs):
    engine = _engine(model, model_dir, num_blocks=256)
    assert _run_one_at_a_time(engine, prompts) == hf_outputs
    # The prose prompts are prefixes of each other, so later ones hit the prefix cache.
    assert engine.stats().prefix_cache_hit_tokens >= 600


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_all_at_once(model, model_dir, prompts, hf_outputs, prefix_caching):
    engine = _engine(model, model_dir, num_blocks=256, enable_prefix_caching=prefix_caching)
    assert _run_all(engine, prompts) == hf_outputs
    if not prefix_caching:
        assert engine.stats().prefix_cache_hit_tokens == 0


def test_small_prefill_chunks(model, model_dir, prompts, hf_outputs):
    engine = _engine(model, model_dir, num_blocks=256, max_prefill_chunk=32, max_num_batched_tokens=96)
    assert _run_all(engine, prompts, order=[7, 0, 6, 1, 5, 2, 4, 3]) == hf_outputs


def test_cache_too_small_preempts(model, model_dir, prompts, hf_outputs):
    # 80 blocks x 16 = 1,280 tokens: the longest request (1,064 tokens) fits alone, the batch
    # (about 2,700 tokens) does not, so requests are preempted and recomputed.
    engine = _engine(model, model_dir, num_blocks=80, enable_prefix_caching=False)
    assert _run_all(engine, prompts) == hf_outputs
    assert engine.stats().num_preemptions > 0
    assert engine.kv.num_free_blocks == 80
