"""trainer.publish_lag = k: the actors get version v - k when the learner makes v, so every
group the learner trains on is exactly k versions old (the off-policy study's variable)."""
import json
import time

import pytest
import torch

from common.config import ConfigError
from common.metrics import read_metrics
from common.weights import LocalWeightChannel
from learner.learner import Learner, TrainerConfig
from launch.config import build_config
from learner.loss import LossConfig
from tests.conftest import make_group
from tests.test_end_to_end import launch


def test_a_lagged_learner_sends_each_version_k_publications_late(tiny_model_path, buffer_server):
    channel = LocalWeightChannel()
    one = Learner(0, tiny_model_path, "float32", TrainerConfig(batch_groups=1, lr=1e-2, publish_lag=2, max_steps=5),
                  LossConfig(), buffer_server().address, 5.0, channel)
    made = {}
    for v in range(1, 6):
        one.train_on([make_group(seed=v)], [0])
        one.publish()
        made[v] = {n: p.detach().clone() for n, p in one.model.named_parameters()}
        sent = channel.poll(0)
        if v <= 2:
            assert sent is None   # the actors keep the initial weights
        else:
            version, tensors = sent
            assert version == v - 2 and all(torch.equal(tensors[n], made[v - 2][n]) for n in made[v])
        assert one.buffer.info()["learner_version"] == v   # staleness counts from the learner's version
    assert one.publish_unlagged() == 5
    version, tensors = channel.poll(0)
    assert version == 5 and all(torch.equal(tensors[n], made[5][n]) for n in made[5])
    one.close()


