"""Hugging Face Qwen3 <-> megatron-core dist-checkpoint converter.

  torchrun --nproc_per_node=N*M tools/convert_checkpoint.py import-hf --hf-dir HF --save OUT \\
      --tensor-model-parallel-size N --pipeline-model-parallel-size M
  python tools/convert_checkpoint.py export-hf --load OUT --hf-dir HF2
  python tools/convert_checkpoint.py verify --hf-dir HF --load OUT [--tolerance 1e-4]

import-hf writes megatron's layout: OUT/iter_0000000 (torch_dist, reshardable: an import at TP=1
loads at any TP/PP), OUT/latest_checkpointed_iteration.txt, OUT/model_config.json (our ModelConfig),
OUT/hf_config.json (the original config.json) and the tokenizer files. export-hf and verify run on
one process (world 1); dist_checkpointing reshards whatever layout was saved.
Only safetensors are read unless --allow-pickle. Exit status: 0 ok, 1 verify above tolerance,
2 refused (the message says why)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

ITER_DIR = "iter_0000000"
TRACKER = "latest_checkpointed_iteration.txt"
MODEL_CONFIG = "model_config.json"
HF_CONFIG = "hf_config.json"


def _log(text: str) -> None:
    from atesd_mc.checkpoint import is_writer

    if is_writer():
        print(text, flush=True)


def _copy_tokenizer(src: str, dst: str) -> list[str]:
    from atesd_mc.hf_files import TOKENIZER_FILES

    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# import-hf


def import_hf(hf_dir: str, save: str, *, allow_pickle: bool = False, params_dtype: str = "hf") -> dict:
    """Every rank of an initialised TP x PP world: build its stage, fill it from the HF checkpoint,
    save a dist checkpoint. params_dtype 'hf' keeps the checkpoint's dtype (fp16 -> fp32)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from atesd_mc.checkpoint import barrier, is_writer, save_sharded
    from atesd_mc.config import ParallelConfig
    from atesd_mc.convert import load_hf_into_stage
    from atesd_mc.convert_config import model_config_from_hf
    from atesd_mc.convert_layout import check_hf_checkpoint
    from atesd_mc.hf_files import ConversionError, HFCheckpoint
    from atesd_mc.model.qwen3 import build_stage

    reader = HFCheckpoint(hf_dir, allow_pickle=allow_pickle)
    overrides = {} if params_dtype == "hf" else {"params_dtype": params_dtype}
    cfg = model_config_from_hf(reader.config(), source=os.path.join(hf_dir, "config.json"), **overrides)
    check_hf_checkpoint(reader, cfg)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    if dist.get_world_size() != tp * pp:
        raise ConversionError(f"import-hf needs world size = TP x PP = {tp * pp}, got "
                              f"{dist.get_world_size()} processes (no data parallelism)")
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    model = build_stage(cfg, ParallelConfig(tensor_model_parallel_size=tp,
                                            pipeline_model_parallel_size=pp), cfg.vocab_size)
    names = load_hf_into_stage(model, reader.get, cfg, tp, tp_rank, pp, pp_rank, source=hf_dir)
    reader.close()
    os.makedirs(save, exist_ok=True)
    save_sharded(model.sharded_state_dict(), os.path.join(save, ITER_DIR))
    copied = []
    if is_writer():
        _write_json(os.path.join(save, MODEL_CONFIG), dataclasses.asdict(cfg))
        shutil.copyfile(os.path.join(hf_dir, "config.json"), os.path.join(save, HF_CONFIG))
        copied = _copy_tokenizer(hf_dir, save)
        with open(os.path.join(save, TRACKER), "w") as f:  # last: marks the checkpoint complete
            f.write("0")
    barrier()
    _log(f"imported {hf_dir} -> {os.path.join(save, ITER_DIR)} (tp {tp}, pp {pp}, {names} names, "
         f"{cfg.params_dtype}); tokenizer files: {', '.join(copied) or 'none'}")
    return {"config": cfg, "names": names, "tokenizer_files": copied}


# ---------------------------------------------------------------------------------------------
# Loading a converted checkpoint (export-hf, verify)


