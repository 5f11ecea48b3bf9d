"""One tokenizer interface over HuggingFace (tokenizer.json / vocab+merges) and sentencepiece.

Both kinds share the same contract:
* ``encode(text)`` never adds BOS/EOS: prompts are assembled from pieces (teacher prefix,
  reference segments, answer, transition), and a BOS per piece would corrupt them. The chat
  template is responsible for any BOS the model needs.
* added/special tokens written literally in the text (``<|im_start|>``) encode to their single id.
* ``apply_chat_template`` renders a jinja2 template in a sandbox, the way transformers does
  (trim_blocks, lstrip_blocks, ``raise_exception``, ``tojson``), so a Qwen3 tokenizer_config's
  template renders identically without importing transformers (3 s at import).
* ``identity()`` is a sha256 over the files that define the tokenizer; problem stores record it
  and refuse to be read with another tokenizer.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import Iterable, Sequence

# ChatML with Qwen3's thinking switch. Used by sentencepiece tokenizers (the synthetic task) and by
# HF tokenizers whose files carry no chat template.
BUILTIN_CHAT_TEMPLATE = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# Files whose bytes define an HF tokenizer's behaviour (hashed by identity()).
_HF_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


class TokenizerError(ValueError):
    """A tokenizer could not be loaded or used; the message names the path."""


@lru_cache(maxsize=16)
def _compile_template(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False,
                                                                   indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


class Tokenizer(ABC):
    """What the data pipeline, trainer and evaluation need from a tokenizer."""

    kind: str = "abstract"
    chat_template: str = BUILTIN_CHAT_TEMPLATE
    bos_token: str | None = None
    eos_token: str = "<|im_end|>"

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of text, without BOS/EOS."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ids."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a whole token (e.g. a special token), or None."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""

    @abstractmethod
    def identity(self) -> str:
        """sha256 hex digest over the files that define this tokenizer."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @property
    def eos_id(self) -> int:
        return self._required_id(self.eos_token, "eos_token")

    @property
    def pad_id(self) -> int:
        return self.eos_id

    def _required_id(self, token: str, what: str) -> int:
        tid = self.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"{self.describe()['path']}: {what} {token!r} is not in the vocab")
        return tid

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            enable_thinking: bool = True) -> str:
        """Render messages ({role, content}) with the tokenizer's template, as text."""
        return _compile_template(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking, bos_token=self.bos_token or "",
            eos_token=self.eos_token)

    def describe(self) -> dict:
        """What a problem store's manifest records about the tokenizer."""
        return {"kind": self.kind, "path": getattr(self, "path", ""), "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "pad_id": self.pad_id, "identity": self.identity()}


def _token_content(value) -> str | None:
    """tokenizer_config.json stores special tokens as "tok" or {"content": "tok", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _load_hf_backend(path: str, config: dict):
    """A `tokenizers.Tokenizer` from tokenizer.json, else from vocab.json + merges.txt."""
    from tokenizers import Tokenizer as RustTokenizer

    tj = os.path.join(path, "tokenizer.json")
    if os.path.exists(tj):
        return RustTokenizer.from_file(tj)
    if not (os.path.exists(os.path.join(path, "vocab.json"))
            and os.path.exists(os.path.join(path, "merges.txt"))):
        raise TokenizerError(f"{path}: no tokenizer.json and no vocab.json + merges.txt")
    # Without tokenizer.json the normaliser and pre-tokeniser regex are implied by the tokenizer
    # class (Qwen2Tokenizer: NFC + Qwen's split regex); transformers knows each class's choice.
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise TokenizerError(f"{path}: vocab.json + merges.txt needs transformers ({e})") from e
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many types here; keep the path in the message
        raise TokenizerError(f"{path}: transformers could not load the tokenizer: {e}") from e
    return tok.backend_tokenizer


def _read_chat_template(path: str, config: dict) -> str | None:
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl


class HFTokenizer(Tokenizer):
    """A HuggingFace tokenizer directory, read with the `tokenizers` library."""

    kind = "hf"

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise TokenizerError(f"{path}: not a directory")
        self.path = path
        config = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg_file):
            with open(cfg_file, encoding="utf-8") as f:
                config = json.load(f)
        self._tok = _load_hf_backend(path, config)
        self.chat_template = _read_chat_template(path, config) or BUILTIN_CHAT_TEMPLATE
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token")) or self._first_present(
            ("<|im_end|>", "<|endoftext|>", "</s>"))
        self._pad_token = _token_content(config.get("pad_token"))
        self._identity: str | None = None

    def _first_present(self, candidates: Iterable[str]) -> str:
        for c in candidates:
            if self._tok.token_to_id(c) is not None:
                return c
        raise TokenizerError(f"{self.path}: no eos_token in tokenizer_config.json and none of "
                             f"{list(candidates)} in the vocab")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        if self._pad_token and self.token_to_id(self._pad_token) is not None:
            return self.token_to_id(self._pad_token)
        return self.eos_id

    def identity(self) -> str:
        if self._identity is None:
            h = hashlib.sha256(b"hf\0")
            for name in _HF_FILES:
                fp = os.path.join(self.path, name)
                if os.path.exists(fp):
                    with open(fp, "rb") as f:
                        data = f.read()
                    h.update(f"{name}\0{len(data)}\0".encode())
                    h.update(data)
            self._identity = h.hexdigest()
        return self._identity


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model with the built-in ChatML template (chat markers as user symbols)."""

    kind = "sentencepiece"

    def __init__(self, path: str | None = None, model_proto: bytes | None = None):
        import sentencepiece as spm

        if model_proto is None:
            if path is None or not os.path.isfile(path):
                raise TokenizerError(f"{path}: sentencepiece model file not found")
            with open(path, "rb") as f:
                model_proto = f.read()
        self.path = path or "<memory>"
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            special = {self.token_to_id(t) for t in CHAT_SPECIAL_TOKENS}
            ids = [i for i in ids if i not in special]
        return self._sp.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        tid = self._sp.piece_to_id(token)
        # piece_to_id answers unk for unknown pieces; only a real match counts.
        return tid if self._sp.id_to_piece(tid) == token else None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._required_id("<|endoftext|>", "pad token")

    def identity(self) -> str:
        h = hashlib.sha256(b"sentencepiece\0")
        h.update(self._proto)
        h.update(self.chat_template.encode())
        return h.hexdigest()


def load_tokenizer(path: str) -> Tokenizer:
    """A .model file (sentencepiece) or a HF tokenizer directory."""
    if os.path.isfile(path):
        if path.endswith(".model"):
            return SentencePieceTokenizer(path)
        raise TokenizerError(f"{path}: a file must be a sentencepiece .model")
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, n)) for n in ("tokenizer.json", "vocab.json")):
            return HFTokenizer(path)
        sp = os.path.join(path, "tokenizer.model")
        if os.path.exists(sp):
            return SentencePieceTokenizer(sp)
        raise TokenizerError(f"{path}: no tokenizer.json, vocab.json or tokenizer.model inside")
    raise TokenizerError(f"{path}: no such tokenizer file or directory")


