"""Hugging Face Qwen3 <-> megatron-core dist-checkpoint converter.

  torchrun --nproc_per_node=N*M tools/convert_checkpoint.py import-hf --hf-dir HF --save OUT \\
      --tensor-model-parallel-size N --pipeline-model-parallel-size M
  python tools/convert_checkpoint.py export-hf --load OUT_OR_RUN --hf-dir HF2
  python tools/convert_checkpoint.py export-hf --load RUN --hf-dir ADAPTER --adapter-only [--base-model HF]
  python tools/convert_checkpoint.py verify --hf-dir HF --load OUT_OR_RUN [--tolerance 1e-4]

import-hf writes megatron's layout: OUT/iter_0000000 (torch_dist, reshardable: an import at TP=1
loads at any TP/PP) with the model description model_config.json inside (as every training
checkpoint has it: atesd_mc.model_io), OUT/latest_checkpointed_iteration.txt, OUT/model_config.json
(the same description), OUT/hf_config.json (the original config.json) and the tokenizer files.
export-hf reads an import or any training checkpoint: LoRA adapters are merged into the weights
(W + alpha/r * B A), or written alone in the PEFT layout with --adapter-only. verify compares
transformers' logits with the checkpoint's model as trained (adapters on). export-hf and verify
run on one process (world 1); dist_checkpointing reshards whatever layout was saved.
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


def _read_hf_config(hf_dir: str) -> dict:
    from atesd_mc.hf_files import ConversionError

    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{hf_dir}: no config.json (not a HF model directory)") from None
    except (OSError, ValueError) as err:
        raise ConversionError(f"{path}: cannot be read ({err})") from None


def _check_tokenizer_fits(hf_dir: str, vocab_size: int) -> None:
    """The HF directory's tokenizer must not have more ids than the model has embedding rows:
    the extra ids would land on the zero padding rows, and training would go on regardless."""
    from atesd_mc.data.tokenizer import TokenizerError, load_tokenizer
    from atesd_mc.hf_files import ConversionError

    if not any(os.path.isfile(os.path.join(hf_dir, n)) for n in ("tokenizer.json", "vocab.json",
                                                                  "tokenizer.model")):
        return
    try:
        ids = load_tokenizer(hf_dir).vocab_size
    except TokenizerError as err:
        raise ConversionError(f"{hf_dir}: its tokenizer cannot be read ({err})") from None
    if ids > vocab_size:
        raise ConversionError(f"{hf_dir}: the tokenizer has {ids} ids but the model's vocab_size is "
                              f"{vocab_size} (config.json): ids {vocab_size}..{ids - 1} have no "
                              "embedding row")


def check_import(hf_dir: str, tp: int, pp: int, params_dtype: str = "hf"):
    """The ModelConfig import-hf will build, after the checks that need no process group: the
    config is a supported Qwen3, TP/PP split it, the tokenizer fits its vocabulary. main runs it
    before megatron is initialised, so a bad layout is one line instead of megatron's assert."""
    from atesd_mc.convert_config import model_config_from_hf
    from atesd_mc.convert_layout import check_layout

    overrides = {} if params_dtype == "hf" else {"params_dtype": params_dtype}
    cfg = model_config_from_hf(_read_hf_config(hf_dir), source=os.path.join(hf_dir, "config.json"),
                               **overrides)
    check_layout(cfg, tp, pp)
    _check_tokenizer_fits(hf_dir, cfg.vocab_size)
    return cfg