def resolve_checkpoint(load: str) -> tuple[str, str]:
    """(dist-checkpoint directory, directory holding model_config.json) for --load."""
    from atesd_mc.hf_files import ConversionError

    tracker = os.path.join(load, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker) as f:
            text = f.read().strip()
        sub = "release" if text == "release" else f"iter_{int(text):07d}"
        ckpt, root = os.path.join(load, sub), load
    elif os.path.isfile(os.path.join(load, "metadata.json")):
        ckpt, root = load, os.path.dirname(os.path.abspath(load))
        root = load if os.path.isfile(os.path.join(load, MODEL_CONFIG)) else root
    else:
        raise ConversionError(f"{load}: no {TRACKER} and no dist checkpoint (metadata.json) there")
    if not os.path.isfile(os.path.join(ckpt, "metadata.json")):
        raise ConversionError(f"{ckpt}: not a dist checkpoint (no metadata.json)")
    if not os.path.isfile(os.path.join(root, MODEL_CONFIG)):
        raise ConversionError(f"{root}: no {MODEL_CONFIG} (written by import-hf) describing the model")
    return ckpt, root


def load_model(load: str, **overrides):
    """A TP=1, PP=1 model (world 1) with the checkpoint loaded; returns (model, cfg, root)."""
    import torch.distributed as dist

    from atesd_mc.checkpoint import load_sharded
    from atesd_mc.config import ConfigError, ModelConfig, ParallelConfig
    from atesd_mc.hf_files import ConversionError
    from atesd_mc.model.qwen3 import build_stage

    if dist.get_world_size() != 1:
        raise ConversionError(f"run on one process (world size 1), not {dist.get_world_size()}")
    ckpt, root = resolve_checkpoint(load)
    with open(os.path.join(root, MODEL_CONFIG)) as f:
        saved = json.load(f)
    try:
        cfg = ModelConfig(**{**saved, "lora_rank": 0, "teacher_mode": "auto", **overrides})
    except (ConfigError, TypeError) as err:
        raise ConversionError(f"{os.path.join(root, MODEL_CONFIG)}: {err}") from None
    model = build_stage(cfg, ParallelConfig(), cfg.vocab_size)
    try:
        state = load_sharded(model.sharded_state_dict(), ckpt)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # torch DCP's CheckpointException is a BaseException
        lines = [x for x in str(err).splitlines() if x.strip()]
        raise ConversionError(f"cannot load {ckpt} into the model {os.path.join(root, MODEL_CONFIG)} "
                              f"describes: {lines[-1].strip() if lines else type(err).__name__}") from err
    model.load_state_dict(state, strict=False)
    return model, cfg, root


# ---------------------------------------------------------------------------------------------
# export-hf


def export_hf(load: str, hf_dir: str, *, dtype: str = "checkpoint", max_shard_size: str = "5GB",
              overwrite: bool = False) -> list[str]:
    """Write a HF Qwen3 directory from a converted (or trained) checkpoint; world 1."""
    from atesd_mc.convert import megatron_to_hf, stage_getter
    from atesd_mc.convert_config import hf_config_from_model
    from atesd_mc.hf_files import ConversionError, parse_size, write_safetensors

    hf_dir = os.path.abspath(hf_dir)
    if os.path.exists(hf_dir) and os.listdir(hf_dir) and not overwrite:
        raise ConversionError(f"{hf_dir} exists and is not empty (pass --overwrite)")
    overrides = {"transformer_impl": "local"}
    if dtype != "checkpoint":
        overrides["params_dtype"] = dtype
    model, cfg, root = load_model(load, **overrides)
    if cfg.params_dtype == "auto":  # record what build_model resolved
        from atesd_mc.model.qwen3 import params_dtype

        cfg = dataclasses.replace(cfg, params_dtype={"torch.bfloat16": "bf16"}.get(
            str(params_dtype(cfg)), "fp32"))
    get, names = stage_getter(model)
    tmp = hf_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files = write_safetensors(megatron_to_hf(get, cfg, names=names, source=load), tmp,
                              parse_size(max_shard_size))
    base = None
    if os.path.isfile(os.path.join(root, HF_CONFIG)):
        with open(os.path.join(root, HF_CONFIG)) as f:
            base = json.load(f)
    _write_json(os.path.join(tmp, "config.json"), hf_config_from_model(cfg, base))
    files += ["config.json"] + _copy_tokenizer(root, tmp)
    if os.path.exists(hf_dir):
        shutil.rmtree(hf_dir)
    os.replace(tmp, hf_dir)
    _log(f"exported {load} -> {hf_dir}: {', '.join(files)}")
    return files


# ---------------------------------------------------------------------------------------------
# verify


