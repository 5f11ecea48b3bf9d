"""bf16 on CPU: a bf16 model holds bf16 weights only (megatron's local-spec torch norms used to stay
fp32, so attention met fp32 queries beside bf16 values and refused them), trains on both engines
with and without LoRA, and the lean path's bf16 logits match megatron's."""
import math

import torch

from harness import run_distributed
from test_lean_model import ODD, _rows
from test_model_parallel import VOCAB, _build

TINY = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
        "num_query_groups": 2, "kv_channels": 16, "seq_length": 96, "params_dtype": "bf16"}
# (train_engine, inference_engine, lora_rank): both forward engines, both decode engines, LoRA.
COMBOS = [(te, ie, r) for te in ("lean", "megatron") for ie in ("auto", "megatron") for r in (0, 4)]
# bf16 keeps 8 significant bits: one rounding moves a value by up to 2^-8 of its size, and a
# forward rounds many times, at values larger than the logits. Megatron's own bf16 error against
# the fp32 forward of the same weights is the yardstick: the lean path may not be more than twice
# as far from fp32, and megatron's error itself is bf16-sized (above fp32's, far below a wrong
# rotary table, norm or dtype mix, which move logits by O(their size)).
LEAN_VS_MEGATRON = 2.0
BF16_CEILING, FP32_FLOOR = 2.0 ** -4, 2.0 ** -12


def _cfg(tmp, te, ie, rank):
    from atesd_mc.config_io import config_from_dict

    return config_from_dict({
        "model": {**TINY, "lora_rank": rank},
        "data": {"synthetic_train_size": 200, "synthetic_eval_size": 4, "probe_size": 4,
                 "cache_dir": str(tmp / "cache")},
        "generation": {"max_new_tokens": 12, "inference_engine": ie},
        "train": {"train_iters": 2, "micro_batch_size": 2, "global_batch_size": 4, "lr": 1e-2,
                  "seed": 3, "train_engine": te, "warm_start_iters": 2},
        "checkpoint": {"save": str(tmp / f"run-{te}-{ie}-{rank}")},
        "logging": {"tensorboard": False, "progress_bar": False}}, name="bf16")


def _train_every_combo(tmp):
    """Two ATESD steps (after a 2-step warm start) per combination, in one rank process."""
    from atesd_mc.trainer import build_trainer

    out = {}
    for te, ie, rank in COMBOS:
        trainer = build_trainer(_cfg(tmp, te, ie, rank))
        rt = trainer.rt
        dtypes = {p.dtype for m in (rt.model, rt.teacher.module) for p in m.parameters()}
        trainable = [p for p in rt.model.parameters() if p.requires_grad]
        before = [p.detach().float().clone() for p in trainable]
        records = [trainer.train_step() for _ in range(2)]
        moved = max((p.detach().float() - b).abs().max().item() for p, b in zip(trainable, before))
        out[(te, ie, rank)] = {"engine": (rt.engine.forward, rt.engine.decode), "dtypes": dtypes,
                               "records": [{k: r[k] for k in ("loss", "probe_nll", "grad_norm", "skipped")}
                                           for r in records], "moved": moved}
    return out


def test_bf16_trains_on_every_engine_with_and_without_lora(tmp_path):
    out = run_distributed(_train_every_combo, world=1, args=(tmp_path,), timeout=300)[0]
    for (te, ie, rank), got in out.items():
        where = (te, ie, rank)
        assert got["engine"] == (te, "lean" if ie == "auto" else "megatron"), where
        assert got["dtypes"] == {torch.bfloat16}, where  # student (adapters too) and teacher
        for r in got["records"]:
            assert not r["skipped"], (where, r)
            assert all(math.isfinite(r[k]) for k in ("loss", "probe_nll", "grad_norm")), (where, r)
            assert r["loss"] > 0 and r["grad_norm"] > 0, (where, r)
        assert got["moved"] > 0, where  # the optimizer updated the bf16 weights


