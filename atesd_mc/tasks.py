"""Problem sets for a run: the embedded synthetic task or a preprocessed store.

Both go through the same zarr store format (atesd_mc.data.store): the synthetic task's splits are
written once into the cache directory (rank 0, then a barrier) together with its sentencepiece
tokenizer, keyed by a hash of everything that determines them."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

import torch.distributed as dist

from atesd_mc.checkpoint import file_lock
from atesd_mc.config import ConfigError, RunConfig
from atesd_mc.data.sampler import choose_probe_indices
from atesd_mc.data.store import ProblemStore, write_store
from atesd_mc.data.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer, train_sentencepiece


@dataclasses.dataclass(kw_only=True, slots=True)
class Problems:
    tokenizer: Tokenizer
    train: ProblemStore
    train_exclude: list[int]
    """Indices of `train` kept out of the batch stream (the probe set)."""
    probe: list
    """Examples for the probe NLL."""
    eval: Sequence
    """Held-out examples for accuracy (may be empty): the test split."""
    extra_eval: dict[str, list] = dataclasses.field(default_factory=dict)
    """Further held-out splits evaluated before and after training, by name (synthetic task:
    "val" and "prior" when their sizes are set)."""


def synthetic_task_config(cfg: RunConfig):
    from atesd_mc.data.synthetic import SyntheticTaskConfig

    d = cfg.data
    return SyntheticTaskConfig(seed=cfg.train.seed, train_size=d.synthetic_train_size,
                               probe_size=d.probe_size, eval_size=d.synthetic_eval_size,
                               val_size=d.synthetic_val_size, prior_size=d.synthetic_prior_size,
                               min_steps=d.synthetic_min_steps, max_steps=d.synthetic_max_steps)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _synthetic_dir(cfg: RunConfig, task_cfg) -> str:
    from atesd_mc.data import store as store_mod
    from atesd_mc.data.templates import TEMPLATE_PHRASES

    key = json.dumps({"task": dataclasses.asdict(task_cfg), "vocab": cfg.data.synthetic_vocab_size,
                      "phrases": TEMPLATE_PHRASES, "schema": store_mod.SCHEMA_VERSION},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return os.path.join(cfg.data.cache_dir, f"synthetic-{digest}")


def build_synthetic(cfg: RunConfig) -> str:
    """Create (once) the tokenizer and the train/probe/eval stores of the synthetic task."""
    task_cfg = synthetic_task_config(cfg)
    root = _synthetic_dir(cfg, task_cfg)
    done = os.path.join(root, "COMPLETE")
    if not dist.is_initialized() or dist.get_rank() == 0:
        with file_lock(root + ".lock"):
            _build_synthetic_files(cfg, task_cfg, root, done)
    _barrier()
    return root


def _build_synthetic_files(cfg: RunConfig, task_cfg, root: str, done: str) -> None:
    """Tokenizer, then the three stores, then the COMPLETE marker (under the cache lock)."""
    from atesd_mc.data.synthetic import corpus, make_splits
    from atesd_mc.data.templates import TEMPLATE_PHRASES

    if os.path.exists(done):
        return
    os.makedirs(root, exist_ok=True)
    model_path = os.path.join(root, "tokenizer.model")
    train_sentencepiece(corpus(task_cfg), cfg.data.synthetic_vocab_size, model_path,
                        phrases=TEMPLATE_PHRASES)
    tok = SentencePieceTokenizer(model_path)
    splits = make_splits(task_cfg)
    for name in ("train", "probe", "eval", "val", "prior"):
        if name in ("val", "prior") and not splits[name]:
            continue
        write_store(os.path.join(root, name), splits[name], tok, overwrite=True,
                    source={"synthetic": dataclasses.asdict(task_cfg)}, enable_thinking=False)
    with open(done, "w") as f:
        f.write("ok\n")


def check_vocabulary(cfg: RunConfig, tok: Tokenizer) -> None:
    """Refuse a tokenizer with ids past the model's vocabulary (model.vocab_size; 0 = the
    tokenizer's own size). Nothing else would: the embedding is padded past the real vocabulary
    (make_vocab_size_divisible_by), so those ids index untrained padding rows and the run trains
    and evaluates as if nothing were wrong. A smaller tokenizer is fine (Qwen3's is)."""
    model_vocab = cfg.model.vocab_size
    if model_vocab and tok.vocab_size > model_vocab:
        raise ConfigError(
            f"tokenizer {getattr(tok, 'path', '') or '(unnamed)'} has {tok.vocab_size} ids but the "
            f"model's vocabulary is {model_vocab} (model.vocab_size, which --finetune takes from the "
            f"checkpoint's model description): ids {model_vocab}..{tok.vocab_size - 1} would land on "
            f"untrained padding rows of the embedding; use the tokenizer the model was imported or "
            f"trained with")


def load_problems(cfg: RunConfig) -> Problems:
    d = cfg.data
    if not d.data_path:
        root = build_synthetic(cfg)
        tok = SentencePieceTokenizer(os.path.join(root, "tokenizer.model"))
        check_vocabulary(cfg, tok)
        train = ProblemStore(os.path.join(root, "train"), tok)
        probe = ProblemStore(os.path.join(root, "probe"), tok)
        held = ProblemStore(os.path.join(root, "eval"), tok)
        return Problems(tokenizer=tok, train=train, train_exclude=[],
                        probe=[probe[i] for i in range(len(probe))],
                        eval=_held_out(held, d.eval_size),
                        extra_eval={name: _held_out(ProblemStore(os.path.join(root, name), tok), 0)
                                    for name in ("val", "prior") if os.path.isdir(os.path.join(root, name))})
    if not d.tokenizer:
        raise ConfigError(f"data_path={d.data_path!r} needs --tokenizer (the one the store was made with; an "
                          "import-hf checkpoint folder holds a copy)")
    tok = load_tokenizer(d.tokenizer)
    check_vocabulary(cfg, tok)
    train = ProblemStore(d.data_path, tok)
    if train.manifest.get("reference_solutions") is False:
        raise ConfigError(f"data_path={d.data_path!r} is an answer-only store (no reference solutions, e.g. "
                          "AIME/HMMT): the teacher needs them; pass it as --eval-data-path")
    exclude = choose_probe_indices(len(train), min(d.probe_size, len(train) // 2), cfg.train.seed)
    held = ProblemStore(d.eval_data_path, tok) if d.eval_data_path else []
    return Problems(tokenizer=tok, train=train, train_exclude=exclude,
                    probe=[train[i] for i in exclude], eval=_held_out(held, d.eval_size))


def _held_out(store, size: int) -> list:
    """The first `size` examples of the held-out store (all of it when size is 0). Evaluation
    reads only each example's student prompt and answer, so an answer-only store will do."""
    n = len(store) if size == 0 else min(size, len(store))
    return [store[i] for i in range(n)]


class ReferenceTokens:
    """The reference solution as the assistant's answer: its tokens + EOS, cached per example
    (synthetic examples built on the fly have index -1 and are cached by identity)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, list[int]] = {}

    def __call__(self, ex) -> list[int]:
        key = id(ex) if ex.index < 0 else ex.index
        if key not in self._cache:
            self._cache[key] = self.tokenizer.encode(ex.solution) + [self.tokenizer.eos_id]
        return self._cache[key]
