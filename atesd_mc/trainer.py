"""The ATESD loop (and its baselines) over megatron-core, one step per student update.

    alpha (rank 0 controller, broadcast) -> rollouts on the student prompt -> teacher forward on
    the revealed context (no grad) -> student forward/backward with the fused divergence ->
    optimizer step -> statistics (loss, mismatch, confidence, probe NLL, teacher score) -> controller

Every rank of a data-parallel group sees the same examples and rollouts; TP/PP ranks split the
model. The loss is a mean over sequences of per-token means (ATESD_SPEC section 1)."""
from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist

from atesd_mc import distributed, schedule
from atesd_mc.batching import build_pair, build_side, per_sequence_weights
from atesd_mc.config import RunConfig
from atesd_mc.data.sampler import DistributedBatchSampler
from atesd_mc.generation import SamplingParams, generate
from atesd_mc.logging import MetricsLogger, Timer
from atesd_mc.losses import distill_loss, rollout_statistics, sft_loss
from atesd_mc.model.lora import add_lora
from atesd_mc.model.qwen3 import build_stage, local_vocab_range, output_weight, tp_input, unwrap
from atesd_mc.model.teacher import Teacher
from atesd_mc.optim import build_optimizer, build_scheduler, optimizer_step, wrap_ddp, zero_grads
from atesd_mc.tasks import load_problems


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        p = cfg.parallel
        # Our message (naming the field) before megatron's, which would come from initialize().
        cfg.validate_world(dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1")))
        self.info = distributed.initialize(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                           cfg.train.seed, p.distributed_backend,
                                           p.distributed_timeout_minutes)
        self.dp = cfg.validate_world(self.info.world_size)
        self.rank0 = self.info.rank == 0
        self.device = distributed.device()
        # Rollouts and forward-only passes skip megatron's layers where a rank holds the whole model.
        self.lean = cfg.generation.inference_engine == "auto"
        self.lean_train = distributed.lean_training(cfg.train.train_engine)
        from atesd_mc import run_state

        self.resume_from, finetune = run_state.resume_path(cfg)
        if finetune:
            _architecture_from_checkpoint(cfg, self.resume_from, self.rank0)
        self.problems = load_problems(cfg)
        self.tok = self.problems.tokenizer
        self.vocab = cfg.model.vocab_size or self.tok.vocab_size
        self._responses: dict[int, list[int]] = {}
        self.model = build_stage(cfg.model, p, self.vocab)
        from atesd_mc.warm_start import warm_start

        if finetune:  # weights only (e.g. an imported HF model), before any adapter exists
            from atesd_mc.model_io import load_weights

            load_weights(self.model, self.resume_from)
            if self.rank0:
                print(f"loaded weights from {self.resume_from} (--finetune)", flush=True)
            self.resume_from = None
        # A resumed or fine-tuned run takes every weight (theta_0 included) from its checkpoint.
        self.warm_start_info = {} if (self.resume_from or finetune) else warm_start(self)
        if cfg.model.lora_rank:
            add_lora(self.model, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets,
                     cfg.train.seed)
        self.ddp = wrap_ddp(self.model, p)
        self.optimizer = build_optimizer(self.ddp, cfg.train, p)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.teacher = Teacher(cfg.model.resolved_teacher_mode, self.model,
                               lambda: build_stage(cfg.model, p, self.vocab), cfg.model.teacher_ema_decay)
        self.exposure = self._make_exposure() if self.rank0 else None
        per_rank = cfg.train.global_batch_size // self.dp
        self.sampler = DistributedBatchSampler(len(self.problems.train), batch_per_rank=per_rank,
                                               dp_rank=self.info.dp_rank, dp_size=self.dp,
                                               seed=cfg.train.seed, exclude=self.problems.train_exclude)
        self.step = 0
        self.skipped_total = self.skipped_in_row = 0
        self.resumed_state = run_state.load(self, self.resume_from) if self.resume_from else {}
        self.timer = Timer()
        self.logger = MetricsLogger(cfg.run_dir, self.rank0, cfg.train.train_iters,
                                    tensorboard=cfg.logging.tensorboard,
                                    progress_bar=cfg.logging.progress_bar,
                                    resume=bool(self.resumed_state))
        if self.resumed_state:
            self.logger.print(f"resumed from {self.resume_from} at iteration {self.step}")

    # ------------------------------------------------------------------ helpers
    def _make_exposure(self):
        from atesd_mc.exposure.schedules import FixedExposure, make_exposure

        if self.cfg.train.atesd_algorithm == "opsd":
            return FixedExposure(1.0)
        return make_exposure(self.cfg.exposure, self.cfg.controller, self.cfg.train.train_iters,
                             self.cfg.train.seed)

    def response(self, ex) -> list[int]:
        """The reference solution as the assistant's answer: tokens + EOS (cached per example)."""
        key = id(ex) if ex.index < 0 else ex.index
        if key not in self._responses:
            self._responses[key] = self.tok.encode(ex.solution) + [self.tok.eos_id]
        return self._responses[key]

    def _shared_output(self) -> bool:
        return self.teacher.module is unwrap(self.model)

    def _weights(self):
        w_s = output_weight(self.model)
        w_t = None if self._shared_output() else output_weight(self.teacher.module)
        _, _, valid = local_vocab_range(self.model, self.info.tp_rank, self.info.tp)
        return w_s, w_t, valid

    def _micro(self, items: list) -> list[list]:
        size = self.cfg.train.micro_batch_size
        return [items[i:i + size] for i in range(0, len(items), size)]

    def _count_here(self) -> bool:
        """One rank per data-parallel replica contributes to global statistics."""
        return self.info.tp_rank == 0 and self.info.is_last_stage

    def _all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values if self._count_here() else [0.0] * len(values), dtype=torch.float64,
                         device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        return t.tolist()

    def sampling(self, greedy: bool = False, max_new: int | None = None) -> SamplingParams:
        g = self.cfg.generation
        return SamplingParams(max_new_tokens=max_new or g.max_new_tokens,
                              temperature=0.0 if greedy else g.rollout_temperature,
                              top_p=g.top_p, top_k=g.top_k, eos_id=self.tok.eos_id,
                              engine=g.inference_engine)

    def _generator(self, *salt: int) -> torch.Generator:
        """Rollout randomness from (seed, step, dp rank, ...): resumable without saved state."""
        seed = hash((self.cfg.train.seed, self.step, self.info.dp_rank) + salt) % (2 ** 63)
        return torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        fault = self.cfg.train.inject_fault_at
        if fault and fault == f"{self.info.rank}:{self.step + 1}":
            raise RuntimeError(f"injected fault on rank {self.info.rank} at iteration {self.step + 1}")
        algo = self.cfg.train.atesd_algorithm
        if algo in ("sft", "lm"):
            return self.sft_step()
        if algo == "grpo":
            from atesd_mc.grpo import grpo_step

            return grpo_step(self)
        return self.distill_step()

    def sft_step(self) -> dict:
        """Next-token loss on the reference solution given the student prompt (SFT baseline)."""
        t = self.timer
        examples = [self.problems.train[i] for i in self.sampler.next_batch()]
        w, _, valid = self._weights()
        sides, ids, weights = [], [], []
        for mb in self._micro(examples):
            resp = [self.response(ex) for ex in mb]
            side, rid = build_side([ex.student.tolist() for ex in mb], resp, self.device)
            sides.append(side)
            ids.append(rid)
            weights.append(per_sequence_weights(torch.tensor([len(r) for r in resp]), len(examples)))
        t.start("student")
        zero_grads(self.ddp, self.optimizer)
        infos = schedule.run(self.ddp, sides, lambda h, i: _weighted_sft(h, w, valid, ids[i], weights[i]),
                             forward_only=False, lean=self.lean_train)
        t.stop("student")
        n_tok = float(sum(len(i) for i in ids))
        g = self._all_sum([sum(float(i["loss"]) for i in infos), n_tok])
        return self._update_and_record(None, g[0] / self.dp, {"student": g[1]})

    def distill_step(self) -> dict:
        cfg, t = self.cfg, self.timer
        alpha = None
        if self.exposure is not None:
            alpha = float(self.exposure.alpha_for_step(self.step))
        alpha = distributed.broadcast_object(alpha)
        examples = [self.problems.train[i] for i in self.sampler.next_batch()]
        t.start("rollout")
        rollouts = generate(self.ddp, [ex.student.tolist() for ex in examples], self.sampling(),
                            self._generator())
        t.stop("rollout")
        pairs = [build_pair(mb, rollouts.tokens[i * len(mb):(i + 1) * len(mb)], alpha,
                            cfg.exposure.reveal_unit, self.device)
                 for i, mb in enumerate(self._micro(examples))]
        n_seq = len(examples)
        t.start("teacher")
        with self.teacher.context() as teacher_model:
            h_teacher = [o["h"] for o in schedule.run(
                teacher_model, [p.teacher for p in pairs],
                lambda h, i: (h.sum() * 0, {"h": h.detach()}), forward_only=True, lean=self.lean)]
        t.stop("teacher")
        w_s, w_t, valid = self._weights()
        t.start("student")
        zero_grads(self.ddp, self.optimizer)

        def loss_fn(h, i):
            pair = pairs[i]
            weights = per_sequence_weights(pair.rollout_lengths, n_seq).to(h.device)
            loss = distill_loss(tp_input(h), h_teacher[i], w_s, w_t, valid, weights, cfg.loss,
                                pair.rollout_ids)
            stats = rollout_statistics(h, h_teacher[i], w_s, w_t, valid)
            return loss, {"loss": loss.detach().clone(), **stats}

        infos = schedule.run(self.ddp, [p.student for p in pairs], loss_fn, forward_only=False,
                             lean=self.lean_train)
        t.stop("student")
        return self._finish_step(alpha, infos, rollouts, pairs, examples)

    def _finish_step(self, alpha, infos, rollouts, pairs, examples) -> dict:
        t = self.timer
        loss_sum = sum(float(i["loss"]) for i in infos)
        kl = sum(float(i["kl"]) for i in infos)
        top1 = sum(float(i["top1_disagree"]) for i in infos)
        conf = sum(float(i["confidence"]) for i in infos)
        cnt = sum(float(i["count"]) for i in infos)
        n_roll = sum(len(r) for r in rollouts.tokens)
        n_teacher = sum(int(p.teacher.lengths.sum()) for p in pairs)
        n_student = sum(int(p.student.lengths.sum()) for p in pairs)
        g = self._all_sum([loss_sum, kl, top1, conf, cnt, n_roll, n_teacher, n_student,
                           float(sum(rollouts.finished)), float(len(rollouts.finished))])
        extra = {"mismatch": g[1] / max(g[4], 1), "top1_disagree": g[2] / max(g[4], 1),
                 "confidence": g[3] / max(g[4], 1), "rollout_len": g[5] / max(g[9], 1),
                 "eos_rate": g[8] / max(g[9], 1), "flops": self._step_flops(examples, rollouts, pairs)}
        score = self.teacher_score(examples[: min(4, len(examples))], alpha)
        return self._update_and_record(alpha, g[0] / self.dp,
                                       {"rollout": g[5], "teacher": g[6], "student": g[7]},
                                       extra, teacher_score=score)

    def _update_and_record(self, alpha, loss: float, tokens: dict, extra: dict | None = None,
                           teacher_score: float = float("nan")) -> dict:
        """Optimizer step (skipped on a non-finite loss), statistics, controller, step record."""
        t = self.timer
        t.start("optimizer")
        if self.step + 1 in self.cfg.train.inject_nan_steps:
            loss = float("nan")  # testing hook: behave as if this step's loss were NaN
        updated, grad_norm = False, float("nan")
        if math.isfinite(loss) and self._grads_finite():
            updated, grad_norm, _ = optimizer_step(self.optimizer, self.scheduler)
            updated = updated and math.isfinite(grad_norm)
            if updated:
                self.teacher.after_optimizer_step()
        self._count_skip(updated, loss, grad_norm)
        t.stop("optimizer")
        t.start("stats")
        probe_nll = self.probe_nll()
        t.stop("stats")
        record = {"step": self.step + 1, "alpha": alpha, "loss": loss, **(extra or {}),
                  "probe_nll": probe_nll, "teacher_score": teacher_score, "grad_norm": grad_norm,
                  "skipped": not updated, "skipped_total": self.skipped_total,
                  "lr": self.optimizer.param_groups[0]["lr"], "tokens": tokens}
        if self.exposure is not None and alpha is not None and updated:
            mismatch = record["mismatch"] if self.cfg.controller.mismatch_metric == "kl" else record["top1_disagree"]
            out = self.exposure.observe(self.step, loss=loss, mismatch=mismatch, probe_nll=probe_nll,
                                        confidence=record["confidence"], teacher_score=teacher_score) or {}
            record.update(_controller_fields(out))
        self.step += 1
        return record

    def _step_flops(self, examples, rollouts, pairs) -> dict:
        """Executed FLOPs per stage of this step, summed over data-parallel replicas."""
        from atesd_mc.flops import step_flops
        from atesd_mc.model.qwen3 import padded_vocab_size

        new = [len(r) for r in rollouts.tokens]
        teacher_ctx = [int(t) - n for p in pairs for t, n in
                       zip(p.teacher.lengths.tolist(), p.rollout_lengths.tolist())]
        f = step_flops(self.cfg.model, self.vocab, [len(ex.student) for ex in examples], new, teacher_ctx,
                       padded_vocab=padded_vocab_size(self.vocab, self.cfg.model.make_vocab_size_divisible_by,
                                                      self.info.tp))
        keys = list(f)
        return dict(zip(keys, self._all_sum([f[k] for k in keys])))

    def _grads_finite(self) -> bool:
        """All ranks agree whether every gradient is finite (one all-reduce)."""
        bad = torch.zeros(1, dtype=torch.float32, device=self.device)
        for buf in getattr(self.ddp, "buffers", []):
            if not bool(torch.isfinite(buf.grad_data).all()):
                bad.fill_(1.0)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0

    def _count_skip(self, updated: bool, loss: float, grad_norm: float) -> None:
        """A skipped step changes nothing (weights, optimizer, controller); too many in a row stop
        the run with the last good checkpoint intact."""
        if updated:
            self.skipped_in_row = 0
            return
        self.skipped_total += 1
        self.skipped_in_row += 1
        self.logger.print(f"iteration {self.step + 1}: skipped (loss {loss}, grad norm {grad_norm}); "
                          f"number of nan iterations: {self.skipped_total}")
        if self.skipped_in_row >= self.cfg.train.max_skipped_steps:
            raise RuntimeError(f"{self.skipped_in_row} consecutive iterations had a NaN/Inf loss or gradient "
                               f"(max_skipped_steps={self.cfg.train.max_skipped_steps}); stopping. The last "
                               f"good checkpoint is the one named in {self.cfg.run_dir}/"
                               f"latest_checkpointed_iteration.txt")

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def probe_nll(self) -> float:
        """Student's teacher-forced NLL per token of y* given x only, on the fixed probe set."""
        probe = self.problems.probe[self.info.dp_rank::self.dp]
        if not probe:
            return float("nan")
        w, _, valid = self._weights()
        sides, ids = [], []
        for mb in self._micro(probe):
            side, rid = build_side([ex.student.tolist() for ex in mb], [self.response(ex) for ex in mb],
                                   self.device)
            sides.append(side)
            ids.append(rid)
        infos = schedule.run(unwrap(self.model), sides, lambda h, i: (
            h.sum() * 0, {"nll": sft_loss(h, w, valid, ids[i], torch.ones_like(ids[i], dtype=h.dtype)),
                          "n": float(len(ids[i]))}), forward_only=True, lean=self.lean)
        g = self._all_sum([sum(float(i["nll"]) for i in infos), sum(i["n"] for i in infos)])
        return g[0] / max(g[1], 1)

    @torch.no_grad()
    def teacher_score(self, examples, alpha) -> float:
        """Teacher-grounded score: the exposed teacher's mean log-prob of the reference solution."""
        if alpha is None or not examples:
            return float("nan")
        pair = build_pair(examples, [self.response(ex) for ex in examples], alpha,
                          self.cfg.exposure.reveal_unit, self.device)
        w_s, w_t, valid = self._weights()
        w = w_s if w_t is None else w_t
        with self.teacher.context() as teacher_model:
            infos = schedule.run(teacher_model, [pair.teacher], lambda h, i: (h.sum() * 0, {
                "lp": -sft_loss(h, w, valid, pair.rollout_ids,
                                torch.ones_like(pair.rollout_ids, dtype=h.dtype)),
                "n": float(len(pair.rollout_ids))}), forward_only=True, lean=self.lean)
        g = self._all_sum([sum(float(i["lp"]) for i in infos), sum(i["n"] for i in infos)])
        return g[0] / max(g[1], 1)

    @torch.no_grad()
    def evaluate(self, greedy: bool = True) -> dict:
        """Held-out accuracy from the student prompt: greedy (one rollout per problem), or Avg@k
        over k = eval_samples sampled rollouts per problem."""
        from atesd_mc.evaluation import is_correct
        from atesd_mc.generation import generate_bucketed

        held = list(self.problems.eval)
        if not held:
            return {}
        k = 1 if greedy else self.cfg.train.eval_samples
        mine = [ex for ex in held[self.info.dp_rank::self.dp] for _ in range(k)]
        out = generate_bucketed(self.ddp, [ex.student.tolist() for ex in mine],
                                self.sampling(greedy=greedy, max_new=self.cfg.train.eval_max_new_tokens or None),
                                self._generator(7919))
        correct = sum(int(is_correct(self.tok.decode(t, skip_special_tokens=True), ex.answer))
                      for ex, t in zip(mine, out.tokens))
        g = self._all_sum([float(correct), float(len(mine))])
        return {"accuracy": g[0] / max(g[1], 1), "n": int(g[1]) // k, "k": k,
                "mode": "greedy" if greedy else f"avg@{k}"}

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        import json

        from atesd_mc import run_state

        cfg = self.cfg
        total = cfg.train.train_iters
        results = self.resumed_state.get("eval_before")
        if results is None:
            results = {"before": self.evaluate(), "before_sampled": self.evaluate(greedy=False)}
            self.logger.print(f"held-out accuracy before: {results['before']}")
        from atesd_mc import signals

        if cfg.checkpoint.exit_signal_handler:
            signals.install()
        start = time.perf_counter()
        started = time.monotonic()
        interval = cfg.checkpoint.save_interval
        while self.step < total:
            record = self.train_step()
            times = self.timer.reset()
            record["time"] = times
            line = None
            if record["step"] % cfg.logging.log_interval == 0 or record["step"] == total:
                line = _line_fields(record, times, cfg.train.global_batch_size, self.info.world_size)
            self.logger.step(record, line)
            reason = signals.exit_reason(self.step, started, cfg.checkpoint.exit_duration_in_mins,
                                         cfg.checkpoint.exit_interval) if self.step < total else None
            if reason or (interval and self.step % interval == 0 and self.step < total):
                path = run_state.save(self, {"eval_before": results})
                if reason:
                    self.logger.print(f"exiting at iteration {self.step}: {reason}; checkpoint saved to {path}")
                    self.logger.close()
                    return {**results, "exited_early": reason, "step": self.step}
            if cfg.train.eval_interval and record["step"] % cfg.train.eval_interval == 0 and record["step"] < total:
                self.logger.print(f"held-out accuracy at {record['step']}: {self.evaluate()}")
        if not (self.resumed_state and self.resumed_state["step"] == total):
            run_state.save(self, {"eval_before": {k: results[k] for k in ("before", "before_sampled")}})
        results["after"] = self.evaluate()
        results["after_sampled"] = self.evaluate(greedy=False)
        results["train_seconds"] = time.perf_counter() - start
        results["warm_start"] = self.warm_start_info
        self.logger.print(f"held-out accuracy after: {results['after']}")
        if self.rank0:
            path = os.path.join(cfg.run_dir, "eval.json")
            with open(path + ".tmp", "w") as f:
                json.dump(results, f, indent=2)
            os.replace(path + ".tmp", path)
            from atesd_mc.plotting import plot

            self.logger.print(f"wrote {path} and {plot(cfg.run_dir, os.path.join(cfg.run_dir, 'run.png'))}")
        self.logger.close()
        return results


def _architecture_from_checkpoint(cfg: RunConfig, root: str, verbose: bool) -> None:
    """--finetune from an import (model_config.json): the architecture comes from the checkpoint,
    as Megatron's --use-checkpoint-args; adapters, teacher mode and dtype stay as configured."""
    import dataclasses
    import json

    path = os.path.join(root, "model_config.json")
    if not os.path.exists(path):
        return
    saved = json.load(open(path))
    keep = {"lora_rank", "lora_alpha", "lora_targets", "teacher_mode", "teacher_ema_decay",
            "params_dtype", "transformer_impl", "seq_length"}
    changed = {k: v for k, v in saved.items() if k not in keep and getattr(cfg.model, k, v) != v}
    cfg.model = dataclasses.replace(cfg.model, **{k: v for k, v in saved.items() if k not in keep})
    if verbose and changed:
        print(f"architecture from {path}: {changed}", flush=True)


def _weighted_sft(h, w, valid, ids, weights):
    loss = sft_loss(tp_input(h), w, valid, ids, weights.to(h.device, h.dtype))
    return loss, {"loss": loss.detach().clone()}


def _device_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def _controller_fields(out: dict) -> dict:
    fields = {k: out[k] for k in ("beta_a", "beta_b", "policy_mean") if k in out}
    if out.get("completed"):
        fields["reward"] = out.get("rewards", [None])[-1] if out.get("updated") else None
        fields["decisions_completed"] = len(out["completed"])
    if out.get("updated"):
        fields["reward"] = float(out["reward_mean"])
        fields["policy_loss"] = float(out["policy_loss"])
    return fields


def _line_fields(record: dict, times: dict, gbs: int, world: int = 1) -> dict:
    from atesd_mc.flops import mfu

    def rate(stage, key):
        n = record["tokens"].get(key)
        return n / times[stage] if n and times.get(stage) else None

    flops = record.get("flops") or {}
    per_gpu = {k: flops[k] / times[k] / world / 1e12 for k in flops if times.get(k)}
    busy = sum(times.get(k, 0.0) for k in flops)
    util = mfu(sum(flops.values()), busy, _device_name(), world) if flops and busy else None

    step_ms = 1000 * sum(times.values())
    return {"consumed samples": record["step"] * gbs, "elapsed time per iteration (ms)": round(step_ms, 1),
            "learning rate": record["lr"], "global batch size": gbs, "lm loss": record["loss"],
            "alpha": record["alpha"], "mismatch": record.get("mismatch"), "probe nll": record["probe_nll"],
            "reward": record.get("reward"), "grad norm": record["grad_norm"],
            "tokens/s rollout": rate("rollout", "rollout"), "tokens/s teacher": rate("teacher", "teacher"),
            "tokens/s student": rate("student", "student"),
            **{f"TFLOP/s/GPU {k}": v for k, v in per_gpu.items()},
            "MFU": util,
            "number of nan iterations": int(record["skipped_total"])}
