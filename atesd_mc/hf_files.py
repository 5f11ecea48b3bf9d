"""Hugging Face checkpoint files: a lazy reader of safetensors (or, on request, pickle) shards and
a sharded safetensors writer, plus the error type every conversion step raises.

The conversion modules (atesd_mc.convert_config, convert_layout, convert) import ConversionError
from here; this module imports nothing of atesd_mc, so the dependency goes one way."""
from __future__ import annotations

import json
import os
from typing import Any, Iterable

import torch

# The non-weight files of a HF model directory that a conversion carries over unchanged, so the
# converted checkpoint can be tokenized and generated from like the original.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "generation_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "added_tokens.json")


class ConversionError(ValueError):
    """The HF or megatron checkpoint cannot be converted; the message says what and where."""


def summarize_names(names: list[str], limit: int = 6) -> str:
    """The first `limit` names, comma-separated, and how many more there are (error messages
    about thousands of tensors stay readable)."""
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f", ... ({more} more)" if more > 0 else "")


class HFCheckpoint:
    """Lazy reader of a HF checkpoint directory: model.safetensors, or an index json with shards.

    `get(name)` reads one tensor (safe_open memory-maps the file; only that tensor is copied into
    host memory). Pickle weights (pytorch_model*.bin) are refused unless allow_pickle=True; they
    are then torch.load-ed (weights_only, mmap) one file at a time."""

    SAFE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
    BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

    def __init__(self, directory: str, *, allow_pickle: bool = False):
        self.dir = directory
        self._open: dict[str, Any] = {}
        self._bin_cache: tuple[str, dict] | None = None
        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise ConversionError(f"{directory}: no config.json (not a HF model directory)")
        self.pickle = False
        if os.path.isfile(self._p(self.SAFE_INDEX)):
            self.weight_map = self._index(self.SAFE_INDEX)
        elif os.path.isfile(self._p(self.SAFE)):
            self.weight_map = self._keys(self.SAFE)
        elif os.path.isfile(self._p(self.BIN_INDEX)) or os.path.isfile(self._p(self.BIN)):
            if not allow_pickle:
                raise ConversionError(
                    f"{directory}: only pickle weights ({self.BIN}*) found; they can run arbitrary "
                    "code when loaded. Convert them to safetensors, or pass --allow-pickle if you "
                    "trust the source")
            self.pickle = True
            if os.path.isfile(self._p(self.BIN_INDEX)):
                self.weight_map = self._index(self.BIN_INDEX)
            else:
                self.weight_map = {n: self.BIN for n in self._load_bin(self.BIN)}
        else:
            raise ConversionError(f"{directory}: no {self.SAFE} or {self.SAFE_INDEX} found")

    def _p(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _index(self, index: str) -> dict[str, str]:
        with open(self._p(index)) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{self._p(index)}: no weight_map")
        missing = sorted({s for s in weight_map.values() if not os.path.isfile(self._p(s))})
        if missing:
            raise ConversionError(f"{self._p(index)}: {len(missing)} shard file(s) listed in the "
                                  f"index are missing: {summarize_names(missing)}")
        return dict(weight_map)

    def _keys(self, file: str) -> dict[str, str]:
        return {n: file for n in self._handle(file).keys()}

    def _handle(self, file: str):
        from safetensors import safe_open

        if file not in self._open:
            self._open[file] = safe_open(self._p(file), framework="pt", device="cpu")
        return self._open[file]

    def _load_bin(self, file: str) -> dict:
        if self._bin_cache is None or self._bin_cache[0] != file:
            self._bin_cache = None  # free the previous file first
            self._bin_cache = (file, torch.load(self._p(file), map_location="cpu", weights_only=True,
                                                mmap=True))
        return self._bin_cache[1]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        """One tensor; KeyError when the checkpoint lacks it."""
        file = self.weight_map[name]
        if self.pickle:
            return self._load_bin(file)[name]
        return self._handle(file).get_tensor(name)

    def config(self) -> dict:
        with open(self._p("config.json")) as f:
            return json.load(f)

    def close(self) -> None:
        self._open.clear()
        self._bin_cache = None

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape without reading its data (safetensors header)."""
        file = self.weight_map[name]
        if self.pickle:
            return tuple(self._load_bin(file)[name].shape)
        return tuple(self._handle(file).get_slice(name).get_shape())


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / bytes -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    for unit, mult in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9),
                       ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def write_safetensors(items: Iterable[tuple[str, torch.Tensor]], out_dir: str,
                      max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """Write (name, tensor) pairs as model.safetensors, or as HF-style shards with
    model.safetensors.index.json once they exceed max_shard_bytes. At most one shard's tensors are
    held at a time. Returns the files written."""
    from safetensors.torch import save_file

    parts: list[tuple[str, list[str]]] = []
    batch: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        nonlocal batch, size
        if batch:
            tmp = f"part-{len(parts):05d}.safetensors"
            save_file(batch, os.path.join(out_dir, tmp), metadata={"format": "pt"})
            parts.append((tmp, list(batch)))
            batch, size = {}, 0

    for name, t in items:
        n = t.numel() * t.element_size()
        if batch and size + n > max_shard_bytes:
            flush()
        batch[name] = t.contiguous()
        size += n
        total += n
    flush()
    if len(parts) == 1:
        os.replace(os.path.join(out_dir, parts[0][0]), os.path.join(out_dir, "model.safetensors"))
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, (tmp, names) in enumerate(parts):
        final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, final))
        files.append(final)
        weight_map.update({n: final for n in names})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files + ["model.safetensors.index.json"]
