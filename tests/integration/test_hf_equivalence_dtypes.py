"""kvtide's greedy output agrees with transformers' in bf16 and fp16 on CPU (issue 14,
criterion 1): for the tiny random Llama and for SmolLM2-135M, on at least 95% of the first 32
tokens over 8 prompts. fp32 is token-identical (tests/integration/test_hf_equivalence.py).

How agreement is counted:
- free-running (what the criterion names, and what is asserted): both generate 32 tokens
  greedily, each from its own tokens; agreement is the share of the 8 x 32 positions whose
  tokens are equal. After a first divergence the continuations differ, so later positions
  rarely agree: one near-tie flipped early costs most of a prompt.
- teacher-forced top-1 (printed beside it): transformers reads each prompt plus kvtide's
  tokens in one forward pass; agreement is the share of positions where its top-1 token is
  kvtide's. Each position is judged on its own, so it measures the model, not the cascade.
  For SmolLM2 this and the batched figure below are measured only when the free-running
  agreement misses (they are diagnoses, and took ~35 of each test's ~90 s); the tiny model
  prints all three every run.

The engine runs one request at a time, with no prefix caching and the prompt prefilled in
one chunk: the same computation shapes as transformers' ``generate`` on one prompt. bf16 and
fp16 CPU matmuls are not batch invariant (a row's result depends on the rows beside it), so
the engine's batched schedule, also printed, rounds differently from a batch of one: it
measures batch invariance rather than the model's numerics and is not asserted.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kvtide.workers.llm import LLM
from kvtide.workers.model_files import resolve_model
from kvtide.workers.sampling_params import SamplingParams
from kvtide.workers.tokenizer import Tokenizer

from tests.tiny import write_tiny_llama

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 32
MIN_AGREEMENT = 0.95
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# EOS is banned on both sides (min_tokens / min_new_tokens) so every prompt yields 32 tokens.
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
PROSE = (Path(__file__).parent.parent / "data" / "prose.txt").read_text()


@dataclass(frozen=True)
class Agreement:
    free_running: float
    """Equal tokens at equal positions, one request at a time (asserted)."""
    free_running_batched: float | None
    """The same with all prompts batched together (printed; None where not measured)."""
    teacher_forced: float | None
    """transformers' top-1 on kvtide's prefix equals kvtide's token (printed; None where not
    measured)."""
    per_prompt: list[int]
    seconds: float

    def line(self, model: str, dtype: str) -> str:
        def share(x: float | None) -> str:
            return "not measured" if x is None else f"{x:.1%}"

        return (
            f"{model} {dtype}: free-running agreement {self.free_running:.1%} (per prompt, of "
            f"{NEW_TOKENS}: {self.per_prompt}); batched {share(self.free_running_batched)}; "
            f"teacher-forced top-1 {share(self.teacher_forced)}; {self.seconds:.0f} s"
        )


def _positionwise(a: list[list[int]], b: list[list[int]]) -> list[int]:
    return [sum(x == y for x, y in zip(p, q, strict=True)) for p, q in zip(a, b, strict=True)]


def measure(model_dir: Path, dtype: str, prompts: list[list[int]], diagnose_always: bool = True) -> Agreement:
    """``diagnose_always=False`` measures the batched and teacher-forced figures only when the
    free-running agreement misses: on SmolLM2 in bf16 they took ~35 of a test's ~90 s."""
    start = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
    gc = copy.deepcopy(hf.generation_config)
    gc.update(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=2)
    with torch.inference_mode():
        want = []
        for p in prompts:
            ids = torch.tensor([p])
            want.append(hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)[0, len(p) :].tolist())
    longest = max(len(p) for p in prompts) + NEW_TOKENS
    llm = LLM(
        str(model_dir), dtype=dtype, num_blocks=256, block_size=16, enable_prefix_caching=False,
        max_prefill_chunk=longest, max_num_batched_tokens=max(2048, longest),
    )  # fmt: skip
    one = [list(llm.generate([p], GREEDY)[0].outputs[0].token_ids) for p in prompts]
    per_prompt = _positionwise(one, want)
    total = len(prompts) * NEW_TOKENS
    free_running = sum(per_prompt) / total
    if not diagnose_always and free_running >= MIN_AGREEMENT:
        return Agreement(free_running, None, None, per_prompt, time.perf_counter() - start)
    batched = [list(out.outputs[0].token_ids) for out in llm.generate(prompts, GREEDY)]
    forced = 0
    with torch.inference_mode():
        for p, got in zip(prompts, one, strict=True):
            logits = hf(torch.tensor([p + got])).logits[0, len(p) - 1 : len(p) + NEW_TOKENS - 1]
            forced += int((logits.argmax(-1) == torch.tensor(got)).sum())
    return Agreement(
        free_running, sum(_positionwise(batched, want)) / total, forced / total, per_prompt, time.perf_counter() - start
    )


def check(model: str, dtype: str, agreement: Agreement) -> None:
    line = agreement.line(model, dtype)
    print(line)
    assert agreement.free_running >= MIN_AGREEMENT, f"{line}; needs >= {MIN_AGREEMENT:.0%} free-running"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("hf_dtypes") / "tiny")


def tiny_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(14)
    lengths = [3, 5, 9, 16, 17, 31, 48, 64]
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_model_agrees_with_transformers(tiny_dir, dtype):
    check("tiny", dtype, measure(tiny_dir, dtype, tiny_prompts()))


@pytest.fixture(scope="module")
def smollm2() -> tuple[Path, list[list[int]]]:
    model_dir = resolve_model("smollm2-135m")
    tok = Tokenizer.from_dir(model_dir)
    prose = tok.encode(PROSE)

    def chat(question: str) -> list[int]:
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]))

    prompts = [
        tok.encode("The capital of France is")[:5],
        tok.encode("def fibonacci(n):\n    "),
        chat("What is 2 + 2?"),
        prose[:61],
        prose[:160],
        prose[:333],
        prose[200:290],
        chat("Write a haiku about the sea."),
    ]
    return model_dir, prompts


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_smollm2_agrees_with_transformers(smollm2, dtype):
    model_dir, prompts = smollm2
    check("smollm2-135m", dtype, measure(model_dir, dtype, prompts, diagnose_always=False))