def _bf16_and_fp32_models():
    """A bf16 LoRA model with non-trivial norm and adapter weights, and an fp32 model holding
    exactly the same values (bf16 -> fp32 is exact): megatron's fp32 forward is the reference."""
    from atesd_mc.model.lora import add_lora
    from test_lora import _fill_b

    models = {}
    for dtype in ("bf16", "fp32"):
        model = _build(params_dtype=dtype, untie_embeddings_and_output_weights=True, **ODD)
        add_lora(model, rank=4, alpha=8.0, targets=["q", "k", "v", "o", "gate", "up", "down"], seed=7)
        models[dtype] = model
    low = models["bf16"]
    _fill_b(low)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in low.named_parameters():
            if name.endswith("layernorm.weight"):  # norms at 1 would hide a norm dtype mix
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    models["fp32"].load_state_dict(low.state_dict())
    return low, models["fp32"]


def _logit_errors():
    from atesd_mc.batching import build_side
    from atesd_mc.model.lean import LeanDecoder, packed_selected
    from atesd_mc.model.qwen3 import forward_hidden, full_logits, output_weight
    from atesd_mc.schedule import selected_hidden

    low, ref_model = _bf16_and_fp32_models()
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    rows = _rows()
    g = torch.Generator().manual_seed(2)
    lengths = (23, 6, 17)
    prompts = [torch.randint(1, VOCAB, (n - n // 2,), generator=g).tolist() for n in lengths]
    side, _ = build_side(prompts, [torch.randint(1, VOCAB, (n // 2,), generator=g).tolist()
                                   for n in lengths], "cpu")

    def selected_logits(model, lean):
        h = (packed_selected(model, side.tokens, side.lengths, side.predict_index) if lean
             else selected_hidden(model, forward_hidden(model, side.tokens), side))
        return (h @ output_weight(model).t())[:, :VOCAB].double()

    with torch.no_grad():
        ref = full_logits(ref_model, rows).double()
        mega = full_logits(low, rows).double()
        dec = LeanDecoder(low, rows.shape[0], rows.shape[1])  # prefill 9, then one token at a time
        steps = [dec.forward(rows[:, :9], 0)] + [dec.forward(rows[:, p:p + 1], p) for p in range(9, rows.shape[1])]
        decode = torch.stack(steps, 1)[..., :VOCAB].double()
        packed_ref = selected_logits(ref_model, lean=False)
        packed_mega, packed_lean = selected_logits(low, lean=False), selected_logits(low, lean=True)
    err = lambda a, b: (a - b).abs().max().item()  # noqa: E731
    return {"scale": ref.abs().max().item(), "packed_scale": packed_ref.abs().max().item(),
            "mega": err(mega, ref), "decode": err(decode, ref[:, 8:]), "decode_vs_mega": err(decode, mega[:, 8:]),
            "packed_mega": err(packed_mega, packed_ref), "packed_lean": err(packed_lean, packed_ref),
            "packed_lean_vs_mega": err(packed_lean, packed_mega)}


def test_lean_bf16_logits_match_megatron_bf16():
    """KV-cached decode and the packed training pass of the lean path, and megatron's layers, all
    in bf16 with LoRA: each within bf16 rounding of the fp32 forward of the same weights, and of
    each other."""
    e = run_distributed(_logit_errors, world=1)[0]
    assert e["scale"] > 0.5 and e["packed_scale"] > 0.5, e  # logits large enough to compare
    for mega, lean, scale in (("mega", "decode", "scale"), ("packed_mega", "packed_lean", "packed_scale")):
        assert FP32_FLOOR * e[scale] < e[mega] <= BF16_CEILING * e[scale], (mega, e)
        assert e[lean] <= LEAN_VS_MEGATRON * e[mega], (lean, e)
    assert e["decode_vs_mega"] <= BF16_CEILING * e["scale"], e
    assert e["packed_lean_vs_mega"] <= BF16_CEILING * e["packed_scale"], e
