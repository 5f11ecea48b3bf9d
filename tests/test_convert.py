"""HF Qwen3 <-> megatron converter (issue 5): logits parity at TP=1/TP=2/PP=2, bit-exact round
trip, refusals. Tiny random Qwen3 models: GQA (4 heads, 2 kv heads), head_dim 24 != 64/4, vocab
500 (padded to 512), tied and untied embeddings."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from harness import run_distributed

from atesd_mc.convert import hf_to_megatron_shard, megatron_to_hf
from atesd_mc.convert_config import model_config_from_hf
from atesd_mc.convert_layout import check_hf_checkpoint
from atesd_mc.hf_files import ConversionError, HFCheckpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("convert_checkpoint",
                                               os.path.join(ROOT, "tools", "convert_checkpoint.py"))
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

VOCAB = 500
HF_ARGS = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6,
               max_position_embeddings=64)


def _make_hf(path, tied: bool, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**HF_ARGS, tie_word_embeddings=tied,
                                         rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
    with torch.no_grad():  # every tensor distinct (norms too), logits of order 1-10
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 1.0 if "embed" in name else 0.1)
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return tokens, model.eval()(input_ids=tokens).logits


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    out = {}
    for tied in (True, False):
        path = tmp_path_factory.mktemp("tied" if tied else "untied")
        out[tied] = (str(path), *_make_hf(path, tied, seed=7 if tied else 8))
    return out


def _tensors(directory):
    reader = HFCheckpoint(directory)
    try:
        return {n: reader.get(n) for n in reader.keys()}
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------------
# rank functions (module level: forked ranks)


def _logits(model, tokens):
    """full_logits on the last stage, through the pipeline schedule when PP > 1; None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from atesd_mc.model.qwen3 import forward_hidden, full_logits

    model.eval()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        with torch.no_grad():
            return full_logits(model, tokens)
    out = []

    def step(_, m):
        last = ps.is_pipeline_last_stage()

        def finish(logits):
            out.append(logits.detach().clone())
            return logits.sum() * 0, {}
        return (full_logits(m, tokens) if last else forward_hidden(m, tokens)), finish

    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([0]), model=[model],
                                num_microbatches=1, seq_length=tokens.shape[1],
                                micro_batch_size=tokens.shape[0], forward_only=True)
    return out[0] if out else None


def _stage_logits(save, tokens):
    """Build this rank's stage from SAVE/model_config.json, load the checkpoint, logits."""
    from megatron.core import parallel_state as ps

    from atesd_mc.checkpoint import load_sharded
    from atesd_mc.config import ModelConfig, ParallelConfig
    from atesd_mc.model.qwen3 import build_stage

    with open(os.path.join(save, "model_config.json")) as f:
        cfg = ModelConfig(**json.load(f))
    model = build_stage(cfg, ParallelConfig(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size()), cfg.vocab_size)
    model.load_state_dict(load_sharded(model.sharded_state_dict(), os.path.join(save, "iter_0000000")),
                          strict=False)
    return _logits(model, tokens)


def _import_then_logits(hf_dir, save, tokens):
    cli.import_hf(hf_dir, save)
    return _stage_logits(save, tokens)


def _export(load, hf_dir, max_shard_size):
    return cli.export_hf(load, hf_dir, max_shard_size=max_shard_size)


def _verify(hf_dir, load):
    return cli.verify(hf_dir, load, seq_length=16)


def _last(results):
    got = [r for r in results if r is not None]
    assert len(got) == 1
    return got[0]


# ---------------------------------------------------------------------------------------------
# config


