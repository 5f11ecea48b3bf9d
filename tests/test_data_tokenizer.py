"""Tokenizer interface over HF (tokenizer.json, vocab+merges) and sentencepiece."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from test_data_fixtures import QWEN3_STYLE_TEMPLATE, bpe_dir, bpe_tokenizer, gsm8k_rows, tmp_dir

from atesd_mc.data.tokenizer import (SentencePieceTokenizer, TokenizerError, load_tokenizer,
                                     train_sentencepiece)

TEXT = "Natalia sold 48/2 = 24 clips in May.\n\n  x=3.5, é 漢 \\boxed{72}\n"


def test_hf_roundtrip_and_special_tokens():
    tok = bpe_tokenizer()
    assert tok.kind == "hf" and tok.vocab_size == 1024
    assert tok.decode(tok.encode(TEXT)) == TEXT  # byte-level: lossless, unseen characters too
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == im_start
    assert tok.encode("hi<|im_end|>")[-1] == im_end
    assert tok.eos_id == im_end and tok.pad_id == tok.token_to_id("<|endoftext|>")
    assert tok.eos_id != tok.pad_id
    assert tok.encode("") == []  # no BOS/EOS added, ever


def test_chat_template_thinking_switch():
    tok = bpe_tokenizer()
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    on = tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=True)
    off = tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False)
    assert on == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    no_gen = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert no_gen == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"


def test_identity_depends_on_files():
    src = bpe_dir()
    tok = load_tokenizer(src)
    assert tok.identity() == load_tokenizer(src).identity() and len(tok.identity()) == 64
    copy = os.path.join(tmp_dir(), "tok")
    shutil.copytree(src, copy)
    assert load_tokenizer(copy).identity() == tok.identity()  # content, not location
    cfg_path = os.path.join(copy, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = QWEN3_STYLE_TEMPLATE.replace("assistant", "bot")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    assert load_tokenizer(copy).identity() != tok.identity()


def test_vocab_merges_directory_matches_tokenizer_json():
    """Without tokenizer.json, a Qwen2Tokenizer vocab.json + merges.txt gives the same ids."""
    src = load_tokenizer(bpe_dir())
    out = tmp_dir()
    model = json.load(open(os.path.join(bpe_dir(), "tokenizer.json")))
    vocab = model["model"]["vocab"]
    with open(os.path.join(out, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(out, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
        for m in model["model"]["merges"]:
            f.write((" ".join(m) if isinstance(m, list) else m) + "\n")
    added = {str(t["id"]): {"content": t["content"], "special": True}
             for t in model["added_tokens"]}
    cfg = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>",
           "pad_token": "<|endoftext|>", "added_tokens_decoder": added,
           "chat_template": QWEN3_STYLE_TEMPLATE}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    tok = load_tokenizer(out)
    for row in gsm8k_rows(20):
        text = "<|im_start|>user\n" + row["question"] + "\n" + row["answer"] + "<|im_end|>\n"
        assert tok.encode(text) == src.encode(text)
    assert tok.eos_id == src.eos_id


def test_sentencepiece_deterministic_lossless_chat():
    texts = [r["question"] + "\n" + r["answer"] for r in gsm8k_rows(300)]
    d = tmp_dir()
    a = train_sentencepiece(texts, 400, os.path.join(d, "a.model"))
    b = train_sentencepiece(iter(texts), 400)
    assert a == b  # same corpus -> same model bytes
    tok = load_tokenizer(os.path.join(d, "a.model"))
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size >= 400
    assert tok.decode(tok.encode(TEXT)) == TEXT
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=False)
    ids = tok.encode(prompt)
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert tok.token_to_id("<|im_end|>") == tok.eos_id in ids
    assert tok.decode(ids) == prompt
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi\nassistant\n\n\n\n\n"
    assert tok.identity() == SentencePieceTokenizer(model_proto=a).identity()
    assert tok.token_to_id("no-such-piece") is None


def test_load_errors_name_the_path():
    d = tmp_dir()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(d)
    with pytest.raises(TokenizerError, match="nope"):
        load_tokenizer(os.path.join(d, "nope"))


def test_training_refuses_a_tokenizer_with_more_ids_than_the_model():
    """Ids past the model's vocabulary would index the embedding's untrained padding rows: the
    trainer's problem loading stops with one line naming both sizes, before reading the store."""
    from atesd_mc.config import ConfigError
    from atesd_mc.config_io import config_from_dict
    from atesd_mc.tasks import check_vocabulary, load_problems

    path = bpe_dir()  # 1024 ids
    cfg = config_from_dict({"model": {"vocab_size": 1000},
                            "data": {"data_path": os.path.join(tmp_dir(), "store"), "tokenizer": path}})
    with pytest.raises(ConfigError) as e:
        load_problems(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"tokenizer {path} has 1024 ids but the model's vocabulary is 1000 ("), msg
    tok = bpe_tokenizer()
    for vocab in (0, 1024, 1025, 151936):  # 0: the tokenizer's own size; larger: padding is unused
        check_vocabulary(config_from_dict({"model": {"vocab_size": vocab}}), tok)
    with pytest.raises(ConfigError, match="has 1024 ids but the model's vocabulary is 1023 "):
        check_vocabulary(config_from_dict({"model": {"vocab_size": 1023}}), tok)
