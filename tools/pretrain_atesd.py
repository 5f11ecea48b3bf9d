"""torchrun entry point: `torchrun --nproc_per_node=N tools/pretrain_atesd.py --config X.yaml [--flags]`.

Runs ATESD (or a baseline: --atesd-algorithm opsd|sft|grpo, --atesd-exposure fixed|random) with
megatron-core; NCCL on GPUs, gloo on CPU. Writes metrics.jsonl and eval.json into --save."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    launcher = os.getppid()  # first thing: torchrun, while it is surely still alive
    from atesd_mc import signals

    signals.watch_launcher(launcher)  # torchrun workers only: end with their launcher
    from atesd_mc.config import ConfigError
    from atesd_mc.config_io import parse_config

    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import warnings

    # megatron-core warns about absent TE/apex once per module; one line of ours says it instead.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from atesd_mc import distributed
    from atesd_mc.checkpoint import CheckpointError
    from atesd_mc.data.store import StoreError
    from atesd_mc.data.tokenizer import TokenizerError
    from atesd_mc.run_lock import RunDirError, RunFinished
    from atesd_mc.trainer import build_trainer

    try:
        trainer = build_trainer(cfg)
    except (RunDirError, RunFinished) as e:  # raised on every rank alike; rank 0 says it, once
        import torch.distributed as dist

        finished = isinstance(e, RunFinished)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(e if finished else f"error: {e}", file=sys.stdout if finished else sys.stderr, flush=True)
        distributed.shutdown()
        return 0 if finished else 2
    except (ConfigError, CheckpointError, StoreError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if trainer.rank0:
        from atesd_mc.model.spec import resolve_impl

        info = trainer.info
        print(f"atesd-mc: {cfg.name} | world {info.world_size} (tp {info.tp}, pp {info.pp}, dp {info.dp}) | "
              f"backend {distributed.backend_for(cfg.parallel.distributed_backend)} | layer spec "
              f"{resolve_impl(cfg.model.transformer_impl)} | run dir {cfg.run_dir}", flush=True)
        print(trainer.rt.engine.describe(), flush=True)
    try:
        trainer.run()
    except Exception as e:
        # One clear line naming the rank; torchrun then stops the other ranks.
        print(f"error on rank {trainer.info.rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
