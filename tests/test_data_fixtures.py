"""Shared helpers for the data tests (no tests here): real data paths, a small tokenizer.

The tokenizer is a byte-level BPE trained here on GSM8K text with the `tokenizers` library and
a Qwen3-style chat template written here; nothing is downloaded."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from functools import lru_cache

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("ATESD_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))
GSM8K_TRAIN = os.path.join(DATA, "gsm8k", "train.jsonl")
MATH_EVAL = os.path.join(DATA, "math_eval")

# Qwen3's template reduced to what the prompts use: user/assistant turns in ChatML, and an empty
# think block after the assistant header when thinking is switched off.
QWEN3_STYLE_TEMPLATE = """{%- for message in messages %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- endif %}
{%- endif %}"""


def need(path: str) -> str:
    if not os.path.exists(path):
        pytest.skip(f"shared data not found at {path} (set ATESD_SHARED_DATA)")
    return path


def gsm8k_rows(n: int | None = None) -> list[dict]:
    rows = []
    with open(need(GSM8K_TRAIN), encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if n is not None and len(rows) == n:
                break
    return rows


_TMP = tempfile.mkdtemp(prefix="atesd-data-test-")
atexit.register(shutil.rmtree, _TMP, True)


@lru_cache(maxsize=None)
def bpe_dir(vocab_size: int = 1024) -> str:
    """A HF tokenizer directory trained on the first 1,000 GSM8K rows (once per session)."""
    from atesd_mc.data.tokenizer import train_byte_level_bpe

    out = os.path.join(_TMP, f"bpe{vocab_size}")
    texts = [r["question"] + "\n" + r["answer"] for r in gsm8k_rows(1000)]
    train_byte_level_bpe(texts, out, vocab_size, chat_template=QWEN3_STYLE_TEMPLATE)
    return out


def bpe_tokenizer(vocab_size: int = 1024):
    from atesd_mc.data.tokenizer import load_tokenizer

    return load_tokenizer(bpe_dir(vocab_size))


def tmp_dir() -> str:
    return tempfile.mkdtemp(dir=_TMP)
