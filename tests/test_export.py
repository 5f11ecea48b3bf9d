"""export-hf reads any checkpoint the trainer writes (issue 17): a tiny random HF Qwen3 is imported,
fine-tuned with LoRA for a few steps, exported merged and as PEFT adapters, and loaded back with
transformers and peft: their logits are the trained model's (adapters on). A run without LoRA
exports with nothing copied by hand. Plus the import-time refusals (tokenizer larger than the
vocabulary, TP that does not split the heads) and the weights-only --load message."""
import contextlib
import dataclasses
import importlib.util
import io
import json
import os

import pytest
import torch

from harness import run_distributed
from test_trainer import TINY, _cfg

from atesd_mc.checkpoint import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("convert_checkpoint",
                                               os.path.join(ROOT, "tools", "convert_checkpoint.py"))
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

VOCAB = 512  # the synthetic task's sentencepiece vocabulary: the run's tokenizer fits the model
HF_ARGS = dict(vocab_size=VOCAB, hidden_size=TINY["hidden_size"], intermediate_size=TINY["ffn_hidden_size"],
               num_hidden_layers=TINY["num_layers"], num_attention_heads=TINY["num_attention_heads"],
               num_key_value_heads=TINY["num_query_groups"], head_dim=TINY["kv_channels"],
               max_position_embeddings=TINY["seq_length"], tie_word_embeddings=True)
# ids below the synthetic tokenizer's 345, so the run without an import can read them too
TOKENS = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(5))
TOL = 1e-4
LORA = dict(lora_rank=4, lora_alpha=16.0)


def _hf_model(path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(11)
    model = Qwen3ForCausalLM(Qwen3Config(**HF_ARGS))
    with torch.no_grad():  # every tensor distinct (norms too), logits of order 1-10
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(0, 1.0 if "embed" in name else 0.1)
    model.save_pretrained(path)


def _hf_logits(path, adapters=None):
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapters:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapters)
    with torch.no_grad():
        return model.eval()(input_ids=TOKENS).logits


# ---------------------------------------------------------------------------------------------
# rank functions (module level: forked ranks)


def _import(hf_dir, save):
    cli.import_hf(hf_dir, save)


def _train(cfg, steps):
    """`steps` training steps, a checkpoint, then the trained model's logits (adapters on, as
    trained) and its base model's (adapters off), and the largest |B| of its adapters."""
    from atesd_mc.model.lora import lora_disabled, lora_of
    from atesd_mc.model.qwen3 import full_logits, unwrap
    from atesd_mc.trainer import build_trainer

    trainer = build_trainer(cfg)
    for _ in range(steps):
        trainer.train_step()
    trainer.save_checkpoint()
    model = unwrap(trainer.model).eval()
    with torch.no_grad():
        trained = full_logits(model, TOKENS)
        with lora_disabled(model):
            base = full_logits(model, TOKENS)
    lora = lora_of(model)
    moved = max(ad.B.abs().max().item() for ad in lora.adapters.values()) if lora else 0.0
    return trained, base, moved


def _finetune_logits(cfg):
    """--finetune from a LoRA run into fresh adapters (B = 0): the model it starts from."""
    from atesd_mc.model.qwen3 import full_logits, unwrap
    from atesd_mc.trainer import build_trainer

    model = unwrap(build_trainer(cfg).model).eval()
    with torch.no_grad():
        return full_logits(model, TOKENS)


def _export(load, out, **kw):
    return cli.export_hf(load, out, **kw)


def _verify(hf_dir, load):
    return cli.verify(hf_dir, load, seq_length=16)


# ---------------------------------------------------------------------------------------------


def _lora_cfg(tmp, imported):
    cfg = _cfg(tmp, atesd_algorithm="sft", lr=3e-2, warm_start_iters=0)
    cfg.model = dataclasses.replace(cfg.model, **LORA)
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, load=imported, finetune=True)
    return cfg


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    hf_dir, imported = str(tmp / "hf"), str(tmp / "imported")
    _hf_model(hf_dir)
    run_distributed(_import, world=1, args=(hf_dir, imported))
    cfg = _lora_cfg(tmp, imported)
    trained, base, moved = run_distributed(_train, world=1, args=(cfg, 3))[0]
    return tmp, hf_dir, cfg, trained, base, moved


