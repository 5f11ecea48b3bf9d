"""Evaluation end to end on a tiny bf16 LoRA run trained here for one step on a GSM8K slice, with an
AIME slice made by `preprocess_data.py --preset aime` as its held-out set: the trainer evaluates
the answer-only store (--eval-size problems, with a progress line), and tools/evaluate.py reads
GSM8K's own format, builds the run's model (bf16, adapters loaded, lean decode), shows progress in
a log, and writes a new results file per evaluation."""
import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys

import pytest
from harness import run_distributed
from test_data_fixtures import DATA, GSM8K_TRAIN, MATH_EVAL, REPO, bpe_dir

GSM8K_TEST = os.path.join(DATA, "gsm8k", "test.jsonl")
AIME24 = os.path.join(MATH_EVAL, "aime24.jsonl")
pytestmark = pytest.mark.skipif(not all(map(os.path.exists, (GSM8K_TRAIN, GSM8K_TEST, AIME24))),
                                reason="shared data not present")

TINY = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
        "num_query_groups": 2, "kv_channels": 16, "seq_length": 512, "params_dtype": "bf16",
        "lora_rank": 4, "lora_alpha": 8.0}
# One progress line as a log sees it (not a terminal: whole lines, no carriage returns).
PROGRESS = re.compile(r"(?P<label>.+): (?P<done>\d+)/(?P<total>\d+) problems \(\d+%\) \| "
                      r"(-|\d+\.\d) tokens/s \| elapsed \d+:\d\d \| ETA (\d+:\d\d|\?)")


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


preprocess, evaluate = _tool("preprocess_data"), _tool("evaluate")


def _slice(src, dst, n):
    with open(src, "rb") as f:
        dst.write_bytes(b"".join(line for _, line in zip(range(n), f)))
    return str(dst)


def _progress(text, label):
    """(done, total) of each progress line with this label."""
    lines = [PROGRESS.fullmatch(x) for x in text.splitlines()]
    return [(int(m["done"]), int(m["total"])) for m in lines if m and m["label"] == label]


def _train(cfg):
    from atesd_mc.trainer import build_trainer

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        build_trainer(cfg).run()
    return err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run directory, the trainer's stderr, the GSM8K test slice)."""
    from atesd_mc.config_io import config_from_dict

    tmp = tmp_path_factory.mktemp("evalcli")
    tok = bpe_dir(1024)
    train, held = str(tmp / "train.zarr"), str(tmp / "aime.zarr")
    assert preprocess.main(["--input", _slice(GSM8K_TRAIN, tmp / "train.jsonl", 12), "--output", train,
                            "--tokenizer", tok, "--preset", "gsm8k", "--no-progress"]) == 0
    assert preprocess.main(["--input", _slice(AIME24, tmp / "aime.jsonl", 3), "--output", held,
                            "--tokenizer", tok, "--preset", "aime", "--no-progress"]) == 0
    cfg = config_from_dict({
        "model": TINY,
        "data": {"data_path": train, "tokenizer": tok, "eval_data_path": held, "eval_size": 2,
                 "probe_size": 2, "cache_dir": str(tmp / "cache")},
        "generation": {"max_new_tokens": 8},
        "train": {"train_iters": 1, "micro_batch_size": 4, "global_batch_size": 4, "seed": 3,
                  "warm_start_iters": 0, "eval_samples": 2, "eval_max_new_tokens": 4},
        "checkpoint": {"save": str(tmp / "run"), "exit_signal_handler": False},
        "logging": {"tensorboard": False, "progress_bar": True}}, name="evalcli")
    err = run_distributed(_train, world=1, args=(cfg,))[0]
    return str(tmp / "run"), err, _slice(GSM8K_TEST, tmp / "gsm8k_test.jsonl", 3)


def test_training_evaluates_the_answer_only_store_with_progress(run):
    run_dir, err, _ = run
    evals = json.load(open(os.path.join(run_dir, "eval.json")))
    assert evals["before"]["n"] == 2 and evals["after"]["n"] == 2  # --eval-size 2 of the 3 stored
    assert evals["before_sampled"]["k"] == 2
    assert _progress(err, "held-out eval at iteration 0 (greedy)")[-1] == (2, 2)
    assert _progress(err, "held-out eval at iteration 0 (avg@2)")[-1] == (2, 2)
    assert _progress(err, "held-out eval at iteration 1 (greedy)")[-1] == (2, 2)
    assert "\r" not in err  # a log gets whole lines


