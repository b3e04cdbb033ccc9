"""Text to token ids and back, and chat-template rendering, for a Hugging Face-format directory."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


@dataclass(frozen=True)
class TokenizerConfig:
    """The parts of tokenizer_config.json and generation_config.json the engine uses."""

    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    add_bos_token: bool = False
    model_max_length: int | None = None
    generation_eos_token_ids: tuple[int, ...] = ()
    """Extra ids that end generation (generation_config.json's eos_token_id, int or list)."""

    @classmethod
    def from_dir(cls, model_dir: Path) -> TokenizerConfig:
        raw = _read_json(model_dir / "tokenizer_config.json")
        generation = _read_json(model_dir / "generation_config.json")
        eos = generation.get("eos_token_id")
        return cls(
            chat_template=_template(raw.get("chat_template")),
            bos_token=_content(raw.get("bos_token")),
            eos_token=_content(raw.get("eos_token")),
            unk_token=_content(raw.get("unk_token")),
            pad_token=_content(raw.get("pad_token")),
            add_bos_token=bool(raw.get("add_bos_token", False)),
            model_max_length=raw.get("model_max_length"),
            generation_eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        )


def eos_token_ids(model_dir: str | Path) -> frozenset[int]:
    """Every id that ends generation (``Tokenizer.eos_token_ids``), read from the config files
    alone: what an engine needs of the tokenizer, without building one."""
    model_dir = Path(model_dir)
    config = TokenizerConfig.from_dir(model_dir)
    ids = set(config.generation_eos_token_ids)
    if config.eos_token is not None:
        raw = _read_json(model_dir / "tokenizer.json")
        added = {t["content"]: t["id"] for t in raw.get("added_tokens", ())}
        vocab = raw.get("model", {}).get("vocab", {})
        token_id = added.get(config.eos_token, vocab.get(config.eos_token) if isinstance(vocab, dict) else None)
        if token_id is not None:
            ids.add(token_id)
    return frozenset(ids)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _content(token: str | dict | None) -> str | None:
    # tokenizer_config.json writes a special token as a string or as a serialized AddedToken.
    return token.get("content") if isinstance(token, dict) else token


def _template(template: str | list | None) -> str | None:
    # Some configs hold a list of named templates; the engine renders the default one.
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        return named.get("default")
    return template


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special-token and chat-template settings beside it."""

    def __init__(self, backend: tokenizers.Tokenizer, config: TokenizerConfig):
        self.backend = backend
        self.config = config
        self._capped: dict[int, tokenizers.Tokenizer] = {}
        self._template = None
        if config.chat_template is not None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(config.chat_template)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"model directory {str(model_dir)!r} has no tokenizer.json")
        return cls(tokenizers.Tokenizer.from_file(str(path)), TokenizerConfig.from_dir(Path(model_dir)))

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.config.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.config.eos_token)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation: the tokenizer's eos and generation_config's."""
        ids = set(self.config.generation_eos_token_ids)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return frozenset(ids)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        ids = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        named = (self.config.bos_token, self.config.eos_token, self.config.unk_token, self.config.pad_token)
        ids.update(i for i in map(self._id, named) if i is not None)
        return sorted(ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are matched whole.

        With ``add_special_tokens``, tokenizer.json's post-processor runs, and BOS is prepended
        when tokenizer_config.json says ``add_bos_token``, unless the ids already start with it.
        """
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and self.config.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def encode_capped(self, text: str, max_tokens: int, add_special_tokens: bool = True) -> list[int]:
        """``encode``, cut at ``max_tokens`` ids: a caller that can serve no more need not pay to
        hold them all. The encoding runs without the GIL, so a server can run it on a worker
        thread while its event loop goes on (``encode`` holds the GIL throughout)."""
        capped = self._capped.get(max_tokens)
        if capped is None:
            capped = tokenizers.Tokenizer.from_str(self.backend.to_str())
            capped.enable_truncation(max_length=max_tokens)
            self._capped[max_tokens] = capped
        ids = capped.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        bos = self.bos_token_id
        if add_special_tokens and self.config.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids[:max_tokens]

    def add_special_tokens_for_chat(self, rendered: str) -> bool:
        """Whether a chat rendered by ``apply_chat_template`` is encoded with special tokens.

        Not when the text already starts with the BOS token (a template that writes
        ``{{ bos_token }}``, as Llama's, Mistral's and Gemma's do): a post-processor or
        ``add_bos_token`` would put a second BOS before it, and transformers and vLLM encode
        such chats without special tokens. Otherwise yes, as any prompt, so a template that
        leaves the BOS to the tokenizer still gets it.
        """
        bos = self.config.bos_token
        return not (bos and rendered.startswith(bos))

    def encode_chat(self, rendered: str) -> list[int]:
        """Token ids of a chat rendered by ``apply_chat_template``: one BOS at most."""
        return self.encode(rendered, add_special_tokens=self.add_special_tokens_for_chat(rendered))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The chat rendered as prompt text; ``kwargs`` (e.g. ``tools``) reach the template."""
        if self._template is None:
            raise ValueError("this model's tokenizer_config.json has no chat_template; send a prompt instead")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.config.bos_token or "",
            eos_token=self.config.eos_token or "",
            **kwargs,
        )