def test_with_a_lag_of_two_every_group_trained_on_is_exactly_two_versions_old(tmp_path, capsys):
    result = launch("async_grpo", tmp_path, "trainer.max_steps=6", "trainer.publish_lag=2", "actors.count=1",
                    "buffer.table.max_staleness=2", "eval.every=3", "eval.tasks=8")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = read_metrics(tmp_path)
    # step s samples at learner version s - 1; the actors hold max(0, s - 3)
    assert [(m["staleness/mean"], m["staleness/max"]) for m in steps] == [(0, 0), (1, 1)] + [(2, 2)] * 4
    assert [m["weights/published"] for m in steps] == [0, 0, 1, 2, 3, 4]
    evals = read_metrics(tmp_path, "eval")
    # held-out scores: the initial weights, the lagged ones mid-run, the learner's own at the end
    assert [(m["weights/version"], m["eval/version_last"]) for m in evals] == [(0, 0), (1, 1), (6, 6)]
    # the study's scoring of such a run (bench/staleness_study.py): the final held-out score is
    # the learner's own weights', staleness as above, the stability signals from the steps
    from bench.staleness_study import score, summarise
    scores = score(tmp_path, wall_s=1.0)
    assert scores["held_out"] == evals[-1]["eval/reward"] and scores["held_out_start"] == evals[0]["eval/reward"]
    assert scores["staleness_mean"] == (0 + 1 + 2 * 4) / 6 and scores["steps"] == 6
    assert scores["loss/kl_behaviour"] == pytest.approx(sum(m["loss/kl_behaviour"] for m in steps) / 6)
    assert scores["reward/flat_groups"] == pytest.approx(sum(m["reward/flat_groups"] for m in steps) / 6)
    gaps = sorted(b["time_s"] - a["time_s"] for a, b in zip(steps, steps[1:]))   # throughput, for --free-running
    assert scores["step_s"] == pytest.approx(gaps[2]) and scores["actor_tokens_per_s"] > 0
    row = summarise([scores | {"lag": 2, "correction": "truncate", "lr": None, "seed": 0}])[0]
    assert row["held_out"] == row["held_out_min"] == row["held_out_max"] == scores["held_out"]
    assert row["flat_groups"] == scores["reward/flat_groups"]
    # a grid continued past its budget: the finished cell is read back, the other is not started
    from bench.staleness_study import main as study
    cells = tmp_path / "study"
    cells.mkdir()
    (cells / "lag2-truncate-seed0").symlink_to(tmp_path)
    (tmp_path / "study.done").write_text('{"wall_s": 1.0}')
    out = study(["--runs-dir", str(cells), "--lags", "2", "4", "--corrections", "truncate", "--seeds", "0",
                 "--parallel", "2", "--budget-s", "0"])
    assert out["skipped"] == ["lag4-truncate-seed0"] and out["errors"] == []
    assert [r["held_out"] for r in out["runs"]] == [scores["held_out"]] and not (cells / "lag4-truncate-seed0").exists()
    # ... and in another session, from that grid's --out file alone (no run folders): its finished
    # cell is taken as it was, the rest goes on; the new file holds both, so it chains
    first = tmp_path / "grid.json"
    study(["--runs-dir", str(cells), "--lags", "2", "4", "--corrections", "truncate", "--seeds", "0",
           "--budget-s", "0", "--out", str(first)])
    elsewhere = tmp_path / "elsewhere"
    t = time.monotonic()   # cells past the budget do not wait out the gap between starts
    out = study(["--runs-dir", str(elsewhere), "--lags", "2", "4", "8", "--corrections", "truncate", "--seeds", "0",
                 "--budget-s", "0", "--resume-from", str(first), "--stagger-s", "600"])
    assert time.monotonic() - t < 60
    assert out["skipped"] == ["lag4-truncate-seed0", "lag8-truncate-seed0"]
    assert [r["cell"] for r in out["runs"]] == ["lag2-truncate-seed0"]
    assert out["runs"][0] == json.loads(first.read_text())["runs"][0] and not elsewhere.exists()
    # the config's own lr ('config') and another, in one grid: the first is that grid's cell again
    out = study(["--runs-dir", str(elsewhere), "--lags", "2", "--corrections", "truncate", "--seeds", "0",
                 "--lrs", "config", "1e-4", "--budget-s", "0", "--resume-from", str(first)])
    assert [r["cell"] for r in out["runs"]] == ["lag2-truncate-seed0"] and out["skipped"] == ["lag2-truncate-lr0.0001-seed0"]
    with pytest.raises(SystemExit, match="another setting"):   # a grid of more steps is not this one
        study(["--runs-dir", str(elsewhere), "--lags", "2", "--corrections", "truncate", "--seeds", "0",
               "--steps", "40", "--resume-from", str(first)])
    # a cell finished under another setting (here four mini-batches for all) is not read back as this grid's
    other = {"config": "tiny", "actors": 0, "steps": 30, "eval_tasks": 32, "overrides": ["trainer.minibatches=4"]}
    (tmp_path / "study.done").write_text(json.dumps({"wall_s": 1.0, "setting": other}))
    with pytest.raises(SystemExit):
        study(["--runs-dir", str(cells), "--lags", "2", "--corrections", "truncate", "--seeds", "0"])
    assert "1 finished cell(s) under --runs-dir" in capsys.readouterr().err


@pytest.mark.parametrize("recipe, overrides, key, words", [
    ("async_grpo", ["trainer.publish_lag=9"], "buffer.table.max_staleness", "must be >= trainer.publish_lag=9"),
    ("async_grpo", ["trainer.publish_lag=2", "run.resume=true"], "trainer.publish_lag", "cannot resume"),
    ("async_grpo", ["trainer.publish_lag=-1"], "trainer.publish_lag", "must be >= 0"),
])
def test_a_lag_that_cannot_work_fails_at_start_naming_its_key(recipe, overrides, key, words):
    with pytest.raises(ConfigError, match=words) as info:
        build_config(recipe, "tiny", overrides)
    assert info.value.key == key


def test_a_synchronous_run_refuses_a_lag_before_it_starts_anything():
    from launch import sync_grpo

    config = build_config("sync_grpo", "tiny", ["trainer.publish_lag=1", "buffer.table.max_staleness=1"])
    with pytest.raises(ConfigError, match="asynchronous") as info:
        sync_grpo.main(config)   # raises before Ray, the buffer or any part starts
    assert info.value.key == "trainer.publish_lag"


def test_staggered_cells_start_at_least_the_gap_apart_from_any_thread():
    import concurrent.futures
    import time
    from bench.staleness_study import Stagger

    stagger, starts = Stagger(0.05), []
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda _: (stagger.wait(), starts.append(time.monotonic())), range(3)))
    starts.sort()
    assert all(b - a >= 0.049 for a, b in zip(starts, starts[1:]))