def verify(hf_dir: str, load: str, *, batch_size: int = 2, seq_length: int = 32, seed: int = 0,
           allow_pickle: bool = False) -> float:
    """max |logits(transformers) - logits(megatron)| on the same random tokens, both fp32; world 1."""
    import torch
    from transformers import Qwen3ForCausalLM

    from atesd_mc.convert_config import model_config_from_hf
    from atesd_mc.hf_files import ConversionError, HFCheckpoint
    from atesd_mc.model.qwen3 import full_logits

    reader = HFCheckpoint(hf_dir, allow_pickle=allow_pickle)  # refuses pickle weights up front
    hf_cfg = model_config_from_hf(reader.config(), source=os.path.join(hf_dir, "config.json"))
    reader.close()
    model, cfg, _ = load_model(load, params_dtype="fp32")
    for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "kv_channels", "vocab_size", "rotary_base", "norm_epsilon",
              "untie_embeddings_and_output_weights"):
        if getattr(hf_cfg, f) != getattr(cfg, f):
            raise ConversionError(f"{f} differs: {getattr(hf_cfg, f)!r} in {hf_dir}/config.json, "
                                  f"{getattr(cfg, f)!r} in {load}/{MODEL_CONFIG}")
    hf = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=not reader.pickle)
    device = next(model.parameters()).device
    hf.to(device).eval()
    model.eval()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, min(seq_length, cfg.seq_length)),
                           generator=g).to(device)
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits.float()
        ours = full_logits(model, tokens).float()
    return (ref - ours).abs().max().item()


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="HF Qwen3 directory -> megatron dist checkpoint")
    imp.add_argument("--hf-dir", required=True)
    imp.add_argument("--save", required=True)
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1)
    imp.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    imp.add_argument("--params-dtype", choices=("hf", "fp32", "bf16"), default="hf",
                     help="dtype stored in the dist checkpoint (hf: as in config.json)")
    imp.add_argument("--allow-pickle", action="store_true",
                     help="also read pytorch_model*.bin pickle weights (only from trusted sources)")
    exp = sub.add_parser("export-hf", help="megatron dist checkpoint -> HF Qwen3 directory")
    exp.add_argument("--load", required=True)
    exp.add_argument("--hf-dir", required=True)
    exp.add_argument("--dtype", choices=("checkpoint", "fp32", "bf16"), default="checkpoint",
                     help="dtype of the written tensors (checkpoint: model_config.json's params_dtype)")
    exp.add_argument("--max-shard-size", default="5GB")
    exp.add_argument("--overwrite", action="store_true")
    ver = sub.add_parser("verify", help="compare transformers and megatron logits")
    ver.add_argument("--hf-dir", required=True)
    ver.add_argument("--load", required=True)
    ver.add_argument("--tolerance", type=float, default=1e-4)
    ver.add_argument("--batch-size", type=int, default=2)
    ver.add_argument("--seq-length", type=int, default=32)
    ver.add_argument("--seed", type=int, default=0)
    ver.add_argument("--allow-pickle", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from atesd_mc import distributed
    from atesd_mc.config import ConfigError
    from atesd_mc.hf_files import ConversionError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    need = (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
            if args.command == "import-hf" else 1)
    if world != need:
        print(f"error: {args.command} needs {need} process(es) (TP x PP for import-hf, 1 otherwise), "
              f"got WORLD_SIZE={world}; run `torchrun --nproc_per_node={need} "
              f"tools/convert_checkpoint.py ...`" if need > 1 else
              f"error: {args.command} runs on one process, got WORLD_SIZE={world}", file=sys.stderr)
        return 2
    try:
        if args.command == "import-hf":
            distributed.initialize(tp=args.tensor_model_parallel_size,
                                   pp=args.pipeline_model_parallel_size)
            import_hf(args.hf_dir, args.save, allow_pickle=args.allow_pickle,
                      params_dtype=args.params_dtype)
        elif args.command == "export-hf":
            distributed.initialize()
            export_hf(args.load, args.hf_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
                      overwrite=args.overwrite)
        else:
            distributed.initialize()
            diff = verify(args.hf_dir, args.load, batch_size=args.batch_size,
                          seq_length=args.seq_length, seed=args.seed, allow_pickle=args.allow_pickle)
            ok = diff <= args.tolerance
            print(f"max |delta logits| = {diff:.3e} (tolerance {args.tolerance:.1e}): "
                  f"{'OK' if ok else 'FAIL'}", flush=True)
            if not ok:
                return 1
    except (ConversionError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
