"""A chat prompt starts with exactly one BOS when the tokenizer's post-processor adds BOS and
the chat template writes ``{{ bos_token }}`` too (issue 15, item 5): over HTTP, over gRPC and
offline (``kvtide generate``), as transformers and vLLM tokenize it. SmolLM2's own tokenizer,
whose template writes no ``bos_token``, tokenizes its chats as before."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import tokenizers

from kvtide.cluster import local_cmds
from kvtide.cluster.frontend.cluster_state import ClusterState
from kvtide.cluster.frontend.gateway import Gateway
from kvtide.cluster.frontend.grpc_api import KvtideServicer
from kvtide.cluster.frontend.http_api import create_app
from kvtide.cluster.frontend.replicas import ReplicaSet
from kvtide.cluster.frontend.requests import FrontendConfig
from kvtide.proto import kvtide_pb2
from kvtide.proto.block_hash import HASH_VERSION
from kvtide.router import ReplicaRegistration, Router
from kvtide.workers import RequestLimits, SamplingParams
from kvtide.workers.config import EngineConfig, resolve
from kvtide.workers.engine import Engine
from kvtide.workers.llm import LLM
from kvtide.workers.model_files import resolve_model
from kvtide.workers.model_loader import load_model, read_hf_config
from kvtide.workers.tokenizer import Tokenizer, TokenizerConfig
from tests.tiny import write_tiny_llama
from tests.unit.frontend_fakes import FakeReplica

VOCAB_SIZE = 96
WORDS = ["<unk>", "<s>", "</s>", "user", "assistant", ":", "hello", "world"]
WORDS += [f"w{i}" for i in range(VOCAB_SIZE - len(WORDS))]  # the tiny model's vocabulary size
BOS = 1
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
CONFIG = TokenizerConfig(chat_template=TEMPLATE, bos_token="<s>", eos_token="</s>")
HELLO = [{"role": "user", "content": "hello world"}]
ONE_BOS = [BOS, 3, 5, 6, 7, 4, 5]  # <s> user : hello world assistant :
LIMITS = RequestLimits(max_model_len=32, vocab_size=VOCAB_SIZE, max_num_seqs=4, num_blocks=100, block_size=4)


def bos_backend() -> tokenizers.Tokenizer:
    """Word-level, with a post-processor that prepends BOS (as Llama's tokenizer.json does)."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "</s>"])
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    backend.decoder = tokenizers.decoders.WordPiece(prefix="##")
    return backend


def test_the_post_processor_adds_bos_and_the_template_writes_it():
    tokenizer = Tokenizer(bos_backend(), CONFIG)
    rendered = tokenizer.apply_chat_template(HELLO)
    assert rendered.startswith("<s>")
    assert tokenizer.encode("hello world") == [BOS, 6, 7]  # a plain prompt still gets its BOS


def routed_gateway(replica: FakeReplica) -> Gateway:
    router = Router("kv_aware", block_size=LIMITS.block_size)
    state = ClusterState(router, {replica.replica_id: replica}, None)
    state.register(ReplicaRegistration(replica.replica_id, LIMITS.block_size, b"", HASH_VERSION, 100, "tiny"))
    replicas = ReplicaSet({replica.replica_id: replica}, state)
    return Gateway("tiny", LIMITS, Tokenizer(bos_backend(), CONFIG), replicas, FrontendConfig())


def test_an_http_chat_prompt_has_one_bos():
    replica = FakeReplica(tokens=(6,), delay_s=0.0)
    gateway = routed_gateway(replica)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1})

    r = asyncio.run(go())
    assert r.status_code == 200, r.text
    assert list(replica.requests[0].prompt_token_ids) == ONE_BOS
    assert r.json()["usage"]["prompt_tokens"] == len(ONE_BOS)


def test_a_grpc_chat_prompt_and_its_tokenization_have_one_bos():
    replica = FakeReplica(tokens=(6,), delay_s=0.0)
    servicer = KvtideServicer(routed_gateway(replica))
    messages = [kvtide_pb2.ChatMessage(role="user", content="hello world")]

    async def go():
        chat = kvtide_pb2.ChatRequest(messages=messages, params=kvtide_pb2.SamplingParams(max_tokens=1))
        [reply async for reply in servicer.Chat(chat, None)]
        tokenize = kvtide_pb2.TokenizeRequest(chat=kvtide_pb2.ChatRequest(messages=messages))
        return await servicer.Tokenize(tokenize, None)

    tokenized = asyncio.run(go())
    assert list(replica.requests[0].prompt_token_ids) == ONE_BOS
    assert list(tokenized.token_ids) == ONE_BOS


@pytest.fixture(scope="module")
def offline(tmp_path_factory) -> LLM:
    d = write_tiny_llama(tmp_path_factory.mktemp("chat-bos") / "tiny", vocab_size=VOCAB_SIZE)
    bos_backend().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>",
                                                         "eos_token": "</s>"}))  # fmt: skip
    config = EngineConfig.from_kwargs(model=str(d), num_blocks=16, block_size=4, max_num_seqs=2,
                                      max_num_batched_tokens=32)  # fmt: skip
    return LLM(engine=Engine.from_model(load_model(d), resolve(config, str(d), read_hf_config(d))))


def test_an_offline_chat_prompt_has_one_bos(offline, monkeypatch, capsys):
    added = []
    add = offline.engine.add
    monkeypatch.setattr(offline.engine, "add", lambda request: (added.append(request), add(request)))
    monkeypatch.setattr(local_cmds, "_llm", lambda args: offline)
    args = SimpleNamespace(server=None, raw=False, prompt="hello world", max_tokens=1, temperature=0.0,
                           top_p=1.0, top_k=0, seed=None)  # fmt: skip
    assert local_cmds.cmd_generate(args) == 0
    assert list(added[0].prompt_token_ids) == ONE_BOS
    assert list(offline.chat(HELLO, SamplingParams(max_tokens=1)).prompt_token_ids) == ONE_BOS


def test_a_template_that_leaves_the_bos_to_the_tokenizer_still_gets_one():
    tokenizer = Tokenizer(bos_backend(), TokenizerConfig(chat_template=TEMPLATE.removeprefix("{{ bos_token }}"),
                                                         bos_token="<s>"))  # fmt: skip
    assert tokenizer.encode_chat(tokenizer.apply_chat_template(HELLO)) == ONE_BOS


def test_smollm2_chats_tokenize_as_before():
    model_dir = resolve_model("smollm2-135m")
    config = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
    assert "bos_token" not in config["chat_template"]
    tokenizer = Tokenizer.from_dir(model_dir)
    assert tokenizer.backend.post_processor is None and not tokenizer.config.add_bos_token
    rendered = tokenizer.apply_chat_template(HELLO)
    assert tokenizer.encode_chat(rendered) == tokenizer.encode(rendered)