def test_lora_run_exports_merged_and_as_peft_adapters(lora_run):
    tmp, hf_dir, cfg, trained, base, moved = lora_run
    run = cfg.run_dir
    assert moved > 1e-3  # the B matrices left zero: the adapters change the model
    original = _hf_logits(hf_dir)
    assert (base - original).abs().max().item() <= TOL  # adapters off = the imported model
    assert (trained - original).abs().max().item() > 100 * TOL  # the run changed the model
    desc = json.load(open(os.path.join(run, "iter_0000003", "model_config.json")))
    assert (desc["vocab_size"], desc["lora_rank"], desc["lora_alpha"], desc["params_dtype"]) == \
        (VOCAB, 4, 16.0, "fp32")

    merged = str(tmp / "merged")
    files = run_distributed(_export, world=1, args=(run, merged))[0]
    assert "model.safetensors" in files and "config.json" in files
    assert (_hf_logits(merged) - trained).abs().max().item() <= TOL

    adapters = str(tmp / "adapters")
    files = run_distributed(_export_adapters, world=1, args=(run, adapters, hf_dir))[0]
    assert files[:2] == ["adapter_model.safetensors", "adapter_config.json"]
    config = json.load(open(os.path.join(adapters, "adapter_config.json")))
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == \
        ("LORA", 4, 16.0, hf_dir)
    assert (_hf_logits(hf_dir, adapters) - trained).abs().max().item() <= TOL

    # verify compares with the model as trained: the merged export passes, the base model fails
    assert run_distributed(_verify, world=1, args=(merged, run))[0] <= TOL
    assert run_distributed(_verify, world=1, args=(hf_dir, run))[0] > 100 * TOL


def _export_adapters(load, out, base):
    return cli.export_hf(load, out, adapter_only=True, base_model=base)


def test_finetune_from_a_lora_run_starts_from_its_merged_weights(lora_run, tmp_path):
    _, _, cfg, trained, _, _ = lora_run
    again = _lora_cfg(tmp_path, cfg.run_dir)
    again.data = cfg.data  # the same synthetic task cache
    logits = run_distributed(_finetune_logits, world=1, args=(again,))[0]
    assert (logits - trained).abs().max().item() <= TOL


def test_run_without_lora_exports_with_nothing_copied_by_hand(lora_run, tmp_path):
    cfg = _cfg(tmp_path, atesd_algorithm="sft", warm_start_iters=0)
    cfg.data = lora_run[2].data
    trained, _, _ = run_distributed(_train, world=1, args=(cfg, 1))[0]
    out = str(tmp_path / "hf")
    run_distributed(_export, world=1, args=(cfg.run_dir, out))
    assert not os.path.exists(os.path.join(cfg.run_dir, "model_config.json"))  # only inside iter_*
    assert (_hf_logits(out) - trained).abs().max().item() <= TOL
    adapters = run_distributed(_export_error, world=1, args=(cfg.run_dir, str(tmp_path / "a")))[0]
    assert "no LoRA adapters" in adapters


def _export_error(load, out):
    from atesd_mc.hf_files import ConversionError

    try:
        cli.export_hf(load, out, adapter_only=True)
    except ConversionError as err:
        return str(err)
    return "no error"


# ---------------------------------------------------------------------------------------------
# refusals


def _main(argv, monkeypatch, world=1):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, err.getvalue()


def test_import_refuses_a_larger_tokenizer_and_a_tp_that_does_not_split_heads(tmp_path, monkeypatch):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    hf_dir = tmp_path / "hf"
    _hf_model(str(hf_dir))
    words = ["<|im_end|>", "<unk>"] + [f"w{i}" for i in range(VOCAB + 38)]
    Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")).save(
        str(hf_dir / "tokenizer.json"))
    code, err = _main(["import-hf", "--hf-dir", str(hf_dir), "--save", str(tmp_path / "x")], monkeypatch)
    assert code == 2 and err.count("\n") == 1, err
    assert f"the tokenizer has {VOCAB + 40} ids but the model's vocab_size is {VOCAB}" in err
    assert not os.path.exists(tmp_path / "x")

    os.remove(hf_dir / "tokenizer.json")
    code, err = _main(["import-hf", "--hf-dir", str(hf_dir), "--save", str(tmp_path / "x"),
                       "--tensor-model-parallel-size", "3"], monkeypatch, world=3)
    assert code == 2 and err == "error: num_query_groups=2 is not divisible by " \
                                "tensor_model_parallel_size=3\n", err


def test_loading_an_import_without_finetune_suggests_finetune(lora_run):
    from atesd_mc import run_state

    tmp, _, cfg, *_ = lora_run
    imported = str(tmp / "imported")
    plain = _cfg(tmp / "other")
    plain.checkpoint = dataclasses.replace(plain.checkpoint, load=imported)
    with pytest.raises(CheckpointError) as err:
        run_state.resume_path(plain)
    assert str(err.value) == f"{imported} is a weights-only checkpoint (written by import-hf): add " \
                             "--finetune to start a run from it"
