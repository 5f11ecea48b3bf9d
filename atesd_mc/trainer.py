"""The run: build everything once (build_trainer), then step, log, evaluate and save (Trainer).

    build_trainer: process groups -> problems -> model -> engine -> initial weights (checkpoint,
                   import or warm start) -> LoRA, DDP, optimizer, teacher -> controller -> resume
    Trainer.run:   held-out accuracy before -> steps (atesd_mc/steps.py, atesd_mc/grpo.py), each
                   logged and checkpointed -> held-out accuracy after -> eval.json

Every rank of a data-parallel group sees the same examples and rollouts; TP/PP ranks split the
model."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import torch.distributed as dist

from atesd_mc import distributed, engine, run_lock, run_state, signals, stages
from atesd_mc.config import RunConfig
from atesd_mc.data.sampler import DistributedBatchSampler
from atesd_mc.grpo import grpo_step
from atesd_mc.model.qwen3 import build_stage
from atesd_mc.run_log import MetricsLogger, Timer
from atesd_mc.runtime import Runtime, build_runtime
from atesd_mc.steps import StepStats, TrainData, distill_step, sft_step
from atesd_mc.tasks import ReferenceTokens, load_problems


def build_trainer(cfg: RunConfig) -> "Trainer":
    """Everything a run needs, in dependency order. Trains nothing itself except the warm start,
    which is a separate, cached phase (atesd_mc/warm_start.py) of a fresh run."""
    from atesd_mc import warm_start
    from atesd_mc.model_io import load_weights

    p = cfg.parallel
    # Our message (naming the field) before megatron's, which would come from initialize().
    cfg.validate_world(dist.get_world_size() if dist.is_initialized()
                       else distributed.launch_env(os.environ).world_size)  # torchrun, srun or mpirun
    info = distributed.initialize(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                  cfg.train.seed, p.distributed_backend, p.distributed_timeout_minutes)
    cfg.validate_world(info.world_size)
    # One run per directory, decided before anything reads or writes it: raises RunDirError (in use)
    # or RunFinished (nothing left to do) on every rank alike.
    run_lock.claim(cfg.run_dir, cfg.train.train_iters)
    resume_from, finetune = run_state.resume_path(cfg)
    if finetune:
        _architecture_from_checkpoint(cfg, resume_from, info.rank == 0)
    problems = load_problems(cfg)
    tok = problems.tokenizer
    vocab = cfg.model.vocab_size or tok.vocab_size
    references = ReferenceTokens(tok)
    model = build_stage(cfg.model, p, vocab)
    eng = engine.resolve(cfg.generation.inference_engine, cfg.train.train_engine, model)
    warm_info: dict = {}
    if finetune:  # weights only (e.g. an imported HF model), before any adapter exists
        load_weights(model, resume_from)
        if info.rank == 0:
            print(f"loaded weights from {resume_from} (--finetune)", flush=True)
        resume_from = None
    elif resume_from is None and cfg.train.warm_start_iters:
        # A resumed or fine-tuned run takes every weight (theta_0 included) from its checkpoint.
        path, warm_info = warm_start.train_or_reuse(warm_start.WarmStartInputs(
            cfg=cfg, info=info, engine=eng, vocab=vocab, problems=problems, references=references))
        warm_start.load_into(model, path)
        distributed.model_parallel_seed(cfg.train.seed + 1)
    rt = build_runtime(cfg, info, eng, model, vocab, tok.eos_id)
    exposure = _make_exposure(cfg) if info.rank == 0 else None
    sampler = DistributedBatchSampler(len(problems.train), batch_per_rank=cfg.train.global_batch_size // info.dp,
                                      dp_rank=info.dp_rank, dp_size=info.dp, seed=cfg.train.seed,
                                      exclude=problems.train_exclude)
    data = TrainData(problems=problems, references=references, sampler=sampler)
    resumed = run_state.load(rt, sampler, exposure, resume_from) if resume_from else {}
    changed = schedule_changes(resumed.get("scheduler"), rt.scheduler) if resumed else []
    if changed and info.rank == 0:
        lr = rt.optimizer.param_groups[0]["lr"]
        print(f"learning-rate schedule changed since the checkpoint ({'; '.join(changed)}): the flags' "
              f"schedule applies from iteration {resumed['step']} on (lr now {lr:.6g})", flush=True)
    return Trainer(rt, data, exposure, warm_start_info=warm_info, resumed_state=resumed,
                   resumed_from=resume_from)


# Scheduler settings a resumed run takes from its flags (optim.build_scheduler overrides the
# checkpoint's), with the names the log line uses.
_SCHEDULE_FIELDS = {"max_lr": "learning rate", "min_lr": "minimum learning rate",
                    "lr_warmup_steps": "warmup iterations", "lr_decay_steps": "total number of iterations",
                    "lr_decay_style": "learning rate decay style"}


def schedule_changes(saved: dict | None, scheduler) -> list[str]:
    """What the flags changed in the learning-rate schedule since the checkpoint (`saved` is the
    scheduler's state dict stored in it), e.g. ['total number of iterations 2 -> 4']."""
    now = scheduler.state_dict()
    return [f"{name} {saved[key]} -> {now[key]}" for key, name in _SCHEDULE_FIELDS.items()
            if saved and key in saved and saved[key] != now[key]]


def _make_exposure(cfg: RunConfig):
    from atesd_mc.exposure.schedules import FixedExposure, make_exposure

    if cfg.train.atesd_algorithm == "opsd":
        return FixedExposure(1.0)
    return make_exposure(cfg.exposure, cfg.controller, cfg.train.train_iters, cfg.train.seed)


class Trainer:
    """The training loop over a built Runtime. Holds the loop's own state: the iteration, the
    skipped-step counters, the timer and the logger."""

    def __init__(self, rt: Runtime, data: TrainData, exposure, *, warm_start_info: dict | None = None,
                 resumed_state: dict | None = None, resumed_from: str | None = None):
        self.rt, self.data, self.exposure = rt, data, exposure
        self.cfg, self.info = rt.cfg, rt.info
        self.rank0 = rt.is_rank0
        self.warm_start_info = warm_start_info or {}
        self.resumed_state = resumed_state or {}
        self.step = int(self.resumed_state.get("step", 0))
        self.skipped_total = self.skipped_in_row = 0
        self.timer = Timer()
        log = self.cfg.logging
        self.logger = MetricsLogger(self.cfg.run_dir, self.rank0, self.cfg.train.train_iters,
                                    tensorboard=log.tensorboard, progress_bar=log.progress_bar,
                                    resume=bool(self.resumed_state))
        if self.resumed_state:
            self.logger.print(f"resumed from {resumed_from} at iteration {self.step}")

    @property
    def model(self):
        return self.rt.model

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """One iteration of the configured algorithm; returns its metrics record."""
        fault = self.cfg.train.inject_fault_at
        if fault and fault == f"{self.info.rank}:{self.step + 1}":
            raise RuntimeError(f"injected fault on rank {self.info.rank} at iteration {self.step + 1}")
        algo = self.cfg.train.atesd_algorithm
        if algo == "sft":
            stats = sft_step(self.rt, self.data, self.step, self.timer)
        elif algo == "grpo":
            stats = grpo_step(self.rt, self.data, self.data.problems.tokenizer, self.step, self.timer)
        else:
            stats = distill_step(self.rt, self.data, self.exposure, self.step, self.timer)
        self._count_skip(stats)
        self.step += 1
        return stats.record(self.skipped_total)

    def _count_skip(self, stats: StepStats) -> None:
        """A skipped step changes nothing (weights, optimizer, controller); too many in a row stop
        the run with the last good checkpoint intact."""
        if stats.update.applied:
            self.skipped_in_row = 0
            return
        self.skipped_total += 1
        self.skipped_in_row += 1
        self.logger.print(f"iteration {stats.step}: skipped (loss {stats.loss}, grad norm "
                          f"{stats.update.grad_norm}); number of nan iterations: {self.skipped_total}")
        limit = self.cfg.train.max_skipped_steps
        if self.skipped_in_row >= limit:
            raise RuntimeError(f"{self.skipped_in_row} consecutive iterations had a NaN/Inf loss or gradient "
                               f"(max_skipped_steps={limit}); stopping. The last good checkpoint is the one "
                               f"named in {self.cfg.run_dir}/latest_checkpointed_iteration.txt")

    def evaluate(self, greedy: bool = True) -> dict:
        return stages.held_out_accuracy(self.rt, list(self.data.problems.eval), self.data.problems.tokenizer,
                                        self.step, greedy=greedy)

    def evaluate_all(self, when: str) -> dict:
        """`when` ("before"/"after"): greedy on the test split, Avg@k there (eval_samples > 0), and
        greedy on every further split (validation, prior skill) under `<when>_splits`."""
        out = {when: self.evaluate()}
        if self.cfg.train.eval_samples:
            out[f"{when}_sampled"] = self.evaluate(greedy=False)
        splits = {name: stages.held_out_accuracy(self.rt, held, self.data.problems.tokenizer, self.step)
                  for name, held in self.data.problems.extra_eval.items()}
        if splits:
            out[f"{when}_splits"] = splits
        return out

    def evaluate_before(self) -> dict:
        """The evaluation before training; a run that starts from a cached warm start reuses the one
        another run of the same warm start wrote beside it (same weights, splits and sampling: the
        same numbers), which spares every method of a study the same minutes of decoding."""
        path = _before_eval_path(self.cfg, self.warm_start_info, self.data.problems, self.info)
        cached = None
        if self.rank0 and path and os.path.exists(path):
            with open(path) as f:
                cached = json.load(f)
        cached = distributed.broadcast_object(cached)
        if cached is not None:
            self.logger.print(f"held-out accuracy before: reusing {path}")
            return cached
        results = self.evaluate_all("before")
        if self.rank0 and path:  # runs of one warm start may start together: a temp file of its own each
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(results, f, indent=2)
            os.replace(tmp, path)
        return results

    def save_checkpoint(self, extra_state: dict | None = None) -> str:
        return run_state.save(self.rt, self.data.sampler, self.exposure, self.step, extra_state)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        cfg = self.cfg
        total = cfg.train.train_iters
        results = self.resumed_state.get("eval_before")
        if results is None:
            results = self.evaluate_before()
            self.logger.print(f"held-out accuracy before: {results['before']}")
        if cfg.checkpoint.exit_signal_handler:
            signals.install()
        if self.step == total:  # build_trainer lets this through only when eval.json is missing
            self.logger.print(f"{total} iterations were already trained; running the final held-out "
                              f"evaluation, which the previous launch did not finish")
        start, started = time.perf_counter(), time.monotonic()
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
                path = self.save_checkpoint({"eval_before": results})
                if reason:
                    self.logger.print(f"exiting at iteration {self.step}: {reason}; checkpoint saved to {path}")
                    self.logger.close()
                    return {**results, "exited_early": reason, "step": self.step}
            if cfg.train.eval_interval and record["step"] % cfg.train.eval_interval == 0 and record["step"] < total:
                self.logger.print(f"held-out accuracy at {record['step']}: {self.evaluate()}")
        if not (self.resumed_state and self.resumed_state["step"] == total):
            self.save_checkpoint({"eval_before": {k: v for k, v in results.items() if k.startswith("before")}})
        results.update(self.evaluate_all("after"))
        results["train_seconds"] = time.perf_counter() - start
        results["warm_start"] = self.warm_start_info
        self.logger.print(f"held-out accuracy after: {results['after']}")
        if self.rank0:
            self._write_results(results)
        self.logger.close()
        return results

    def _write_results(self, results: dict) -> None:
        from atesd_mc.plotting import plot

        path = os.path.join(self.cfg.run_dir, "eval.json")
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(path + ".tmp", path)
        self.logger.print(f"wrote {path} and {plot(self.cfg.run_dir, os.path.join(self.cfg.run_dir, 'run.png'))}")


def _before_eval_path(cfg: RunConfig, warm_start_info: dict, problems, info) -> str | None:
    """Beside the warm start, under a hash of what the evaluation depends on; None when the run
    did not start from a warm start (its initial weights are its own)."""
    if not warm_start_info.get("cache"):
        return None
    held = {"test": [ex.problem for ex in problems.eval],
            **{name: [ex.problem for ex in rows] for name, rows in problems.extra_eval.items()}}
    key = json.dumps({"held": held, "generation": dataclasses.asdict(cfg.generation), "seed": cfg.train.seed,
                      "samples": cfg.train.eval_samples, "max_new": cfg.train.eval_max_new_tokens,
                      "layout": [info.tp, info.pp, info.dp]}, sort_keys=True)
    return f"{warm_start_info['cache']}.eval-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


def _architecture_from_checkpoint(cfg: RunConfig, root: str, verbose: bool) -> None:
    """--finetune: the architecture (and the real vocabulary size) comes from the checkpoint's model
    description (atesd_mc.model_io: an import's or a training run's), as Megatron's
    --use-checkpoint-args; adapters, teacher mode and dtype stay as configured."""
    from atesd_mc.model_io import model_description

    saved_cfg, path = model_description(root)
    saved = dataclasses.asdict(saved_cfg)
    keep = {"lora_rank", "lora_alpha", "lora_targets", "teacher_mode", "teacher_ema_decay",
            "params_dtype", "transformer_impl", "seq_length"}
    changed = {k: v for k, v in saved.items() if k not in keep and getattr(cfg.model, k, v) != v}
    cfg.model = dataclasses.replace(cfg.model, **{k: v for k, v in saved.items() if k not in keep})
    if verbose and changed:
        print(f"architecture from {path}: {changed}", flush=True)


def _line_fields(record: dict, times: dict, gbs: int, world: int = 1) -> dict:
    """Megatron's log-line fields plus tokens/s per stage, TFLOP/s per GPU and MFU."""
    from atesd_mc.flops import device_name, mfu

    def rate(stage, key):
        n = record["tokens"].get(key)
        return n / times[stage] if n and times.get(stage) else None

    flops = record.get("flops") or {}
    per_gpu = {k: flops[k] / times[k] / world / 1e12 for k in flops if times.get(k)}
    busy = sum(times.get(k, 0.0) for k in flops)
    util = mfu(sum(flops.values()), busy, device_name(), world) if flops and busy else None
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
