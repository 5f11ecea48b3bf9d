"""Avg@k / Pass@k / Maj@k of a checkpoint on math benchmarks (docs/METHOD.md, Evaluation).

    python tools/evaluate.py --load CKPT --data ../shared/data/math_eval/aime24.jsonl -k 12 \\
        --temperature 1.0 --top-p 0.95 --max-new-tokens 38912
    python tools/evaluate.py --load CKPT --data ../shared/data/gsm8k/test.jsonl -k 1 --temperature 0

--load is a training run (LoRA adapters and bf16 included) or an import-hf checkpoint; the model
is built as the trainer builds it and decodes on the engine engine.resolve picks. Several --data
files may be given, each in its own format (--format, detected from the fields by default). Runs
on one process (or under torchrun for TP). Progress (problems done, tokens/s, ETA) goes to stderr.
Each evaluation writes a new results file, <load>/eval/results-<UTC time>.json (per problem: the k
responses, extracted answers, verdicts; never over an old file), or --output, and prints a table.
Exit status: 0 done, 2 refused (one line on stderr says why)."""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    from atesd_mc.eval_files import EVAL_FORMATS, FORMAT_ALIASES, FORMAT_HELP

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (training run or import-hf)")
    p.add_argument("--data", required=True, nargs="+", help="benchmark JSONL files")
    p.add_argument("--format", default="auto", choices=["auto", *EVAL_FORMATS, *FORMAT_ALIASES],
                   help=FORMAT_HELP)
    p.add_argument("--problem-key", help="field holding the problem (overrides the format's)")
    p.add_argument("--answer-key", help="field holding the reference answer (overrides the format's)")
    p.add_argument("-k", type=int, default=12, help="samples per problem")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    p.add_argument("--limit", type=int, default=0, help="first N problems of each file only (0 = all)")
    p.add_argument("--tokenizer", default="", help="tokenizer path (default: beside the checkpoint)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--inference-engine", default="auto", choices=("auto", "megatron"),
                   help="decode on model/lean.py where the model allows it (auto) or megatron's layers")
    p.add_argument("--enable-thinking", action="store_true", help="Qwen3 thinking mode in the chat template")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output", default="",
                   help="results path (default: a new <load>/eval/results-<UTC time>.json)")
    p.add_argument("--overwrite", action="store_true", help="replace --output when it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return p.parse_args(argv)


class Refused(Exception):
    """An input this tool will not run on; the message is the one line it prints."""


def check_paths(args) -> None:
    """Fail before any model is built: missing --load or --data, an existing --output."""
    for path in args.data:
        if not os.path.isfile(path):
            raise Refused(f"--data {path}: no such file")
    if not os.path.isdir(args.load):
        raise Refused(f"--load {args.load}: no such directory")
    if args.output and os.path.exists(args.output) and not args.overwrite:
        raise Refused(f"--output {args.output}: already exists (pass --overwrite to replace it, "
                      f"or leave --output out for a new file under {os.path.join(args.load, 'eval')})")
    for name in ("k", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise Refused(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")


def load_benchmarks(args) -> dict:
    """{name: (problems, format, path)} of every --data file; names are file stems, made unique."""
    from atesd_mc.eval_files import read_eval_file

    out = {}
    for path in args.data:
        try:
            problems, fmt = read_eval_file(path, args.format, problem_key=args.problem_key,
                                           answer_key=args.answer_key)
        except ValueError as e:
            raise Refused(str(e)) from None
        out[_unique_name(path, out)] = (problems[: args.limit] if args.limit else problems, fmt, path)
    return out


def _unique_name(path: str, taken) -> str:
    """The file's stem (aime24); parent/stem when taken (gsm8k/test); then a #2, #3 suffix."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name = stem if stem not in taken else f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}/{stem}"
    base, n = name, 1
    while name in taken:
        n += 1
        name = f"{base}#{n}"
    return name


def build_model(args, model_cfg, vocab: int):
    """The model as the trainer builds it: its stage (in the run's params dtype), the LoRA adapters
    when the run had them, the checkpoint's weights (adapters included); and the decode engine
    engine.resolve picks for it."""
    from atesd_mc import engine
    from atesd_mc.config import ParallelConfig
    from atesd_mc.model_io import load_model

    model = load_model(args.load, model_cfg, ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size), vocab)
    return model, engine.resolve(args.inference_engine, "auto", model)


def make_generate_fn(model, tok, args, lean: bool, progress):
    """generate_fn for evaluation.evaluate_problems; progress(rows, tokens) after each bucket. Made
    per benchmark with its own generator seeded by --seed, so a benchmark's samples do not depend
    on the files listed before it."""
    import torch

    from atesd_mc.generation import SamplingParams, generate_bucketed

    gen = torch.Generator().manual_seed(args.seed)

    def generate_fn(prompts, k, temperature, top_p, max_new_tokens):
        ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], True,
                                                  args.enable_thinking)) for p in prompts]
        flat = [x for x in ids for _ in range(k)]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=args.top_k, eos_id=tok.eos_id)
        out = generate_bucketed(model, flat, params, gen, lean=lean, max_batch=args.batch_size,
                                progress=progress)
        texts = [tok.decode(t, skip_special_tokens=True) for t in out.tokens]
        return [texts[j * k:(j + 1) * k] for j in range(len(prompts))]

    return generate_fn


def prepare(args):
    """Everything that can refuse before the model is built: paths, benchmarks, configs, tokenizer."""
    check_paths(args)
    benchmarks = load_benchmarks(args)
    from atesd_mc.checkpoint import CheckpointError
    from atesd_mc.model_io import saved_configs, tokenizer_for

    try:
        model_cfg, run = saved_configs(args.load)
        tok = tokenizer_for(args.load, run, args.tokenizer)
    except (CheckpointError, ValueError) as e:
        raise Refused(str(e)) from None
    check_tp(args.tensor_model_parallel_size, model_cfg)
    if model_cfg.vocab_size and tok.vocab_size > model_cfg.vocab_size:
        raise Refused(f"the tokenizer has {tok.vocab_size} ids but the model's vocabulary has "
                      f"{model_cfg.vocab_size}: ids >= {model_cfg.vocab_size} have no embedding row")
    return benchmarks, model_cfg, tok


def check_tp(tp: int, model_cfg) -> None:
    """The TP size fits the launch and the model (instead of megatron's assert later)."""
    from atesd_mc.convert_layout import check_layout
    from atesd_mc.hf_files import ConversionError

    from atesd_mc import distributed
    from atesd_mc.config import ConfigError

    try:
        world = distributed.launch_env(os.environ).world_size  # torchrun, srun or mpirun
    except ConfigError as e:
        raise Refused(str(e)) from None
    if tp < 1 or world % tp:
        raise Refused(f"--tensor-model-parallel-size {tp}: the world size {world} is not a multiple "
                      f"of it (launch with torchrun --nproc_per_node {max(tp, 1)})")
    try:
        check_layout(model_cfg, tp, 1)
    except ConversionError as e:
        raise Refused(f"--tensor-model-parallel-size {tp}: {e}") from None


def run(args, benchmarks, model_cfg, tok, rank0: bool):
    """Every benchmark on the built model: ({name: evaluate_problems(...)}, the engine)."""
    from atesd_mc.evaluation import evaluate_problems
    from atesd_mc.run_log import Progress

    model, eng = build_model(args, model_cfg, model_cfg.vocab_size or tok.vocab_size)
    if rank0:
        print(f"{eng.describe()}, params dtype {model.config.params_dtype}", file=sys.stderr, flush=True)
    results = {}
    for name, (problems, fmt, _) in benchmarks.items():
        with Progress(len(problems), f"eval {name}", rows_per_problem=args.k,
                      enabled=rank0 and not args.no_progress) as bar:
            generate_fn = make_generate_fn(model, tok, args, eng.lean_decode, bar.update)
            results[name] = evaluate_problems(problems, generate_fn, args.k, temperature=args.temperature,
                                              top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                              prompt_fn=_student_text)
        results[name]["settings"]["format"] = fmt.name
    return results, eng


def write(args, results: dict, benchmarks: dict, eng, model_cfg) -> str:
    import datetime

    from atesd_mc.evaluation import write_new_results, write_results

    meta = {"load": args.load, "k": args.k, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
            "enable_thinking": args.enable_thinking, "engine": eng.decode,
            "params_dtype": model_cfg.params_dtype, "lora_rank": model_cfg.lora_rank,
            "data": {n: {"path": path, "format": fmt.name, "problem_key": fmt.problem_key,
                         "answer_key": fmt.answer_key} for n, (_, fmt, path) in benchmarks.items()},
            "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if args.output:
        return write_results(args.output, results, meta, overwrite=args.overwrite)
    return write_new_results(os.path.join(args.load, "eval"), results, meta)


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        benchmarks, model_cfg, tok = prepare(args)
    except Refused as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    from atesd_mc import distributed
    from atesd_mc.checkpoint import CheckpointError
    from atesd_mc.evaluation import format_table

    from atesd_mc.config import ConfigError

    try:
        distributed.initialize(tp=args.tensor_model_parallel_size, seed=args.seed)
    except ConfigError as e:  # a launch the process group cannot start from (one line, every rank)
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        results, eng = run(args, benchmarks, model_cfg, tok, rank0)
        if rank0:
            out = write(args, results, benchmarks, eng, model_cfg)
            print(format_table(results))
            print(f"wrote {out}")
    except (CheckpointError, FileExistsError) as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0


def _student_text(problem: str) -> str:
    from atesd_mc.data.templates import student_user_text

    return student_user_text(problem)


if __name__ == "__main__":
    sys.exit(main())
