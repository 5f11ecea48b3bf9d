"""The problem store: one zarr (v3) directory of tokenised problems, written atomically.

Layout (every ragged field is ``<field>/data`` flat + ``<field>/offsets`` int64 of length n+1):

* text, utf-8 bytes: ``problem``, ``solution`` (as in the source), ``answer`` (final answer A,
  what evaluation verifies against);
* int32 tokens: ``student`` (chat-rendered student prompt), and the teacher pieces
  ``teacher_prefix``, ``reference``, ``segment_ends``, ``answer_tokens``, ``transition``
  (see templates.TeacherPieces);
* per example: ``unit`` (uint8 index into segment.UNITS), ``source_line`` (int64, 1-based, 0 =
  not from a file).

The root group's attributes hold the manifest: schema name and version, tokenizer description
with its identity hash, source file and sha256, counts, creation arguments and length stats.

A store is written into a temporary directory beside the target and renamed into place when
complete, so a reader never sees a half-written store and a failed run leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass

import numpy as np

from atesd_mc import __version__
from atesd_mc.data.segment import UNITS, Segmentation, segment_solution
from atesd_mc.data.templates import TOKEN_DTYPE, TeacherPieces, student_tokens, teacher_pieces
from atesd_mc.data.tokenizer import Tokenizer

SCHEMA = "atesd-problem-store"
SCHEMA_VERSION = 1
TEXT_FIELDS = ("problem", "solution", "answer")
TOKEN_FIELDS = ("student", "teacher_prefix", "reference", "segment_ends", "answer_tokens",
                "transition")
DATA_CHUNK = 1 << 18  # elements per data chunk: 1 MiB of int32, a few ms to decompress
OFFSET_CHUNK = 1 << 16


class StoreError(RuntimeError):
    """A store cannot be written or read; the message names the store path and the field."""


@dataclass(frozen=True, eq=False)  # numpy fields: == would be ambiguous
class Example:
    """One problem, ready for the trainer: texts, student prompt, teacher pieces."""

    problem: str
    """Problem text x, as in the source."""
    solution: str
    """Reference solution y*, as in the source (before segmentation)."""
    answer: str
    """Final answer A (inside of \\boxed{}), the string evaluation verifies against."""
    student: np.ndarray
    """Student prompt tokens (chat template applied, ends with the assistant header)."""
    teacher: TeacherPieces
    """Teacher prompt pieces; teacher.tokens(k) is the prompt with k segments revealed."""
    unit: str = "paragraph"
    """Segment unit the reference was split by (segment.UNITS)."""
    source_line: int = 0
    """1-based line of the source file (0 when the example did not come from a file)."""
    index: int = -1
    """Position in the store (-1 before it is written)."""


def make_example(tok: Tokenizer, problem: str, solution: str, *, answer: str | None = None,
                 answer_format: str = "auto", strip_calculator: bool = False,
                 enable_thinking: bool = True, source_line: int = 0,
                 seg: Segmentation | None = None) -> Example:
    """Segment and tokenise one (problem, solution[, answer]); raises SegmentationError."""
    if seg is None:
        seg = segment_solution(solution, answer=answer, answer_format=answer_format,
                               strip_calculator=strip_calculator)
    return Example(problem=problem, solution=solution, answer=seg.answer,
                   student=student_tokens(tok, problem, enable_thinking),
                   teacher=teacher_pieces(tok, problem, seg, enable_thinking),
                   unit=seg.unit, source_line=source_line)


def _ragged_values(ex: Example) -> dict[str, np.ndarray]:
    t = ex.teacher
    text = {k: np.frombuffer(getattr(ex, k).encode("utf-8"), dtype=np.uint8) for k in TEXT_FIELDS}
    return {**text, "student": ex.student, "teacher_prefix": t.prefix, "reference": t.reference,
            "segment_ends": t.segment_ends, "answer_tokens": t.answer,
            "transition": t.transition}


def _codecs(dtype):
    import zarr

    if np.dtype(dtype).itemsize > 1:  # byte-shuffle makes small ints compress well
        return zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
    return zarr.codecs.ZstdCodec(level=5)


class _Appender:
    """A 1-D zarr array grown in whole chunks (a partial-chunk append rewrites that chunk)."""

    def __init__(self, group, name: str, dtype, chunk: int):
        self.arr = group.create_array(name, shape=(0,), chunks=(chunk,), dtype=dtype,
                                      compressors=_codecs(dtype), fill_value=0)
        self.dtype, self.chunk = np.dtype(dtype), chunk
        self.parts: list[np.ndarray] = []
        self.pending = 0
        self.total = 0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=self.dtype).ravel()
        self.parts.append(values)
        self.pending += values.size
        self.total += values.size
        if self.pending >= 4 * self.chunk:
            self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        if not self.parts:
            return
        buf = np.concatenate(self.parts)
        keep = 0 if final else buf.size % self.chunk
        if buf.size - keep:
            self.arr.append(buf[:buf.size - keep])
        self.parts = [buf[buf.size - keep:]] if keep else []
        self.pending = keep


class StoreWriter:
    """Append Examples, then close() to publish the store at `path` (atomic rename).

    Use as a context manager: an exception inside the block removes the temporary directory
    and leaves any existing store at `path` untouched."""

    def __init__(self, path: str, tokenizer: Tokenizer, *, overwrite: bool = False,
                 source: dict | None = None, creation_args: dict | None = None):
        import zarr

        self.path = os.path.abspath(path)
        if os.path.exists(self.path) and not overwrite:
            raise StoreError(f"{path}: already exists (pass overwrite=True / --overwrite)")
        parent, base = os.path.split(self.path)
        os.makedirs(parent, exist_ok=True)
        self.tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.overwrite, self.tokenizer = overwrite, tokenizer
        self.meta = {"source": source or {}, "creation_args": creation_args or {}}
        self.group = zarr.open_group(self.tmp, mode="w-", zarr_format=3)
        self.data, self.offsets = {}, {}
        for name in TEXT_FIELDS + TOKEN_FIELDS:
            dtype = np.uint8 if name in TEXT_FIELDS else TOKEN_DTYPE
            self.data[name] = _Appender(self.group, f"{name}/data", dtype, DATA_CHUNK)
            self.offsets[name] = _Appender(self.group, f"{name}/offsets", np.int64, OFFSET_CHUNK)
            self.offsets[name].add(np.zeros(1, np.int64))
        self.unit = _Appender(self.group, "unit", np.uint8, OFFSET_CHUNK)
        self.source_line = _Appender(self.group, "source_line", np.int64, OFFSET_CHUNK)
        self.count = 0
        self.stats = {"max_student": 0, "max_teacher": 0, "max_segments": 0, "reference_tokens": 0}
        self.closed = False

    def append(self, ex: Example) -> None:
        for name, values in _ragged_values(ex).items():
            self.data[name].add(values)
            self.offsets[name].add(np.array([self.data[name].total], np.int64))
        self.unit.add(np.array([UNITS.index(ex.unit)]))
        self.source_line.add(np.array([ex.source_line]))
        self.count += 1
        s = self.stats
        s["max_student"] = max(s["max_student"], len(ex.student))
        s["max_teacher"] = max(s["max_teacher"], ex.teacher.max_length())
        s["max_segments"] = max(s["max_segments"], ex.teacher.num_segments)
        s["reference_tokens"] += len(ex.teacher.reference)

    def manifest(self) -> dict:
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "count": self.count,
                "tokenizer": self.tokenizer.describe(), "token_dtype": np.dtype(TOKEN_DTYPE).name,
                "fields": list(TEXT_FIELDS + TOKEN_FIELDS), "units": list(UNITS),
                "stats": self.stats, "created_by": f"atesd_mc {__version__}", **self.meta}

    def close(self) -> str:
        """Flush, write the manifest, rename into place; returns the store path."""
        for app in [*self.data.values(), *self.offsets.values(), self.unit, self.source_line]:
            app.flush()
        self.group.attrs.put({"manifest": self.manifest()})
        _publish(self.tmp, self.path, self.overwrite)
        self.closed = True
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.closed = True

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self.closed:
            self.close()


def _publish(tmp: str, path: str, overwrite: bool) -> None:
    """Rename tmp to path; an existing store is moved aside first and deleted after."""
    old = None
    if os.path.exists(path):
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"{path}: appeared while writing (pass overwrite=True)")
        old = f"{tmp}.old"
        os.rename(path, old)
    os.rename(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_store(path: str, examples, tokenizer: Tokenizer, *, overwrite: bool = False,
                source: dict | None = None, creation_args: dict | None = None,
                answer_format: str = "auto", strip_calculator: bool = False,
                enable_thinking: bool = True) -> str:
    """Write Examples, or dicts {problem, solution[, answer]} (e.g. from the synthetic task).

    Dicts are segmented and tokenised here; any error aborts and writes nothing."""
    args = {"answer_format": answer_format, "strip_calculator": strip_calculator,
            "enable_thinking": enable_thinking, **(creation_args or {})}
    with StoreWriter(path, tokenizer, overwrite=overwrite, source=source,
                     creation_args=args) as w:
        for item in examples:
            if not isinstance(item, Example):
                item = make_example(tokenizer, item["problem"], item["solution"],
                                    answer=item.get("answer"), answer_format=answer_format,
                                    strip_calculator=strip_calculator,
                                    enable_thinking=enable_thinking)
            w.append(item)
        return w.close()


class _ChunkedReader:
    """Slices of a 1-D zarr array through a small LRU cache of decoded chunks.

    Training reads examples in random order; zarr would decompress a whole chunk for every slice,
    so keeping the last few chunks decoded makes neighbouring reads nearly free."""

    def __init__(self, arr, cache_chunks: int):
        self.arr, self.chunk = arr, arr.chunks[0]
        self.cache: dict[int, np.ndarray] = {}
        self.cache_chunks = max(1, cache_chunks)

    def _chunk(self, c: int) -> np.ndarray:
        if c in self.cache:
            self.cache[c] = self.cache.pop(c)  # move to most-recent
            return self.cache[c]
        values = self.arr[c * self.chunk:(c + 1) * self.chunk]
        if len(self.cache) >= self.cache_chunks:
            self.cache.pop(next(iter(self.cache)))
        self.cache[c] = values
        return values

    def read(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros(0, self.arr.dtype)
        first, last = start // self.chunk, (stop - 1) // self.chunk
        parts = [self._chunk(c) for c in range(first, last + 1)]
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
        base = first * self.chunk
        return flat[start - base:stop - base]


class ProblemStore:
    """Random-access reader: len(store), store[i] -> Example. Data is read lazily per example.

    Validates the schema version and, when a tokenizer (or its identity) is given, that the
    store was written with the same tokenizer."""

    def __init__(self, path: str, tokenizer: Tokenizer | None = None, *,
                 tokenizer_identity: str | None = None, cache_chunks: int = 4):
        import zarr

        self.path = path
        if not os.path.isdir(path):
            raise StoreError(f"{path}: no problem store here")
        try:
            self.group = zarr.open_group(path, mode="r", zarr_format=3)
        except Exception as e:  # zarr raises several types for a broken directory
            raise StoreError(f"{path}: not a zarr v3 group ({e})") from e
        self.manifest = dict(self.group.attrs).get("manifest")
        self._check_manifest(tokenizer.identity() if tokenizer else tokenizer_identity)
        self._n = int(self.manifest["count"])
        self._data, self._offsets = {}, {}
        for name in TEXT_FIELDS + TOKEN_FIELDS:
            self._data[name], self._offsets[name] = self._open_ragged(name, cache_chunks)
        self._unit = self._open_fixed("unit")
        self._source_line = self._open_fixed("source_line")

    def _fail(self, field_name: str, why: str):
        raise StoreError(f"{self.path}: field {field_name!r}: {why}")

    def _check_manifest(self, identity: str | None) -> None:
        m = self.manifest
        if not isinstance(m, dict) or m.get("schema") != SCHEMA:
            self._fail("manifest", f"missing or not an {SCHEMA} manifest")
        if m.get("schema_version") != SCHEMA_VERSION:
            self._fail("schema_version", f"store has {m.get('schema_version')!r}, this code "
                                         f"reads {SCHEMA_VERSION}; re-run tools/preprocess_data.py")
        stored = m.get("tokenizer", {}).get("identity")
        if identity is not None and stored != identity:
            self._fail("tokenizer.identity", f"store was written with tokenizer {stored} "
                                             f"({m['tokenizer'].get('path')}), not {identity}")

    def _open_ragged(self, name: str, cache_chunks: int):
        try:
            data, offsets = self.group[f"{name}/data"], self.group[f"{name}/offsets"][:]
        except KeyError:
            self._fail(name, "array missing")
        if len(offsets) != self._n + 1 or offsets[0] != 0 or offsets[-1] != data.shape[0]:
            last = offsets[-1] if len(offsets) else None
            self._fail(name, f"offsets ({len(offsets)}, last {last}) do not match count "
                             f"{self._n} and data length {data.shape[0]}")
        return _ChunkedReader(data, cache_chunks), offsets

    def _open_fixed(self, name: str) -> np.ndarray:
        try:
            values = self.group[name][:]
        except KeyError:
            self._fail(name, "array missing")
        if len(values) != self._n:
            self._fail(name, f"{len(values)} values for {self._n} examples")
        return values

    def __len__(self) -> int:
        return self._n

    def _get(self, name: str, i: int) -> np.ndarray:
        off = self._offsets[name]
        return self._data[name].read(int(off[i]), int(off[i + 1]))

    def _text(self, name: str, i: int) -> str:
        return self._get(name, i).tobytes().decode("utf-8")

    def __getitem__(self, i: int) -> Example:
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"{self.path}: index {i} outside [0, {self._n})")
        teacher = TeacherPieces(prefix=self._get("teacher_prefix", i),
                                reference=self._get("reference", i),
                                segment_ends=self._get("segment_ends", i),
                                answer=self._get("answer_tokens", i),
                                transition=self._get("transition", i))
        return Example(problem=self._text("problem", i), solution=self._text("solution", i),
                       answer=self._text("answer", i), student=self._get("student", i),
                       teacher=teacher, unit=UNITS[int(self._unit[i])],
                       source_line=int(self._source_line[i]), index=i)

    def lengths(self, name: str) -> np.ndarray:
        """Per-example length of a ragged field (e.g. "student"), from the offsets alone."""
        if name not in self._offsets:
            self._fail(name, f"no such ragged field (have {sorted(self._offsets)})")
        return np.diff(self._offsets[name])

    def teacher_max_lengths(self) -> np.ndarray:
        """Fully revealed teacher prompt length per example."""
        return sum(self.lengths(n) for n in ("teacher_prefix", "reference", "answer_tokens",
                                             "transition"))
