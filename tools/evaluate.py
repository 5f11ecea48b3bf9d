"""Avg@k / Pass@k / Maj@k of a checkpoint on math benchmarks (docs/METHOD.md, Evaluation).

    python tools/evaluate.py --load CKPT --data ../shared/data/math_eval/aime24.jsonl -k 12 \
        --temperature 1.0 --top-p 0.95 --max-new-tokens 38912 [--output results.json]

Several --data files may be given. Runs on one process (or under torchrun for TP); writes
results.json (per problem: the k responses, extracted answers, verdicts) and prints a table."""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (training run or import-hf)")
    p.add_argument("--data", required=True, nargs="+", help="JSONL files with problem/answer")
    p.add_argument("-k", type=int, default=12, help="samples per problem")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    p.add_argument("--limit", type=int, default=0, help="first N problems only (0 = all)")
    p.add_argument("--tokenizer", default="", help="tokenizer path (default: beside the checkpoint)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--enable-thinking", action="store_true", help="Qwen3 thinking mode in the chat template")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output", default="", help="results.json path (default: <load>/eval/results.json)")
    return p.parse_args(argv)


def make_generate_fn(model, tok, args):
    import torch

    from atesd_mc.generation import SamplingParams, generate_bucketed

    gen = torch.Generator().manual_seed(args.seed)

    def generate_fn(prompts, k, temperature, top_p, max_new_tokens):
        ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], True,
                                                  args.enable_thinking)) for p in prompts]
        flat = [x for x in ids for _ in range(k)]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=args.top_k, eos_id=tok.eos_id)
        out = generate_bucketed(model, flat, params, gen, max_batch=args.batch_size)
        texts = [tok.decode(t, skip_special_tokens=True) for t in out.tokens]
        return [texts[j * k:(j + 1) * k] for j in range(len(prompts))]

    return generate_fn


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    from atesd_mc import distributed
    from atesd_mc.checkpoint import CheckpointError
    from atesd_mc.config import ParallelConfig
    from atesd_mc.evaluation import evaluate_problems, format_table, load_eval_jsonl, write_results
    from atesd_mc.model_io import load_model, saved_configs, tokenizer_for

    try:
        model_cfg, run = saved_configs(args.load)
        tok = tokenizer_for(args.load, run, args.tokenizer)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = distributed.initialize(tp=args.tensor_model_parallel_size, seed=args.seed)
    vocab = model_cfg.vocab_size or tok.vocab_size
    model = load_model(args.load, model_cfg, ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size), vocab)
    generate_fn = make_generate_fn(model, tok, args)
    results = {}
    for path in args.data:
        problems = load_eval_jsonl(path)
        if args.limit:
            problems = problems[: args.limit]
        name = os.path.splitext(os.path.basename(path))[0]
        results[name] = evaluate_problems(problems, generate_fn, args.k, temperature=args.temperature,
                                          top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                          prompt_fn=lambda x: x and _student_text(x))
    if info.rank == 0:
        out = args.output or os.path.join(args.load, "eval", "results.json")
        write_results(out, results, meta={"load": args.load, "k": args.k, "temperature": args.temperature,
                                          "top_p": args.top_p, "max_new_tokens": args.max_new_tokens})
        print(format_table(results))
        print(f"wrote {out}")
    distributed.shutdown()
    return 0


def _student_text(problem: str) -> str:
    from atesd_mc.data.templates import student_user_text

    return student_user_text(problem)


if __name__ == "__main__":
    sys.exit(main())
