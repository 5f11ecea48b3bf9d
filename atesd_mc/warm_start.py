"""Warm start: SFT on a mix of student-format and teacher-format examples, cached on disk.

Self-distillation from a random model means nothing: the student must already solve some
problems and the teacher must already use a reference. The warm start trains a separate model
stage (so the run's DDP hooks are built once, on the final parameter set, LoRA included), saves it
with megatron dist_checkpointing (it reshards, so one cache serves every TP/PP layout) into the
cache directory under a hash of everything that determines it, and loads it into the run's model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import time

import torch

from atesd_mc import distributed, stages
from atesd_mc.checkpoint import file_lock, load_sharded, save_sharded
from atesd_mc.config import RunConfig
from atesd_mc.distributed import ParallelInfo
from atesd_mc.engine import Engine
from atesd_mc.model.qwen3 import build_stage, local_vocab_range, output_weight
from atesd_mc.optim import build_optimizer, build_scheduler, optimizer_step, wrap_ddp
from atesd_mc.runtime import global_sum
from atesd_mc.tasks import Problems, ReferenceTokens


@dataclasses.dataclass(kw_only=True, slots=True)
class WarmStartInputs:
    cfg: RunConfig
    info: ParallelInfo
    engine: Engine
    vocab: int
    problems: Problems
    references: ReferenceTokens


def cache_path(w: WarmStartInputs) -> str:
    cfg = w.cfg
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items()
             if k not in ("lora_rank", "lora_alpha", "lora_targets", "teacher_mode", "teacher_ema_decay")}
    key = json.dumps({"model": model, "vocab": w.vocab, "tokenizer": w.problems.tokenizer.identity(),
                      "data": [cfg.data.data_path, len(w.problems.train)],
                      "synthetic": [cfg.data.synthetic_train_size, cfg.data.synthetic_min_steps,
                                    cfg.data.synthetic_max_steps, cfg.data.probe_size,
                                    # the held-out splits are drawn first: their sizes shape the train split
                                    cfg.data.synthetic_eval_size, cfg.data.synthetic_val_size,
                                    cfg.data.synthetic_prior_size],
                      "iters": cfg.train.warm_start_iters, "lr": cfg.train.warm_start_lr,
                      "batch": cfg.train.warm_start_batch_size, "recipe": 4,  # 4: one global stream sliced per rank (layout-invariant)
                      # What was asked, not what this layout runs: the cache serves every TP/PP layout.
                      "engine": [cfg.train.train_engine, torch.cuda.is_available()],
                      "mix": cfg.train.warm_start_teacher_fraction, "gbs": cfg.train.global_batch_size,
                      "seed": cfg.train.seed}, sort_keys=True)
    return os.path.join(cfg.data.cache_dir, "warm_start-" + hashlib.sha256(key.encode()).hexdigest()[:12])


def _stream(w: WarmStartInputs, seed: int):
    """Endless (prompt tokens, response tokens) pairs for this data-parallel rank: its contiguous
    slice of each global batch drawn from one stream that every rank draws alike, so the warm start
    is the same on every layout (with one rank, the stream rank 0 drew before: same warm starts).
    Only this rank's examples are tokenised."""
    size = w.cfg.train.warm_start_batch_size or w.cfg.train.global_batch_size
    per_rank = size // w.info.dp
    first = w.info.dp_rank * per_rank
    draws = _draws(w, random.Random(f"{seed}-warm-0"))
    while True:
        batch = [next(draws) for _ in range(size)]
        for build in batch[first:first + per_rank]:
            yield build()


