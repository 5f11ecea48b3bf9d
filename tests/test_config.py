"""Config: YAML + flags, and one clear error per class of mistake, naming the field and value."""
import dataclasses
import os
import subprocess
import sys

import pytest

from atesd_mc.config import ConfigError, RunConfig
from atesd_mc.config_io import build_arg_parser, config_from_dict, load_yaml, parse_config

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
    flags = {a for action in build_arg_parser()._actions for a in action.option_strings}
    for megatron_flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                          "--micro-batch-size", "--global-batch-size", "--train-iters", "--lr", "--seed",
                          "--log-interval", "--save", "--load", "--save-interval", "--atesd-exposure",
                          "--reveal-ratio", "--teacher-mode", "--atesd-algorithm"):
        assert megatron_flag in flags


def test_flag_help_comes_from_field_docstrings():
    text = build_arg_parser().format_help()
    assert "Reveal ratio" in text or "Alpha for fixed exposure" in text



def test_help_lists_every_flag_once_without_double_negatives():
    """--help's option list names each flag of the parser exactly once (a boolean's --no-X on its
    --X entry), the usage line repeats none but --config, and no flag negates a negation: a field
    named no_load_optim is --no-load-optim (a bare switch, or with true/false), never --no-no-."""
    import re
    from collections import Counter

    parser = build_arg_parser()
    usage, _, body = parser.format_help().partition("\n\n")
    entries = Counter()
    for line in body.splitlines():
        if re.match(r"  -", line):  # an entry's invocation, then its help after 2+ spaces
            invocation = re.split(r"\s{2,}", line.strip())[0]
            entries.update(re.findall(r"(?<![\w-])--?[a-z][\w-]*", invocation))
    option_strings = [o for a in parser._actions for o in a.option_strings]
    assert [f for f, n in entries.items() if n > 1] == []
    assert sorted(entries) == sorted(option_strings)  # every flag listed, the hidden --no-X included
    assert re.findall(r"--[a-z][\w-]*", usage) == ["--config"]
    assert not [o for o in option_strings if o.startswith("--no-no-")]
    assert "--no-tensorboard" in entries and "--no-load-optim" in entries and "--no-load-rng" in entries
    assert not parse_config([]).checkpoint.no_load_optim
    assert parse_config(["--no-load-optim"]).checkpoint.no_load_optim
    assert not parse_config(["--no-load-rng", "false"]).checkpoint.no_load_rng
    assert parse_config(["--no-tensorboard"]).logging.tensorboard is False
    assert parse_config(["--tensorboard", "false", "--progress-bar"]).logging.tensorboard is False

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



def test_cli_refuses_a_tokenizer_larger_than_the_model_in_one_line(tmp_path):
    """The synthetic task's tokenizer (a few hundred ids) on a 200-id model: one error line naming
    the tokenizer and both sizes, exit 2, and no training (no metrics written)."""
    import re

    from atesd_mc.data.tokenizer import load_tokenizer

    run = tmp_path / "run"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pretrain_atesd.py"),
                          "--vocab-size", "200", "--synthetic-train-size", "200", "--synthetic-eval-size", "4",
                          "--probe-size", "4", "--save", str(run), "--cache-dir", str(tmp_path / "cache"),
                          "--no-tensorboard"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    m = re.match(r"error: tokenizer (\S+) has (\d+) ids but the model's vocabulary is 200 \(", last)
    assert m, out.stderr[-2000:]
    assert int(m.group(2)) == load_tokenizer(m.group(1)).vocab_size > 200
    assert "Traceback" not in out.stderr and not (run / "metrics.jsonl").exists()

def test_yaml_examples_parse():
    import glob

    paths = glob.glob(os.path.join(ROOT, "examples", "*.yaml"))
    assert paths
    for path in paths:
        parse_config(["--config", path])


# ---------------------------------------------------------------------------------------------
# `base:` - a YAML config extending another, field by field.
# ---------------------------------------------------------------------------------------------
def _files(tmp_path, **texts):
    """Write name.yaml files (sub/x.yaml allowed); returns {name: path}."""
    paths = {}
    for name, text in texts.items():
        p = tmp_path / f"{name.replace('__', '/')}.yaml"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        paths[name] = str(p)
    return paths


BASE = "name: base_run\nmodel:\n  hidden_size: 96\n  num_layers: 3\ntrain:\n  lr: 0.01\n  train_iters: 7\n"