def import_hf(hf_dir: str, save: str, *, allow_pickle: bool = False, params_dtype: str = "hf") -> dict:
    """Every rank of an initialised TP x PP world: build its stage, fill it from the HF checkpoint,
    save a dist checkpoint. params_dtype 'hf' keeps the checkpoint's dtype (fp16 -> fp32)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from atesd_mc.checkpoint import barrier, is_writer, save_sharded
    from atesd_mc.config import ParallelConfig
    from atesd_mc.convert import load_hf_into_stage
    from atesd_mc.convert_layout import check_hf_checkpoint
    from atesd_mc.hf_files import ConversionError, HFCheckpoint
    from atesd_mc.model.qwen3 import build_stage
    from atesd_mc.model_io import describe_model, write_model_description

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    cfg = check_import(hf_dir, tp, pp, params_dtype)
    reader = HFCheckpoint(hf_dir, allow_pickle=allow_pickle)
    check_hf_checkpoint(reader, cfg)
    if dist.get_world_size() != tp * pp:
        raise ConversionError(f"import-hf needs world size = TP x PP = {tp * pp}, got "
                              f"{dist.get_world_size()} processes (no data parallelism)")
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    model = build_stage(cfg, ParallelConfig(tensor_model_parallel_size=tp,
                                            pipeline_model_parallel_size=pp), cfg.vocab_size)
    names = load_hf_into_stage(model, reader.get, cfg, tp, tp_rank, pp, pp_rank, source=hf_dir)
    reader.close()
    os.makedirs(save, exist_ok=True)

    def describe(tmp: str) -> None:  # inside the checkpoint, published with it by the rename
        if is_writer():
            write_model_description(tmp, cfg, cfg.vocab_size)

    save_sharded(model.sharded_state_dict(), os.path.join(save, ITER_DIR), extra=describe)
    copied = []
    if is_writer():
        _write_json(os.path.join(save, MODEL_CONFIG), describe_model(cfg, cfg.vocab_size))
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
    """(dist-checkpoint directory, checkpoint root) for --load: a root with a tracker file (an
    import or a training run), or one checkpoint directory (its parent is the root)."""
    from atesd_mc.hf_files import ConversionError

    tracker = os.path.join(load, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker) as f:
            text = f.read().strip()
        if text != "release" and not text.isdigit():
            raise ConversionError(f"{tracker}: expected an iteration number, found {text[:40]!r}")
        sub = "release" if text == "release" else f"iter_{int(text):07d}"
        ckpt, root = os.path.join(load, sub), load
    elif os.path.isfile(os.path.join(load, "metadata.json")):
        ckpt, root = load, os.path.dirname(os.path.abspath(load))
    else:
        raise ConversionError(f"{load}: no {TRACKER} and no dist checkpoint (metadata.json) there")
    if not os.path.isfile(os.path.join(ckpt, "metadata.json")):
        raise ConversionError(f"{ckpt}: not a dist checkpoint (no metadata.json)")
    return ckpt, root


def load_model(load: str, **overrides):
    """A TP=1, PP=1 model (world 1) as the checkpoint's model description (atesd_mc.model_io)
    says, LoRA adapters included and on, every tensor loaded from the checkpoint.
    Returns (model, cfg, ckpt dir, root)."""
    import torch.distributed as dist

    from atesd_mc.config import ConfigError, ParallelConfig
    from atesd_mc.hf_files import ConversionError
    from atesd_mc.model.lora import add_lora
    from atesd_mc.model.qwen3 import build_stage
    from atesd_mc.model_io import load_weights, model_description

    if dist.get_world_size() != 1:
        raise ConversionError(f"run on one process (world size 1), not {dist.get_world_size()}")
    ckpt, root = resolve_checkpoint(load)
    saved, source = model_description(root, ckpt)
    if not saved.vocab_size:
        raise ConversionError(f"{source}: vocab_size is 0; the description must give the real size")
    try:
        cfg = dataclasses.replace(saved, **overrides)
    except (ConfigError, TypeError) as err:
        raise ConversionError(f"{source}: {err}") from None
    model = build_stage(cfg, ParallelConfig(), cfg.vocab_size)
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, 0)
    load_weights(model, root, ckpt)
    model.eval()
    return model, cfg, ckpt, root


def _side_file_dirs(root: str, ckpt: str) -> list[str]:
    """Where the original config.json (hf_config.json) and the tokenizer files are: the checkpoint
    root (an import), then, for a training run, the checkpoint it started from (its --load) and
    its --tokenizer directory, as its saved run config names them."""
    from atesd_mc.checkpoint import load_torch

    dirs = [root]
    state = os.path.join(ckpt, "trainer_state.pt")
    if os.path.isfile(state):
        config = load_torch(state).get("config") or {}
        dirs += [d for d in ((config.get("checkpoint") or {}).get("load"),
                             (config.get("data") or {}).get("tokenizer")) if d and os.path.isdir(d)]
    return dirs


def _side_files(root: str, ckpt: str, out: str) -> tuple[dict | None, list[str]]:
    """(the original config.json, or None; tokenizer files copied into out) from the first
    directory of _side_file_dirs that has them."""
    dirs = _side_file_dirs(root, ckpt)
    base = None
    for d in dirs:
        if os.path.isfile(os.path.join(d, HF_CONFIG)):
            with open(os.path.join(d, HF_CONFIG)) as f:
                base = json.load(f)
            break
    for d in dirs:
        copied = _copy_tokenizer(d, out)
        if copied:
            return base, copied
    return base, []


# ---------------------------------------------------------------------------------------------
# export-hf


def _stored_dtype(cfg) -> str:
    """'bf16' or 'fp32': what a description's params_dtype ('auto' in old imports) resolves to."""
    from atesd_mc.model.qwen3 import params_dtype

    return {"torch.bfloat16": "bf16"}.get(str(params_dtype(cfg)), "fp32")