def _draws(w: WarmStartInputs, rng: random.Random):
    """Endless global stream of examples, each a function building its (prompt, response) tokens:
    drawing consumes `rng`, building does not.

    Synthetic task: its own warm-start mix (novel facts get fresh random values in every example,
    so only the teacher format can get them right: by copying revealed lines), tokenised here.
    A problem store: student format, or teacher format with a uniform number of revealed segments."""
    from atesd_mc.data.store import make_example

    cfg, train, tok = w.cfg, w.problems.train, w.problems.tokenizer
    if not cfg.data.data_path:
        from atesd_mc.data.synthetic import warm_start_examples
        from atesd_mc.tasks import synthetic_task_config

        task = dataclasses.replace(synthetic_task_config(cfg),
                                   warm_teacher_fraction=cfg.train.warm_start_teacher_fraction)

        def synthetic(kind, row, k):
            ex = make_example(tok, row["problem"], row.get("reference", row["solution"]),
                              answer=row["answer"], enable_thinking=False)
            prompt = ex.student if kind == "student" else ex.teacher.tokens(k)
            return prompt.tolist(), tok.encode(row["solution"]) + [tok.eos_id]

        for kind, row, k in warm_start_examples(task, rng):
            yield lambda kind=kind, row=row, k=k: synthetic(kind, row, k)
    exclude = set(w.problems.train_exclude)
    pool = [i for i in range(len(train)) if i not in exclude]
    while True:
        i = rng.choice(pool)
        if rng.random() < cfg.train.warm_start_teacher_fraction:
            ex = train[i]  # its segment count is part of the draw
            k = rng.randint(0, ex.teacher.num_segments)
            yield lambda ex=ex, k=k: (ex.teacher.tokens(k).tolist(), w.references(ex))
        else:
            yield lambda i=i: (train[i].student.tolist(), w.references(train[i]))


@dataclasses.dataclass(kw_only=True, slots=True)
class _Loss:
    loss: float


def _train(w: WarmStartInputs, path: str) -> dict:
    cfg, p, info = w.cfg, w.cfg.parallel, w.info
    distributed.model_parallel_seed(cfg.train.seed)
    model = build_stage(cfg.model, p, w.vocab)
    ddp = wrap_ddp(model, p)
    iters = cfg.train.warm_start_iters
    lr = cfg.train.warm_start_lr
    # The warm start keeps Adam's standard beta2 whatever the distillation phase uses.
    opt = build_optimizer(ddp, dataclasses.replace(cfg.train, adam_beta2=0.999), p, lr=lr)
    # Short linear warm-up, cosine down to 10%: what made the teacher's copying form reliably.
    sched = build_scheduler(opt, cfg.train, lr=lr, iters=iters, warmup=min(50, iters // 10), min_lr=0.1 * lr)
    per_rank = (cfg.train.warm_start_batch_size or cfg.train.global_batch_size) // info.dp
    stream = _stream(w, cfg.train.seed)
    _, _, valid = local_vocab_range(model, info.tp_rank, info.tp)
    start, final_loss = time.perf_counter(), float("nan")
    log_every = max(1, iters // 10)
    for it in range(iters):
        batch = [next(stream) for _ in range(per_rank)]
        batches = stages.response_batches([q for q, _ in batch], [r for _, r in batch],
                                          cfg.train.micro_batch_size, per_rank, distributed.device())
        losses = stages.sft_backward(ddp, opt, batches, output_weight(model), valid,
                                     lean=w.engine.lean_forward)
        optimizer_step(opt, sched)
        if (it + 1) % log_every == 0 or it + 1 == iters:  # one all-reduce (and sync) per log line
            final_loss = global_sum(info, _Loss(loss=sum(float(x) for x in losses)),
                                    distributed.device()).loss / info.dp
            _log(info, f"warm start iteration {it + 1}/{iters} | lm loss: {final_loss:.4f} | "
                       f"elapsed: {time.perf_counter() - start:.1f} s")
    save_sharded(model.sharded_state_dict(), path)
    return {"iters": iters, "seconds": time.perf_counter() - start, "final_loss": final_loss}


def _log(info: ParallelInfo, text: str) -> None:
    if info.rank == 0:
        print(text, flush=True)


def load_into(model, path: str) -> None:
    from atesd_mc.checkpoint import load_module_state

    load_module_state(model, load_sharded(model.sharded_state_dict(), path), path)


def train_or_reuse(w: WarmStartInputs) -> tuple[str, dict]:
    """Train the warm start, or find it in the cache; returns (its checkpoint path, what happened)."""
    path = cache_path(w)
    # Rank 0 holds a lock while deciding and training, so parallel jobs (a study) train it once.
    lock = file_lock(path + ".lock") if w.info.rank == 0 else contextlib.nullcontext()
    with lock:
        reused = distributed.broadcast_object(os.path.isdir(path))
        info: dict = {"cache": path, "reused": reused}
        if not reused:
            info.update(_train(w, path))
    if reused:
        _log(w.info, f"warm start: reusing {path}")
    return path, info