def test_model_config_from_hf_v4_v5_and_refusals(hf_models):
    with open(os.path.join(hf_models[True][0], "config.json")) as f:
        v5 = json.load(f)
    cfg = model_config_from_hf(v5)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads,
            cfg.num_query_groups, cfg.kv_channels, cfg.vocab_size) == (2, 64, 96, 4, 2, 24, 500)
    assert cfg.rotary_base == 5e5 and cfg.norm_epsilon == 1e-6 and cfg.params_dtype == "fp32"
    assert not cfg.untie_embeddings_and_output_weights
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types", "dtype")}
    v4.update(rope_theta=5e5, rope_scaling=None, torch_dtype="bfloat16", tie_word_embeddings=False)
    cfg4 = model_config_from_hf(v4)
    assert cfg4.rotary_base == 5e5 and cfg4.params_dtype == "bf16"
    assert cfg4.untie_embeddings_and_output_weights
    bad = [({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "architectures"),
           ({"model_type": "qwen2"}, "model_type"),
           ({"attention_bias": True}, "attention_bias"),
           ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_type"),
           ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
           ({"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
           ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
           ({"hidden_size": None}, "hidden_size")]
    for change, field in bad:
        with pytest.raises(ConversionError, match=field) as err:
            model_config_from_hf({**v5, **change})
        assert "config.json" in str(err.value)


# ---------------------------------------------------------------------------------------------
# pure mapping


@pytest.mark.parametrize("names", ["local", "te"])
def test_mapping_round_trip_every_layout(hf_models, names):
    """HF -> shards of every (TP, PP) rank -> HF is the identity; shard names/shapes as megatron's."""
    for tied in (True, False):
        hf_dir = hf_models[tied][0]
        src = _tensors(hf_dir)
        cfg = model_config_from_hf(HFCheckpoint(hf_dir).config())
        for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2)):
            shards = {(r, s): hf_to_megatron_shard(src.__getitem__, cfg, tp, r, pp, s, names=names)
                      for r in range(tp) for s in range(pp)}
            emb = shards[(0, 0)]["embedding.word_embeddings.weight"]
            assert emb.shape == (512 // tp, 64)
            if tp == 1:
                assert torch.equal(emb[:VOCAB], src["model.embed_tokens.weight"])
                assert not emb[VOCAB:].any()  # zero padding rows
            fused = "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"
            assert (fused in shards[(0, 0)]) == (names == "te")
            assert ("output_layer.weight" in shards[(0, pp - 1)]) == (not tied or pp > 1)
            back = dict(megatron_to_hf(lambda n, r, s: shards[(r, s)][n], cfg, tp, pp, names=names))
            assert set(back) == set(src) - ({"lm_head.weight"} if tied else set())
            for n, t in back.items():
                assert torch.equal(t, src[n]), (tied, tp, pp, n)


def test_qkv_layout_is_interleaved_per_query_group(hf_models):
    src = _tensors(hf_models[False][0])
    cfg = model_config_from_hf(HFCheckpoint(hf_models[False][0]).config())
    qkv = hf_to_megatron_shard(src.__getitem__, cfg, 2, 1)["decoder.layers.0.self_attention.linear_qkv.weight"]
    q, k, v = (src[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv")
    # TP rank 1 holds query group 1: its two q heads (rows 48:96), then k and v of group 1.
    assert torch.equal(qkv, torch.cat([q[48:96], k[24:48], v[24:48]]))
    fc1 = hf_to_megatron_shard(src.__getitem__, cfg, 2, 1)["decoder.layers.0.mlp.linear_fc1.weight"]
    gate, up = (src[f"model.layers.0.mlp.{x}_proj.weight"] for x in ("gate", "up"))
    assert torch.equal(fc1, torch.cat([gate[48:], up[48:]]))


# ---------------------------------------------------------------------------------------------
# import -> logits parity, export -> bit-exact round trip


@pytest.mark.parametrize("tied", [True, False])
def test_import_logits_match_transformers_and_export_round_trips(hf_models, tmp_path, tied):
    hf_dir, tokens, ref = hf_models[tied]
    tp1, tp2, pp2 = (str(tmp_path / x) for x in ("tp1", "tp2", "pp2"))
    out = run_distributed(_import_then_logits, world=1, args=(hf_dir, tp1, tokens))[0]
    assert (out - ref).abs().max().item() <= 1e-4
    for save, kw in ((tp2, dict(tp=2)), (pp2, dict(pp=2))):
        res = run_distributed(_import_then_logits, world=2, args=(hf_dir, save, tokens), **kw)
        if "tp" in kw:  # every TP rank holds the gathered logits
            assert torch.equal(res[0], res[1])
            res = res[:1]
        assert (_last(res) - ref).abs().max().item() <= 1e-4
    # The TP=1 import reshards on load (PP=2 here; TP=2 is the torchrun test's reverse direction).
    res = run_distributed(_stage_logits, world=2, pp=2, args=(tp1, tokens))
    assert (_last(res) - ref).abs().max().item() <= 1e-4
    assert sorted(os.listdir(tp1)) == sorted(["iter_0000000", "latest_checkpointed_iteration.txt",
                                              "model_config.json", "hf_config.json",
                                              "generation_config.json", "tokenizer_config.json"])
    assert open(os.path.join(tp1, "latest_checkpointed_iteration.txt")).read() == "0"

    # Export from the PP=2 import at TP=1/PP=1 (untied: sharded files with an index).
    back = str(tmp_path / "hf_back")
    files = run_distributed(_export, world=1, args=(pp2, back, "1GB" if tied else "60KB"))[0]
    assert ("model.safetensors.index.json" in files) == (not tied)
    assert not os.path.exists(back + ".tmp")
    src, got = _tensors(hf_dir), _tensors(back)
    assert set(got) == set(src)
    for name, t in src.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert open(os.path.join(back, name)).read() == open(os.path.join(hf_dir, name)).read()
    from transformers import Qwen3ForCausalLM

    again = Qwen3ForCausalLM.from_pretrained(back).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=tokens).logits, ref)
    assert run_distributed(_verify, world=1, args=(hf_dir, tp2))[0] <= 1e-4


# ---------------------------------------------------------------------------------------------
# refusals


def _copy_hf(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_refuses_shape_mismatch_missing_tensor_missing_shard_and_pickle(hf_models, tmp_path):
    from safetensors.torch import save_file

    src_dir = hf_models[False][0]
    tensors = _tensors(src_dir)

    # config says intermediate_size 128, weights have 96
    bad = _copy_hf(src_dir, tmp_path / "shape")
    conf = json.load(open(os.path.join(bad, "config.json")))
    json.dump({**conf, "intermediate_size": 128}, open(os.path.join(bad, "config.json"), "w"))
    reader = HFCheckpoint(bad)
    with pytest.raises(ConversionError, match=r"model.layers.0.mlp.gate_proj.weight has shape "
                                              r"\(96, 64\) but config.json implies \(128, 64\)"):
        check_hf_checkpoint(reader, model_config_from_hf(reader.config()))
    cfg = model_config_from_hf(conf)
    with pytest.raises(ConversionError, match=r"gate_proj.weight has shape \(96, 64\) but the config "
                                              r"implies \(128, 64\)"):
        hf_to_megatron_shard(tensors.__getitem__, model_config_from_hf({**conf, "intermediate_size": 128}))

    # a tensor is missing
    miss = _copy_hf(src_dir, tmp_path / "missing")
    save_file({n: t for n, t in tensors.items() if n != "model.layers.1.mlp.up_proj.weight"},
              os.path.join(miss, "model.safetensors"), metadata={"format": "pt"})
    reader = HFCheckpoint(miss)
    with pytest.raises(ConversionError, match="missing: model.layers.1.mlp.up_proj.weight"):
        check_hf_checkpoint(reader, cfg)
    with pytest.raises(ConversionError, match="tensor model.layers.1.mlp.up_proj.weight is missing"):
        hf_to_megatron_shard(reader.get, cfg)
    with pytest.raises(ConversionError, match="pipeline stage 0 is missing"):
        list(megatron_to_hf(lambda n, r, s: {}[n], cfg))

    # an index lists a shard file that is not there
    sharded = str(tmp_path / "sharded")
    from atesd_mc.hf_files import write_safetensors

    os.makedirs(sharded)
    shutil.copy(os.path.join(src_dir, "config.json"), sharded)
    files = write_safetensors(iter(tensors.items()), sharded, max_shard_bytes=60_000)
    assert HFCheckpoint(sharded).get("model.norm.weight").shape == (64,)
    os.remove(os.path.join(sharded, files[0]))
    with pytest.raises(ConversionError, match="shard file.*missing: " + files[0]):
        HFCheckpoint(sharded)

    # pickle weights: refused unless allowed
    pick = str(tmp_path / "pickle")
    os.makedirs(pick)
    shutil.copy(os.path.join(src_dir, "config.json"), pick)
    torch.save(tensors, os.path.join(pick, "pytorch_model.bin"))
    with pytest.raises(ConversionError, match="--allow-pickle"):
        HFCheckpoint(pick)
    allowed = HFCheckpoint(pick, allow_pickle=True)
    a = hf_to_megatron_shard(allowed.get, cfg, 2, 1)
    b = hf_to_megatron_shard(tensors.__getitem__, cfg, 2, 1)
    assert all(torch.equal(a[n], b[n]) for n in b)


# ---------------------------------------------------------------------------------------------
# the CLI through torchrun (once), and its refusals


def test_cli_torchrun_import_tp2_then_verify_and_refusals(hf_models, tmp_path):
    hf_dir = hf_models[True][0]
    save = str(tmp_path / "ckpt")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    tool = os.path.join(ROOT, "tools", "convert_checkpoint.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", tool,
           "import-hf", "--hf-dir", hf_dir, "--save", save, "--tensor-model-parallel-size", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "imported" in out.stdout and "(tp 2, pp 1, local names" in out.stdout
    # verify (world 1) reshards the TP=2 checkpoint onto TP=1
    assert run_distributed(_verify, world=1, args=(hf_dir, save))[0] <= 1e-4
    # refusals through main(): unknown architecture, pickle weights
    arch = _copy_hf(hf_dir, tmp_path / "llama")
    conf = json.load(open(os.path.join(arch, "config.json")))
    json.dump({**conf, "architectures": ["LlamaForCausalLM"], "model_type": "llama"},
              open(os.path.join(arch, "config.json"), "w"))
    pick = str(tmp_path / "pickle")
    os.makedirs(pick)
    shutil.copy(os.path.join(hf_dir, "config.json"), pick)
    torch.save(_tensors(hf_dir), os.path.join(pick, "pytorch_model.bin"))
    codes = run_distributed(_main_codes, world=1, args=(arch, pick, str(tmp_path / "x")))[0]
    assert codes == [2, 2]


def _main_codes(arch, pick, save):
    import contextlib
    import io

    codes = []
    for hf_dir, want in ((arch, "architectures=['LlamaForCausalLM'] is not supported"),
                         (pick, "--allow-pickle")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            codes.append(cli.main(["import-hf", "--hf-dir", hf_dir, "--save", save]))
        assert want in err.getvalue(), err.getvalue()
    return codes
