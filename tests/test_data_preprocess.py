"""tools/preprocess_data.py: JSONL -> store, and bad rows that never pass silently."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
from test_data_fixtures import GSM8K_TRAIN, REPO, bpe_dir, bpe_tokenizer, gsm8k_rows, need, tmp_dir

from atesd_mc.data.segment import segment_solution
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
