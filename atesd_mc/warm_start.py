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

from atesd_mc import distributed, schedule
from atesd_mc.checkpoint import file_lock, load_sharded, save_sharded
from atesd_mc.batching import build_side, per_sequence_weights
from atesd_mc.losses import sft_loss
from atesd_mc.model.qwen3 import build_stage, local_vocab_range, output_weight, tp_input
from atesd_mc.optim import build_optimizer, build_scheduler, optimizer_step, wrap_ddp, zero_grads


def cache_path(trainer) -> str:
    cfg = trainer.cfg
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items()
             if k not in ("lora_rank", "lora_alpha", "lora_targets", "teacher_mode", "teacher_ema_decay")}
    key = json.dumps({"model": model, "vocab": trainer.vocab, "tokenizer": trainer.tok.identity(),
                      "data": [cfg.data.data_path, len(trainer.problems.train)],
                      "synthetic": [cfg.data.synthetic_train_size, cfg.data.synthetic_min_steps,
                                    cfg.data.synthetic_max_steps, cfg.data.probe_size],
                      "iters": cfg.train.warm_start_iters, "lr": cfg.train.warm_start_lr,
                      "batch": cfg.train.warm_start_batch_size, "recipe": 3,
                      "engine": "lean" if trainer.lean_train else "megatron",
                      "mix": cfg.train.warm_start_teacher_fraction, "gbs": cfg.train.global_batch_size,
                      "seed": cfg.train.seed}, sort_keys=True)
    return os.path.join(cfg.data.cache_dir, "warm_start-" + hashlib.sha256(key.encode()).hexdigest()[:12])


def _stream(trainer, seed: int):
    """Endless (prompt tokens, response tokens) pairs for this data-parallel rank.

    Synthetic task: its own warm-start mix (novel facts get fresh random values in every example,
    so only the teacher format can get them right: by copying revealed lines), tokenised here.
    A problem store: student format, or teacher format with a uniform number of revealed segments."""
    from atesd_mc.data.store import make_example

    cfg, train, tok = trainer.cfg, trainer.problems.train, trainer.tok
    eos = tok.eos_id
    rng = random.Random(f"{seed}-warm-{trainer.info.dp_rank}")
    if not cfg.data.data_path:
        from atesd_mc.data.synthetic import warm_start_examples
        from atesd_mc.tasks import synthetic_task_config

        task = dataclasses.replace(synthetic_task_config(cfg),
                                   warm_teacher_fraction=cfg.train.warm_start_teacher_fraction)
        for kind, row, k in warm_start_examples(task, rng):
            ex = make_example(tok, row["problem"], row.get("reference", row["solution"]),
                              answer=row["answer"], enable_thinking=False)
            prompt = ex.student if kind == "student" else ex.teacher.tokens(k)
            yield prompt.tolist(), tok.encode(row["solution"]) + [eos]
    exclude = set(trainer.problems.train_exclude)
    pool = [i for i in range(len(train)) if i not in exclude]
    while True:
        ex = train[rng.choice(pool)]
        if rng.random() < cfg.train.warm_start_teacher_fraction:
            yield ex.teacher.tokens(rng.randint(0, ex.teacher.num_segments)).tolist(), trainer.response(ex)
        else:
            yield ex.student.tolist(), trainer.response(ex)


def _train(trainer, path: str) -> dict:
    cfg, p = trainer.cfg, trainer.cfg.parallel
    distributed.model_parallel_seed(cfg.train.seed)
    model = build_stage(cfg.model, p, trainer.vocab)
    ddp = wrap_ddp(model, p)
    iters = cfg.train.warm_start_iters
    lr = cfg.train.warm_start_lr
    # The warm start keeps Adam's standard beta2 whatever the distillation phase uses.
    opt = build_optimizer(ddp, dataclasses.replace(cfg.train, adam_beta2=0.999), p, lr=lr)
    # Short linear warm-up, cosine down to 10%: what made the teacher's copying form reliably.
    sched = build_scheduler(opt, cfg.train, lr=lr, iters=iters, warmup=min(50, iters // 10), min_lr=0.1 * lr)
    per_rank = (cfg.train.warm_start_batch_size or cfg.train.global_batch_size) // trainer.dp
    stream = _stream(trainer, cfg.train.seed)
    _, _, valid = local_vocab_range(model, trainer.info.tp_rank, trainer.info.tp)
    start, final_loss = time.perf_counter(), float("nan")
    log_every = max(1, iters // 10)
    for it in range(iters):
        batch = [next(stream) for _ in range(per_rank)]
        sides, ids, weights = [], [], []
        for mb in trainer._micro(batch):
            resp = [r for _, r in mb]
            side, rid = build_side([p for p, _ in mb], resp, trainer.device)
            sides.append(side)
            ids.append(rid)
            weights.append(per_sequence_weights(torch.tensor([len(r) for r in resp]), per_rank))
        zero_grads(ddp, opt)
        w = output_weight(model)
        infos = schedule.run(ddp, sides, lambda h, i: _sft(h, w, valid, ids[i], weights[i]),
                             forward_only=False, lean=trainer.lean_train)
        optimizer_step(opt, sched)
        if (it + 1) % log_every == 0 or it + 1 == iters:  # one all-reduce (and sync) per log line
            final_loss = trainer._all_sum([sum(float(i["loss"]) for i in infos)])[0] / trainer.dp
            trainer_log(trainer, f"warm start iteration {it + 1}/{iters} | lm loss: {final_loss:.4f} | "
                                 f"elapsed: {time.perf_counter() - start:.1f} s")
    save_sharded(model.sharded_state_dict(), path)
    return {"iters": iters, "seconds": time.perf_counter() - start, "final_loss": final_loss}


def _sft(h, w, valid, ids, weights):
    loss = sft_loss(tp_input(h), w, valid, ids, weights.to(h.device, h.dtype))
    return loss, {"loss": loss.detach().clone()}


def trainer_log(trainer, text: str) -> None:
    if trainer.rank0:
        print(text, flush=True)


def load_into(model, path: str) -> None:
    model.load_state_dict(load_sharded(model.sharded_state_dict(), path), strict=False)


def warm_start(trainer) -> dict:
    """Train (or reuse) the warm start and load it into trainer.model; returns what happened."""
    if trainer.cfg.train.warm_start_iters == 0:
        return {}
    path = cache_path(trainer)
    # Rank 0 holds a lock while deciding and training, so parallel jobs (a study) train it once.
    lock = file_lock(path + ".lock") if trainer.rank0 else contextlib.nullcontext()
    with lock:
        reused = distributed.broadcast_object(os.path.isdir(path))
        info: dict = {"cache": path, "reused": reused}
        if not reused:
            info.update(_train(trainer, path))
    if reused:
        trainer_log(trainer, f"warm start: reusing {path}")
    load_into(trainer.model, path)
    distributed.model_parallel_seed(trainer.cfg.train.seed + 1)
    return info