def _write_peft(model, cfg, out: str, dtype, base_model: str | None) -> list[str]:
    """adapter_model.safetensors + adapter_config.json: the adapters alone, as peft saves them."""
    from safetensors.torch import save_file

    from atesd_mc.convert import lora_to_peft
    from atesd_mc.convert_config import peft_adapter_config

    config = peft_adapter_config(cfg, base_model)  # refuses a model without adapters
    tensors = {name: t.to(dtype) for name, t in lora_to_peft(model)}
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(out, "adapter_config.json"), config)
    return ["adapter_model.safetensors", "adapter_config.json"]


def export_hf(load: str, hf_dir: str, *, dtype: str = "checkpoint", max_shard_size: str = "5GB",
              overwrite: bool = False, adapter_only: bool = False,
              base_model: str | None = None) -> list[str]:
    """Write a HF Qwen3 directory from an import or any training checkpoint; world 1. LoRA
    adapters are merged into the weights (W + alpha/r * B A, in fp32, then cast), or, with
    adapter_only, written alone in the PEFT layout for the base model `base_model`."""
    import torch

    from atesd_mc.convert import megatron_to_hf, stage_getter
    from atesd_mc.convert_config import hf_config_from_model
    from atesd_mc.hf_files import ConversionError, parse_size, write_safetensors
    from atesd_mc.model.lora import merge_lora

    hf_dir = os.path.abspath(hf_dir)
    if os.path.exists(hf_dir) and os.listdir(hf_dir) and not overwrite:
        raise ConversionError(f"{hf_dir} exists and is not empty (pass --overwrite)")
    model, cfg, ckpt, root = load_model(load, transformer_impl="local")
    out_dtype = _stored_dtype(cfg) if dtype == "checkpoint" else dtype
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[out_dtype]
    cfg = dataclasses.replace(cfg, params_dtype=out_dtype)
    tmp = hf_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    base, tokenizer = _side_files(root, ckpt, tmp)
    if adapter_only:
        files = _write_peft(model, cfg, tmp, torch_dtype, base_model)
        if base_model is None:
            _log("adapter_config.json: base_model_name_or_path is null (pass --base-model to name "
                 "the HF model the adapters apply to)")
    else:
        merged = merge_lora(model)
        get, names = stage_getter(model)
        tensors = ((n, t.to(torch_dtype)) for n, t in megatron_to_hf(get, cfg, names=names, source=load))
        files = write_safetensors(tensors, tmp, parse_size(max_shard_size))
        _write_json(os.path.join(tmp, "config.json"), hf_config_from_model(cfg, base))
        files.append("config.json")
        if merged:
            _log(f"merged {merged} LoRA adapters (rank {cfg.lora_rank}, alpha {cfg.lora_alpha}) "
                 "into the weights")
    files += tokenizer
    if os.path.exists(hf_dir):
        shutil.rmtree(hf_dir)
    os.replace(tmp, hf_dir)
    _log(f"exported {load} -> {hf_dir}: {', '.join(files)}")
    return files