def train_sentencepiece(texts: Iterable[str], vocab_size: int, output_path: str | None = None,
                        *, model_type: str = "bpe", phrases: Iterable[str] = ()) -> bytes:
    """Train a small sentencepiece model in memory; same corpus -> same model bytes.

    Lossless by construction (identity normalisation, no whitespace folding, byte fallback) so
    decode(encode(x)) == x; the chat markers, "\\n" and every string in `phrases` are
    user-defined symbols (one token each wherever they occur). One thread, because
    multi-threaded training is not byte-deterministic. Writes output_path if given."""
    import sentencepiece as spm

    # sentencepiece matches user-defined symbols after escaping spaces to U+2581.
    phrases = [p.replace(" ", "\u2581") for p in phrases]

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
        model_type=model_type, num_threads=1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, byte_fallback=True,
        character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=[*CHAT_SPECIAL_TOKENS, "\n", *phrases], unk_id=0, bos_id=-1, eos_id=-1,
        pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    model = buf.getvalue()
    if output_path is not None:
        tmp = f"{output_path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(model)
        os.replace(tmp, output_path)
    return model


# Qwen2/Qwen3's pre-tokeniser split: single digits, letter runs with one leading non-letter,
# newline runs on their own. Every piece boundary the teacher prompt uses follows a newline and
# precedes a non-space, so with this split tokenising the pieces separately equals tokenising
# the whole prompt (tests check this).
QWEN_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                      r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_byte_level_bpe(texts: Iterable[str], output_dir: str, vocab_size: int,
                         chat_template: str | None = None) -> HFTokenizer:
    """Train a Qwen-style byte-level BPE (NFC, Qwen split, byte-level) and save it as a HF dir.

    For tests and small experiments; deterministic for a given corpus. Writes tokenizer.json
    and tokenizer_config.json (eos <|im_end|>, pad <|endoftext|>, the given chat template)."""
    from tokenizers import Regex, Tokenizer as RustTokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(CHAT_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(output_dir, exist_ok=True)
    tok.save(os.path.join(output_dir, "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
              "chat_template": chat_template or BUILTIN_CHAT_TEMPLATE}
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    return HFTokenizer(output_dir)