def test_base_extends_and_child_overrides_per_field(tmp_path):
    p = _files(tmp_path, base=BASE,
               child="base: base.yaml\nmodel:\n  num_layers: 5\nloss:\n  distill_temperature: 2.0\n")
    cfg = parse_config(["--config", p["child"]])
    assert cfg.model.num_layers == 5 and cfg.model.hidden_size == 96  # the base's other model field stays
    assert cfg.train.lr == 0.01 and cfg.train.train_iters == 7  # a section the child does not name
    assert cfg.loss.distill_temperature == 2.0  # a section only the child names
    assert cfg.name == "child"  # the name is the file's own, never the base's (its run directory)
    assert parse_config(["--config", p["child"], "--num-layers", "6"]).model.num_layers == 6  # flags still win
    defaults = RunConfig()
    assert cfg.model.ffn_hidden_size == defaults.model.ffn_hidden_size  # named by neither: the default
    assert load_yaml(p["child"]) == {"model": {"hidden_size": 96, "num_layers": 5},
                                     "train": {"lr": 0.01, "train_iters": 7}, "loss": {"distill_temperature": 2.0}}


def test_base_chain_resolves_relative_to_each_file(tmp_path):
    p = _files(tmp_path, base=BASE, sub__mid="base: ../base.yaml\nname: mid\ntrain:\n  lr: 0.02\n",
               top="base: sub/mid.yaml\ntrain:\n  train_iters: 9\n")
    cfg = parse_config(["--config", p["top"]])
    assert (cfg.model.hidden_size, cfg.model.num_layers) == (96, 3)  # from base, two levels down
    assert (cfg.train.lr, cfg.train.train_iters) == (0.02, 9)  # mid overrides base, top overrides both
    assert cfg.name == "top"


def test_base_cycle_is_one_error_naming_the_files(tmp_path):
    p = _files(tmp_path, a="base: b.yaml\n", b="base: c.yaml\n", c="base: a.yaml\n", self="base: self.yaml\n")
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", p["a"]])
    msg = str(e.value)
    assert "\n" not in msg and "cycle" in msg
    assert msg.index("a.yaml") < msg.index("b.yaml") < msg.index("c.yaml") < msg.rindex("a.yaml")
    with pytest.raises(ConfigError, match=r"cycle: .*self\.yaml -> .*self\.yaml$"):
        parse_config(["--config", p["self"]])


def test_missing_base_names_file_and_field(tmp_path):
    p = _files(tmp_path, child="base: nowhere.yaml\n", mid="base: child.yaml\n")
    with pytest.raises(ConfigError, match=r"child\.yaml: invalid config: base='nowhere\.yaml'.*not found"):
        parse_config(["--config", p["child"]])
    with pytest.raises(ConfigError, match=r"child\.yaml: invalid config: base='nowhere\.yaml'"):
        parse_config(["--config", p["mid"]])  # the error is the file that names the missing base
    with pytest.raises(ConfigError, match=r"base=3: expected a YAML file name"):
        parse_config(["--config", _files(tmp_path, bad="base: 3\n")["bad"]])


def test_base_errors_name_the_file_that_set_the_value(tmp_path):
    p = _files(tmp_path, base="model:\n  hidden_size: wide\n", child="base: base.yaml\ntrain:\n  lr: 0.1\n",
               rng="exposure:\n  reveal_ratio: 1.5\n", child2="base: rng.yaml\n", typo="modle: {}\n",
               child3="base: typo.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: model\.hidden_size='wide'"):
        parse_config(["--config", p["child"]])
    with pytest.raises(ConfigError, match=r"rng\.yaml: invalid config: reveal_ratio=1\.5"):
        parse_config(["--config", p["child2"]])
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown section 'modle'"):
        parse_config(["--config", p["child3"]])


def test_study_config_is_the_tiny_default_plus_its_overrides():
    """The study's test bed differs from the embedded default only where its yaml says so."""
    tiny = parse_config(["--config", os.path.join(ROOT, "examples", "tiny_arith.yaml")])
    study = parse_config(["--config", os.path.join(ROOT, "examples", "study_arith.yaml")])
    diff = {(section.name, f.name) for section in dataclasses.fields(tiny)
            if dataclasses.is_dataclass(getattr(tiny, section.name))
            for f in dataclasses.fields(getattr(tiny, section.name))
            if getattr(getattr(tiny, section.name), f.name) != getattr(getattr(study, section.name), f.name)}
    assert study.name == "study_arith"
    assert diff == {("data", "synthetic_eval_size"), ("data", "synthetic_val_size"), ("data", "synthetic_prior_size"),
                    ("train", "warm_start_iters"), ("train", "train_iters"), ("train", "eval_samples"),
                    ("train", "lr"), ("train", "min_lr"), ("controller", "hold_steps")}