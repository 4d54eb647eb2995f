import json
import subprocess
import sys

from envs.registry import EnvConfig
from launch.evaluate import evaluate


def test_evaluation_scores_every_task_once_and_repeats_exactly(tiny_model_path):
    env = EnvConfig(name="token_match", args={"words": 16, "target": "w3"})
    first = evaluate(tiny_model_path, env, samples=10, temperature=0.0, max_new_tokens=4, batch=4)
    again = evaluate(tiny_model_path, env, samples=10, temperature=0.0, max_new_tokens=4, batch=4)
    assert first["samples"] == 10 and 0.0 <= first["reward/mean"] <= 1.0
    # the same held-out tasks, greedy: the same replies (sampled ones depend on how the
    # engine happened to batch the pending requests)
    assert first["reward/mean"] == again["reward/mean"]


def test_evaluate_command_prints_one_json_line_per_model(tiny_model_path):
    out = subprocess.run([sys.executable, "-m", "launch.evaluate", tiny_model_path, "--env", "token_match",
                          "--samples", "4", "--greedy"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["model"] == tiny_model_path and result["samples"] == 4