def _evaluate(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = evaluate.main(argv)
    return rc, out.getvalue(), err.getvalue()


def _results(run_dir):
    folder = os.path.join(run_dir, "eval")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_gsm8k_format_on_a_bf16_lora_run_two_runs_two_files(run):
    run_dir, _, gsm8k = run
    argv = ["--load", run_dir, "--data", gsm8k, "-k", "2", "--max-new-tokens", "4"]
    rc, out, err = run_distributed(_evaluate, world=1, args=(argv,))[0]
    assert rc == 0, err[-3000:]
    assert "engine: decode lean" in err and "params dtype torch.bfloat16" in err
    lines = _progress(err, "eval gsm8k_test")
    assert lines[0] == (0, 3) and lines[-1] == (3, 3) and "\r" not in err
    (first,) = _results(run_dir)
    assert re.fullmatch(r"results-\d{8}T\d{6}Z\.json", first)
    saved = json.load(open(os.path.join(run_dir, "eval", first)))
    bench = saved["benchmarks"]["gsm8k_test"]
    rows = [json.loads(x) for x in open(gsm8k)]
    assert [p["reference"] for p in bench["problems"]] == [r["answer"].rsplit("####", 1)[1].strip()
                                                           for r in rows]
    assert all(len(p["responses"]) == 2 for p in bench["problems"])
    assert bench["settings"]["format"] == "gsm8k" and saved["meta"]["lora_rank"] == 4
    assert saved["meta"]["params_dtype"] == "bf16" and saved["meta"]["engine"] == "lean"
    assert "| gsm8k_test | 3 |" in out
    before = open(os.path.join(run_dir, "eval", first), "rb").read()
    rc, out, err = run_distributed(_evaluate, world=1, args=(argv + ["--no-progress"],))[0]
    assert rc == 0, err[-3000:]
    assert len(_results(run_dir)) == 2 and first in _results(run_dir)  # a new file beside the old
    assert open(os.path.join(run_dir, "eval", first), "rb").read() == before
    assert _progress(err, "eval gsm8k_test") == []


def _built(run_dir):
    from atesd_mc.model.lora import lora_of
    from atesd_mc.model_io import saved_configs, tokenizer_for

    model_cfg, run_cfg = saved_configs(run_dir)
    tok = tokenizer_for(run_dir, run_cfg)
    args = evaluate.parse_args(["--load", run_dir, "--data", "unused.jsonl"])
    model, eng = evaluate.build_model(args, model_cfg, model_cfg.vocab_size or tok.vocab_size)
    adapters = lora_of(model).adapters.values()
    return (sorted({str(p.dtype) for p in model.parameters()}), len(adapters),
            max(float(a.B.abs().max()) for a in adapters), eng.decode)


def test_model_built_as_trained_bf16_with_loaded_adapters(run):
    dtypes, n_adapters, largest_b, decode = run_distributed(_built, world=1, args=(run[0],))[0]
    assert dtypes == ["torch.bfloat16"]  # norms included
    assert n_adapters == 2 * 7  # every layer's q, k, v, o, gate, up, down
    assert largest_b > 0  # B starts at zero: nonzero means the trained adapters were loaded
    assert decode == "lean"


def test_existing_output_refused_unless_overwrite(run, tmp_path, capsys):
    run_dir, _, gsm8k = run
    out = tmp_path / "mine.json"
    out.write_text("keep")
    assert evaluate.main(["--load", run_dir, "--data", gsm8k, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --output {out}: already exists")
    assert out.read_text() == "keep"


def test_missing_data_path_one_line_exit_2(tmp_path):
    missing = tmp_path / "nope.jsonl"
    res = subprocess.run([sys.executable, os.path.join(REPO, "tools", "evaluate.py"), "--load",
                          str(tmp_path), "--data", str(missing)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [f"error: --data {missing}: no such file"]


def test_unknown_fields_one_line_naming_file_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1?", "target": "2"}) + "\n")
    assert evaluate.main(["--load", str(tmp_path), "--data", str(bad)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {bad}:1: field 'problem' (or 'question'): missing")
    assert "'prompt', 'target'" in line
