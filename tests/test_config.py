"""Config: YAML + flags, and one clear error per class of mistake, naming the field and value."""
import os
import subprocess
import sys

import pytest

from atesd_mc.config import ConfigError, RunConfig, config_from_dict, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_then_flags_override(tmp_path):
    path = _yaml(tmp_path, "model:\n  hidden_size: 96\ntrain:\n  lr: 0.01\n")
    cfg = parse_config(["--config", path, "--lr", "0.5", "--tensor-model-parallel-size", "2",
                        "--distill-clip", "null", "--no-tensorboard"])
    assert cfg.model.hidden_size == 96 and cfg.train.lr == 0.5
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.loss.distill_clip is None and cfg.logging.tensorboard is False
    assert cfg.name == "c" and cfg.run_dir.endswith("c")


def test_every_field_has_a_kebab_flag():
    from atesd_mc.config import build_arg_parser

    flags = {a for action in build_arg_parser()._actions for a in action.option_strings}
    for megatron_flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                          "--micro-batch-size", "--global-batch-size", "--train-iters", "--lr", "--seed",
                          "--log-interval", "--save", "--load", "--save-interval", "--atesd-exposure",
                          "--reveal-ratio", "--teacher-mode", "--atesd-algorithm"):
        assert megatron_flag in flags


def test_flag_help_comes_from_field_docstrings():
    from atesd_mc.config import build_arg_parser

    text = build_arg_parser().format_help()
    assert "Reveal ratio" in text or "Alpha for fixed exposure" in text


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    path = _yaml(tmp_path, "model:\n  hiden_size: 96\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown key model\.hiden_size"):
        parse_config(["--config", path])


def test_unknown_section_and_flag(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'modle'"):
        parse_config(["--config", _yaml(tmp_path, "modle: {}\n")])
    with pytest.raises(ConfigError, match="unknown flag.*--hiden-size"):
        parse_config(["--hiden-size", "3"])


def test_wrong_type_names_field_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.hidden_size='wide'.*integer"):
        parse_config(["--config", _yaml(tmp_path, "model:\n  hidden_size: wide\n")])
    with pytest.raises(ConfigError, match=r"--lr='fast'.*number"):
        parse_config(["--lr", "fast"])
    with pytest.raises(ConfigError, match=r"--sequence-parallel='maybe'"):
        parse_config(["--sequence-parallel", "maybe"])


def test_out_of_range_value_names_field():
    with pytest.raises(ConfigError, match=r"reveal_ratio=1\.5.*\(from --reveal-ratio\)"):
        parse_config(["--reveal-ratio", "1.5"])
    with pytest.raises(ConfigError, match=r"atesd_exposure='sometimes'"):
        parse_config(["--atesd-exposure", "sometimes"])


def test_impossible_combinations():
    cfg = config_from_dict({"model": {"num_attention_heads": 4, "num_query_groups": 2},
                            "parallel": {"tensor_model_parallel_size": 4}})
    with pytest.raises(ConfigError, match=r"tensor_model_parallel_size=4.*num_query_groups=2"):
        cfg.validate_world(4)
    cfg = config_from_dict({"parallel": {"tensor_model_parallel_size": 2}})
    with pytest.raises(ConfigError, match=r"tensor_model_parallel_size=2.*world size 3"):
        cfg.validate_world(3)
    cfg = config_from_dict({"model": {"num_layers": 3}, "parallel": {"pipeline_model_parallel_size": 2}})
    with pytest.raises(ConfigError, match=r"pipeline_model_parallel_size=2.*num_layers=3"):
        cfg.validate_world(2)
    with pytest.raises(ConfigError, match=r"global_batch_size=10.*micro_batch_size=4"):
        config_from_dict({"train": {"global_batch_size": 10, "micro_batch_size": 4}})
    with pytest.raises(ConfigError, match=r"teacher_mode='lora_off'.*lora_rank"):
        config_from_dict({"model": {"teacher_mode": "lora_off"}})
    with pytest.raises(ConfigError, match=r"sequence_parallel=True"):
        config_from_dict({"parallel": {"sequence_parallel": True}})
    assert RunConfig().validate_world(2) == 2


def test_cli_reports_config_error_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pretrain_atesd.py"),
                          "--num-query-groups", "3"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: invalid config: num_query_groups=3")


def test_yaml_examples_parse():
    import glob

    paths = glob.glob(os.path.join(ROOT, "examples", "*.yaml"))
    assert paths
    for path in paths:
        parse_config(["--config", path])
