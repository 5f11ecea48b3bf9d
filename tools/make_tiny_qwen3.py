"""A tiny random Hugging Face Qwen3 and its tokenizer, to try the real-model workflow anywhere.

    python tools/make_tiny_qwen3.py --out hf/tiny-qwen3 --corpus ../shared/data/gsm8k/train.jsonl

Writes a transformers Qwen3ForCausalLM (random weights, Qwen3's architecture at toy sizes:
RMSNorm, QK-norm, GQA, SwiGLU, RoPE, tied embeddings) with save_pretrained, and a Qwen-style
byte-level BPE tokenizer (Qwen2/3 pre-tokeniser split, ChatML template with the empty think
block) trained here on the corpus' text, so the folder looks to every tool like a downloaded
Qwen3 checkpoint. Nothing is downloaded. The model's vocabulary is the tokenizer's size rounded up
to a multiple of 64 (as Qwen pads its embedding). Deterministic for a given corpus and --seed;
an --out that already holds a model is kept as it is."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def corpus_texts(path: str, limit: int) -> list[str]:
    """Every string field of the first `limit` JSONL rows (problems, solutions, answers)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(texts) >= limit:
                break
            row = json.loads(line)
            texts.append("\n".join(v for v in row.values() if isinstance(v, str)))
    return texts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, tokenizer)")
    ap.add_argument("--corpus", required=True, help="JSONL whose text trains the tokenizer (e.g. GSM8K train)")
    ap.add_argument("--rows", type=int, default=2000, help="corpus rows used")
    ap.add_argument("--tokenizer-vocab", type=int, default=2048)
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not os.path.isfile(args.corpus):
        print(f"error: --corpus {args.corpus}: no such file", file=sys.stderr)
        return 2
    if os.path.exists(os.path.join(args.out, "config.json")):  # a rerun of the README keeps it
        print(f"{args.out} already holds a model (config.json): kept as it is")
        return 0

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from atesd_mc.data.tokenizer import train_byte_level_bpe

    tmp = args.out.rstrip("/") + f".tmp{os.getpid()}"
    tok = train_byte_level_bpe(corpus_texts(args.corpus, args.rows), tmp, args.tokenizer_vocab)
    vocab = (tok.vocab_size + 63) // 64 * 64
    torch.manual_seed(args.seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=args.hidden_size, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                      max_position_embeddings=4096, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    os.replace(tmp, args.out)  # the folder appears whole or not at all
    print(f"wrote {args.out}: Qwen3 {args.layers} layers, hidden {args.hidden_size}, vocab {vocab} "
          f"(tokenizer {tok.vocab_size} ids)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