# ---------------------------------------------------------------------------------------------
# verify


def verify(hf_dir: str, load: str, *, batch_size: int = 2, seq_length: int = 32, seed: int = 0,
           allow_pickle: bool = False) -> float:
    """max |logits(transformers) - logits(megatron)| on the same random tokens, both fp32; world 1.
    The megatron side is the checkpoint's model as trained: its LoRA adapters on, not merged."""
    import torch
    from transformers import Qwen3ForCausalLM

    from atesd_mc.convert_config import model_config_from_hf
    from atesd_mc.hf_files import ConversionError, HFCheckpoint
    from atesd_mc.model.qwen3 import full_logits
    from atesd_mc.model_io import model_description

    reader = HFCheckpoint(hf_dir, allow_pickle=allow_pickle)  # refuses pickle weights up front
    hf_cfg = model_config_from_hf(reader.config(), source=os.path.join(hf_dir, "config.json"))
    reader.close()
    model, cfg, ckpt, root = load_model(load, params_dtype="fp32")
    for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "kv_channels", "vocab_size", "rotary_base", "norm_epsilon",
              "untie_embeddings_and_output_weights"):
        if getattr(hf_cfg, f) != getattr(cfg, f):
            raise ConversionError(f"{f} differs: {getattr(hf_cfg, f)!r} in {hf_dir}/config.json, "
                                  f"{getattr(cfg, f)!r} in {model_description(root, ckpt)[1]}")
    hf = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=not reader.pickle)
    device = next(model.parameters()).device
    hf.to(device).eval()
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
                     help="dtype of the written tensors (checkpoint: the dtype it was stored in)")
    exp.add_argument("--max-shard-size", default="5GB")
    exp.add_argument("--overwrite", action="store_true")
    exp.add_argument("--adapter-only", action="store_true",
                     help="write the LoRA adapters alone, in the PEFT layout (adapter_config.json + "
                          "adapter_model.safetensors), instead of the merged model")
    exp.add_argument("--base-model", default=None,
                     help="with --adapter-only: base_model_name_or_path in adapter_config.json (the "
                          "HF model the adapters apply to, e.g. the directory that was imported)")
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
    from atesd_mc.checkpoint import CheckpointError
    from atesd_mc.config import ConfigError
    from atesd_mc.hf_files import ConversionError

    try:
        world = distributed.launch_env(os.environ).world_size  # torchrun, srun or mpirun
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    need = (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
            if args.command == "import-hf" else 1)
    if world != need:
        print(f"error: {args.command} needs {need} process(es) (TP x PP for import-hf, 1 otherwise), "
              f"got WORLD_SIZE={world}; run `torchrun --nproc_per_node={need} "
              f"tools/convert_checkpoint.py ...`" if need > 1 else
              f"error: {args.command} runs on one process, got WORLD_SIZE={world}", file=sys.stderr)
        return 2
    if args.command == "import-hf":
        try:  # before megatron initialises: its asserts on a bad layout are tracebacks
            check_import(args.hf_dir, args.tensor_model_parallel_size,
                         args.pipeline_model_parallel_size, args.params_dtype)
        except (ConversionError, ConfigError) as err:
            if os.environ.get("RANK", "0") == "0":  # every rank finds the same: one line
                print(f"error: {err}", file=sys.stderr, flush=True)
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
                      overwrite=args.overwrite, adapter_only=args.adapter_only,
                      base_model=args.base_model)
        else:
            distributed.initialize()
            diff = verify(args.hf_dir, args.load, batch_size=args.batch_size,
                          seq_length=args.seq_length, seed=args.seed, allow_pickle=args.allow_pickle)
            ok = diff <= args.tolerance
            print(f"max |delta logits| = {diff:.3e} (tolerance {args.tolerance:.1e}): "
                  f"{'OK' if ok else 'FAIL'}", flush=True)
            if not ok:
                return 1
    except (ConversionError, ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
