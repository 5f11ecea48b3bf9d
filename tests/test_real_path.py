"""The real-model path end to end on CPU: a tiny random Qwen3 made by transformers, imported,
fine-tuned with LoRA (teacher = adapters off) for a few steps on a GSM8K slice store."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from test_data_fixtures import GSM8K_TRAIN, bpe_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, **kw):
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, **kw)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


@pytest.mark.skipif(not os.path.exists(GSM8K_TRAIN), reason="shared data not present")
def test_import_then_lora_finetune_on_gsm8k_slice(tmp_path):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from atesd_mc.data.tokenizer import load_tokenizer

    tok_dir = bpe_dir(1024)
    vocab = load_tokenizer(tok_dir).vocab_size
    hf = tmp_path / "hf"
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 max_position_embeddings=1024, tie_word_embeddings=True)).save_pretrained(hf)
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), hf / name)
    _run([os.path.join(ROOT, "tools", "convert_checkpoint.py"), "import-hf", "--hf-dir", str(hf),
          "--save", str(tmp_path / "imported"), "--params-dtype", "fp32"])
    rows = open(GSM8K_TRAIN, encoding="utf-8").readlines()[:80]
    (tmp_path / "slice.jsonl").write_text("".join(rows))
    _run([os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", str(tmp_path / "slice.jsonl"),
          "--output", str(tmp_path / "store"), "--tokenizer", str(hf), "--preset", "gsm8k", "--no-progress"])
    run = tmp_path / "run"
    out = _run([os.path.join(ROOT, "tools", "pretrain_atesd.py"), "--config",
                os.path.join(ROOT, "examples", "tiny_arith.yaml"), "--data-path", str(tmp_path / "store"),
                "--tokenizer", str(hf), "--load", str(tmp_path / "imported"), "--finetune", "--lora-rank", "4",
                "--lora-alpha", "8", "--train-iters", "2", "--warm-start-iters", "0", "--probe-size", "4",
                "--global-batch-size", "4", "--micro-batch-size", "4", "--max-new-tokens", "16",
                "--seq-length", "1024", "--save", str(run), "--no-tensorboard"])
    assert "(--finetune)" in out.stdout and "teacher" not in out.stderr.lower()
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["loss"] == r["loss"] and r["loss"] >= 0 for r in recs)  # finite, non-negative KL
    assert not any(r["skipped"] for r in recs) and all(r["grad_norm"] > 0 for r in recs)
