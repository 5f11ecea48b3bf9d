"""The zarr problem store: round trip, atomic publish, manifest validation."""
from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
from test_data_fixtures import bpe_tokenizer, gsm8k_rows, tmp_dir

from atesd_mc.data import store as store_mod
from atesd_mc.data.store import (SCHEMA_VERSION, ProblemStore, StoreError, StoreWriter,
                                 make_example, write_store)
from atesd_mc.data.tokenizer import train_sentencepiece, SentencePieceTokenizer

SYNTH = [{"problem": f"What is {a}+{b}?", "solution": f"{a}+{b}={a + b}.\nSo \\boxed{{{a + b}}}."}
         for a, b in [(1, 2), (30, 4), (5, 600)]]


def _same(a, b):
    assert a.problem == b.problem and a.solution == b.solution and a.answer == b.answer
    assert a.unit == b.unit and a.source_line == b.source_line
    assert a.student.tolist() == b.student.tolist()
    for f in ("prefix", "reference", "segment_ends", "answer", "transition"):
        assert getattr(a.teacher, f).tolist() == getattr(b.teacher, f).tolist(), f


def test_round_trip_gsm8k_slice_with_small_chunks(monkeypatch):
    """Examples straddle chunk boundaries (tiny chunks) and come back token for token."""
    monkeypatch.setattr(store_mod, "DATA_CHUNK", 1000)
    monkeypatch.setattr(store_mod, "OFFSET_CHUNK", 64)
    tok = bpe_tokenizer()
    rows = gsm8k_rows(200)
    built = [make_example(tok, r["question"], r["answer"], answer_format="gsm8k",
                          strip_calculator=True, source_line=i + 1) for i, r in enumerate(rows)]
    path = os.path.join(tmp_dir(), "s.zarr")
    write_store(path, built, tok, source={"path": "gsm8k"})
    st = ProblemStore(path, tok, cache_chunks=2)
    assert len(st) == 200
    for i in np.random.default_rng(0).permutation(200):  # random order exercises the cache
        _same(st[i], built[i])
        assert st[i].index == i
    assert st[-1].source_line == 200
    assert st.lengths("student").tolist() == [len(b.student) for b in built]
    assert st.teacher_max_lengths().tolist() == [b.teacher.max_length() for b in built]
    m = st.manifest
    assert m["schema_version"] == SCHEMA_VERSION and m["count"] == 200
    assert m["tokenizer"]["identity"] == tok.identity() and m["source"] == {"path": "gsm8k"}
    assert m["stats"]["max_teacher"] == max(b.teacher.max_length() for b in built)
    with pytest.raises(IndexError):
        st[200]


def test_dicts_from_synthetic_task_with_sentencepiece():
    model = train_sentencepiece([d["problem"] + "\n" + d["solution"] for d in SYNTH] * 50, 400)
    tok = SentencePieceTokenizer(model_proto=model)
    path = os.path.join(tmp_dir(), "synth.zarr")
    write_store(path, iter(SYNTH), tok, enable_thinking=False)
    st = ProblemStore(path, tok)
    assert [st[i].answer for i in range(3)] == ["3", "34", "605"]
    ex = st[1]
    assert tok.decode(ex.teacher.tokens(2)).count("30+4=34.\nSo \\boxed{34}.\n") == 1
    assert st.manifest["creation_args"]["enable_thinking"] is False


def test_refuses_existing_then_overwrites_atomically():
    tok = bpe_tokenizer()
    parent = tmp_dir()
    path = os.path.join(parent, "s.zarr")
    write_store(path, SYNTH, tok)
    with pytest.raises(StoreError, match="already exists"):
        write_store(path, SYNTH[:1], tok)
    assert len(ProblemStore(path)) == 3
    write_store(path, SYNTH[:2], tok, overwrite=True)
    assert len(ProblemStore(path)) == 2
    assert os.listdir(parent) == ["s.zarr"]  # no temporary or old directories left


def test_failure_while_writing_leaves_nothing():
    tok = bpe_tokenizer()
    parent = tmp_dir()
    path = os.path.join(parent, "s.zarr")
    bad = SYNTH + [{"problem": "p", "solution": "no answer at all"}]
    with pytest.raises(ValueError):
        write_store(path, bad, tok)
    assert os.listdir(parent) == []
    with pytest.raises(RuntimeError):
        with StoreWriter(path, tok) as w:
            w.append(make_example(tok, **SYNTH[0]))
            raise RuntimeError("interrupted")
    assert os.listdir(parent) == []


def test_reader_validates_schema_and_tokenizer():
    tok = bpe_tokenizer()
    path = os.path.join(tmp_dir(), "s.zarr")
    write_store(path, SYNTH, tok)
    other = SentencePieceTokenizer(model_proto=train_sentencepiece(["a b c"] * 20, 300))
    with pytest.raises(StoreError, match=r"s\.zarr: field 'tokenizer.identity'"):
        ProblemStore(path, other)
    g = zarr.open_group(path, mode="r+")
    manifest = dict(g.attrs)["manifest"]
    g.attrs.put({"manifest": {**manifest, "schema_version": 99}})
    with pytest.raises(StoreError, match=r"s\.zarr: field 'schema_version': store has 99"):
        ProblemStore(path)
    g.attrs.put({"manifest": {**manifest, "count": 4}})
    with pytest.raises(StoreError, match="field 'problem'"):
        ProblemStore(path)
    with pytest.raises(StoreError, match="no problem store"):
        ProblemStore(os.path.join(tmp_dir(), "missing"))
