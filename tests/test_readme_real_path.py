"""README "Real models and data", run as written: a tiny random Hugging Face Qwen3 made by
tools/make_tiny_qwen3.py -> import-hf (TP 2) -> GSM8K and AIME24 stores -> a LoRA ATESD run ->
evaluate.py on GSM8K and AIME24 -> export-hf merged, verify, export-hf --adapter-only -> loaded
by transformers and peft. The commands are read from README.md, so the two cannot drift apart."""
import json
import math
import os
import re
import subprocess

import pytest

from test_data_fixtures import DATA, GSM8K_TRAIN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands() -> str:
    """The bash block of the README's "Real models and data" section."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## Real models and data"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def _workspace(tmp_path) -> str:
    """A repository root (the code linked in) with shared/data beside it, as on the dev machine."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("tools", "examples", "atesd_mc", "kernels"):
        os.symlink(os.path.join(ROOT, name), repo / name)
    os.symlink(os.path.dirname(os.path.abspath(DATA)), tmp_path / "shared")
    return str(repo)


@pytest.mark.skipif(not os.path.exists(GSM8K_TRAIN), reason="shared data not present")
def test_readme_real_model_section_runs_as_written(tmp_path):
    repo = _workspace(tmp_path)
    script = tmp_path / "readme.sh"
    script.write_text("set -euo pipefail\n" + readme_commands())
    out = subprocess.run(["bash", str(script)], cwd=repo, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    log = out.stdout[-3000:] + out.stderr[-4000:]
    assert out.returncode == 0, log
    assert "(--finetune)" in out.stdout, log
    assert re.search(r"max \|delta logits\| = \S+ \(tolerance \S+\): OK", out.stdout), log
    assert "loaded with transformers and peft" in out.stdout, log

    run = os.path.join(repo, "runs", "qwen3_cpu_demo")
    recs = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] >= 0 for r in recs)  # a finite, non-negative KL
    assert not any(r["skipped"] for r in recs) and all(r["grad_norm"] > 0 for r in recs)
    results = os.listdir(os.path.join(run, "eval"))
    assert len(results) == 1 and results[0].startswith("results-"), results
    peft_files = set(os.listdir(os.path.join(repo, "out", "qwen3-atesd-lora")))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= peft_files
