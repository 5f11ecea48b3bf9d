"""tools/preprocess_data.py: JSONL -> store, and bad rows that never pass silently."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
from test_data_fixtures import (GSM8K_TRAIN, MATH_EVAL, REPO, bpe_dir, bpe_tokenizer, gsm8k_rows,
                                need, tmp_dir)

from atesd_mc.data.segment import Segmentation, segment_solution
from atesd_mc.data.store import ProblemStore
from atesd_mc.data.templates import render_student_prompt, render_teacher_prompt

_spec = importlib.util.spec_from_file_location(
    "preprocess_data", os.path.join(REPO, "tools", "preprocess_data.py"))
preprocess = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(preprocess)


def _run(input_path, out, *extra):
    return preprocess.main(["--input", input_path, "--output", out, "--tokenizer", bpe_dir(),
                            "--no-progress", *extra])


def _write_lines(lines: list[bytes]) -> str:
    path = os.path.join(tmp_dir(), "rows.jsonl")
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return path


GOOD = json.dumps({"question": "What is 2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"}).encode()


def test_gsm8k_slice_round_trip_with_workers():
    """First 500 GSM8K rows: every row read back reproduces its tokens (full run: see report)."""
    rows = gsm8k_rows(500)
    src = os.path.join(tmp_dir(), "gsm8k_500.jsonl")
    with open(need(GSM8K_TRAIN), "rb") as f, open(src, "wb") as out:
        out.writelines(line for _, line in zip(range(500), f))
    store_path = os.path.join(tmp_dir(), "gsm8k.zarr")
    assert _run(src, store_path, "--preset", "gsm8k", "--workers", "2") == 0
    tok = bpe_tokenizer()
    st = ProblemStore(store_path, tok)
    assert len(st) == 500
    for i, row in enumerate(rows):
        ex = st[i]
        seg = segment_solution(row["answer"], answer_format="gsm8k", strip_calculator=True)
        assert ex.problem == row["question"] and ex.solution == row["answer"]
        assert ex.answer == row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert ex.source_line == i + 1
        assert ex.student.tolist() == tok.encode(render_student_prompt(tok, row["question"]))
        k = len(seg.segments)
        assert ex.teacher.tokens(k).tolist() == tok.encode(
            render_teacher_prompt(tok, row["question"], seg, k))
    m = st.manifest
    assert m["source"]["rows"] == 500 and m["source"]["bad_rows"] == 0
    assert m["creation_args"]["preset"] == "gsm8k" and len(m["source"]["sha256"]) == 64


@pytest.mark.parametrize("bad, line, expect", [
    (b'{"question": "What is 1+1?", "answer": "#### 2"', 2, "invalid JSON"),
    (b'{"answer": "1+1=2\\n#### 2"}', 2, "field 'question': missing field"),
    (b'{"question": "caf\xe9?", "answer": "x\\n#### 2"}', 2, "not valid UTF-8 (byte 0xe9"),
    (b'{"question": "q", "answer": "  "}', 2, "field 'answer': empty"),
    (b'{"question": "q", "answer": "it is 2"}', 2, "field 'answer': no '#### N'"),
    (b'["question", "answer"]', 2, "not a JSON object"),
])
def test_bad_row_is_fatal_names_file_line_and_writes_nothing(bad, line, expect, capsys):
    src = _write_lines([GOOD, bad, GOOD])
    parent = tmp_dir()
    out = os.path.join(parent, "s.zarr")
    assert _run(src, out, "--preset", "gsm8k") == 1
    err = capsys.readouterr().err
    assert f"{src}:{line}: " in err and expect in err and "no store written" in err
    assert os.listdir(parent) == []  # no store, no temporary directory


def test_skip_bad_counts_and_lists_them(capsys):
    src = _write_lines([GOOD, b"{broken", b"", GOOD, b'{"question": "q"}'])
    out = os.path.join(tmp_dir(), "s.zarr")
    assert _run(src, out, "--preset", "gsm8k", "--skip-bad") == 0
    st = ProblemStore(out)
    assert len(st) == 2 and [st[i].source_line for i in range(2)] == [1, 4]
    src_meta = st.manifest["source"]
    assert src_meta["bad_rows"] == 2 and src_meta["blank_lines"] == 1
    assert src_meta["bad_rows_listed"][0].startswith(f"{src}:2: invalid JSON")
    assert src_meta["bad_rows_listed"][1] == f"{src}:5: field 'answer': missing field"
    assert "bad rows skipped" in capsys.readouterr().out


def test_max_length_and_custom_keys_and_existing_output(capsys):
    row = json.dumps({"p": "Add 2 and 3.", "s": "We add.\n\nThe sum is \\boxed{5}."}).encode()
    src = _write_lines([row])
    out = os.path.join(tmp_dir(), "s.zarr")
    assert _run(src, out, "--problem-key", "p", "--solution-key", "s", "--max-length", "20") == 1
    assert f"{src}:1: field 's': too long" in capsys.readouterr().err
    assert _run(src, out, "--problem-key", "p", "--solution-key", "s") == 0
    assert ProblemStore(out)[0].answer == "5"
    assert _run(src, out, "--problem-key", "p", "--solution-key", "s") == 1
    assert "already exists" in capsys.readouterr().err
    assert _run(src, out, "--problem-key", "p", "--solution-key", "s", "--overwrite") == 0


AIME24 = os.path.join(MATH_EVAL, "aime24.jsonl")
HMMT25 = os.path.join(MATH_EVAL, "hmmt25.jsonl")


def _slice(path: str, n: int) -> str:
    out = os.path.join(tmp_dir(), os.path.basename(path))
    with open(need(path), "rb") as f, open(out, "wb") as dst:
        dst.writelines(line for _, line in zip(range(n), f))
    return out


@pytest.mark.parametrize("preset, source", [("aime", AIME24), ("answer-only", AIME24),
                                            ("hmmt", HMMT25)])
def test_answer_only_preset_on_real_slices(preset, source):
    """No reference solution: problem and answer as in the file, student prompt as the trainer's,
    a teacher prompt with no segments, and a manifest that says so."""
    src = _slice(source, 12)
    out = os.path.join(tmp_dir(), "s.zarr")
    assert _run(src, out, "--preset", preset) == 0
    tok = bpe_tokenizer()
    st = ProblemStore(out, tok)
    rows = [json.loads(line) for line in open(src, encoding="utf-8")]
    assert len(st) == 12
    for i, row in enumerate(rows):
        ex = st[i]
        assert (ex.problem, ex.answer, ex.solution) == (row["problem"], row["answer"], "")
        assert ex.student.tolist() == tok.encode(render_student_prompt(tok, row["problem"]))
        assert ex.teacher.num_segments == 0 and len(ex.teacher.reference) == 0
        assert ex.teacher.tokens(0).tolist() == tok.encode(
            render_teacher_prompt(tok, row["problem"], Segmentation((), "paragraph", row["answer"]), 0))
    assert st.manifest["reference_solutions"] is False
    assert st.manifest["creation_args"]["row_spec"]["solution_key"] is None


def test_answer_only_file_without_preset_points_to_it(capsys):
    assert _run(_slice(AIME24, 2), os.path.join(tmp_dir(), "s.zarr")) == 1
    err = capsys.readouterr().err
    assert "aime24.jsonl:1: field 'solution': missing field" in err
    assert "--preset answer-only" in err


def test_help_documents_every_preset(capsys):
    with pytest.raises(SystemExit):
        preprocess.parse_args(["--help"])
    text = capsys.readouterr().out
    for name in preprocess.PRESETS:
        assert f"  {name} " in text, name
    assert "no reference solution" in text


def _tokenizer_copy(**files) -> str:
    """bpe_dir() (1,024 ids) in a fresh directory, with the given JSON files beside it."""
    import shutil

    d = os.path.join(tmp_dir(), "tok")
    shutil.copytree(bpe_dir(), d)
    for name, body in files.items():
        with open(os.path.join(d, name.replace("_json", ".json")), "w") as f:
            json.dump(body, f)
    return d


@pytest.mark.parametrize("how", ["flag", "hf_config_beside", "model_dir", "checkpoint"])
def test_tokenizer_larger_than_model_vocab_refused(how, capsys):
    tok, extra = bpe_dir(), []
    if how == "flag":
        extra, source = ["--model-vocab-size", "1000"], "--model-vocab-size"
    elif how == "hf_config_beside":
        tok = _tokenizer_copy(config_json={"vocab_size": 1000})
        source = os.path.join(tok, "config.json")
    else:
        model = tmp_dir()
        folder = model
        if how == "checkpoint":  # a checkpoint's own description wins over the root's
            with open(os.path.join(model, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write("7")
            folder = os.path.join(model, "iter_0000007")
            os.makedirs(folder)
            with open(os.path.join(model, "model_config.json"), "w") as f:
                json.dump({"vocab_size": 4096}, f)
        with open(os.path.join(folder, "model_config.json"), "w") as f:
            json.dump({"vocab_size": 1000, "num_layers": 2}, f)
        extra, source = ["--model", model], os.path.join(folder, "model_config.json")
    parent = tmp_dir()
    code = preprocess.main(["--input", _write_lines([GOOD]), "--output", os.path.join(parent, "s.zarr"),
                            "--tokenizer", tok, "--no-progress", *extra])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: the tokenizer {tok} has 1024 ids but the model's vocabulary has 1000 "
                    f"({source}): ids 1000..1023 would have no embedding row; no store written")
    assert os.listdir(parent) == []


def test_tokenizer_that_fits_is_accepted_and_recorded():
    tok = _tokenizer_copy(config_json={"vocab_size": 1024})
    out = os.path.join(tmp_dir(), "s.zarr")
    assert preprocess.main(["--input", _write_lines([GOOD]), "--output", out, "--tokenizer", tok,
                            "--no-progress", "--preset", "gsm8k"]) == 0
    assert ProblemStore(out).manifest["creation_args"]["model_vocab"] == {
        "size": 1024, "from": os.path.join(tok, "config.json")}
