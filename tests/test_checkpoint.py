"""Checkpoints resume exactly: a learner stopped at step k and restored, fed the same batches,
computes bit-identical losses to one never stopped; on one rank and on two (FSDP2, gloo)."""

from dataclasses import replace

import torch
import torch.multiprocessing as mp

from common.weights import LocalWeightChannel
from learner import checkpoint, logprob_head
from learner.learner import Learner, TrainerConfig
from learner.loss import LossConfig
from common.rendezvous import RendezvousHost
from tests.conftest import end_rank, make_group

STEPS, STOP = 4, 2
FIGURES = ("loss/policy", "learner/grad_norm", "loss/clip_frac", "learner/lr")


def batch(step: int, rank: int = 0, ranks: int = 1) -> list:
    groups = [make_group(group_size=4, length=6 + 2 * i, seed=10 * step + i, rewards=[i % 2, 1, 0, step / 4])
              for i in range(4)]
    return groups[rank * 4 // ranks:(rank + 1) * 4 // ranks]


def make_learner(model_path, rank=0, ranks=1, rendezvous=None, buffer_address="tcp://127.0.0.1:9") -> Learner:
    config = TrainerConfig(cpu_workers=ranks, batch_groups=4, micro_batch_rows=3, minibatches=2, lr=1e-2,
                           lr_schedule="cosine", warmup_steps=2, max_steps=STEPS, dist_timeout_s=700)
    return Learner(rank, model_path, "float32", config, LossConfig(kl_coef=0.01), buffer_address, 5.0,
                   LocalWeightChannel(), rendezvous)


def figures(learner, steps, rank=0, ranks=1) -> list:
    out = []
    for s in steps:
        metrics = learner.train_on(batch(s, rank, ranks), [0] * (4 // ranks))
        out.append([metrics[k] for k in FIGURES])
    return out


def test_resume_one_rank_gives_bit_identical_losses(tiny_model_path, tmp_path, buffer_server):
    address = buffer_server().address
    unbroken = figures(make_learner(tiny_model_path, buffer_address=address), range(STEPS))
    first = make_learner(tiny_model_path, buffer_address=address)
    before = figures(first, range(STOP))
    first.publish()
    path = first.checkpoint(str(tmp_path / "checkpoints"))
    resumed = make_learner(tiny_model_path, buffer_address=address)
    assert resumed.restore(path) == {"step": STOP, "version": 2}  # resuming publishes what it resumed with
    after = figures(resumed, range(STOP, STEPS))
    assert before + after == unbroken  # exactly: floats compared with ==
    assert checkpoint.latest(tmp_path / "checkpoints").name == f"step-{STOP}"


def test_resume_keeps_only_the_newest_checkpoints_and_ignores_partial_ones(tiny_model_path, tmp_path):
    one = make_learner(tiny_model_path)
    folder = tmp_path / "checkpoints"
    for s in range(3):
        one.train_on(batch(s), [0] * 4)
        one.checkpoint(str(folder))
    (folder / "step-9.partial").mkdir()  # a save that was killed half-way
    assert [p.name for p in checkpoint.checkpoints(folder)] == ["step-2", "step-3"]


def _rank(rank, model_path, rendezvous, buffer_address, folder, results):
    unbroken = make_learner(model_path, rank, 2, rendezvous, buffer_address)
    expected = figures(unbroken, range(STEPS), rank, 2)
    unbroken.close()
    first = make_learner(model_path, rank, 2, replace(rendezvous, prefix="first"), buffer_address)
    got = figures(first, range(STOP), rank, 2)
    path = first.checkpoint(folder)
    first.close()
    resumed = make_learner(model_path, rank, 2, replace(rendezvous, prefix="resumed"), buffer_address)
    resumed.restore(path)
    got += figures(resumed, range(STOP, STEPS), rank, 2)
    resumed.close()
    if rank == 0:
        results.put((got, expected))
    end_rank()


def test_resume_two_ranks_gives_bit_identical_losses(tiny_model_path, tmp_path, buffer_server):
    address = buffer_server().address
    host = RendezvousHost("127.0.0.1")   # lives in this process while the ranks run
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=(tiny_model_path, host.rendezvous(), address, str(tmp_path / "checkpoints"), results), nprocs=2, join=True)
    got, expected = results.get()
    assert got == expected


def test_export_writes_a_hugging_face_folder_with_the_learners_log_probs(tiny_model_path, tmp_path):
    import subprocess
    import sys
    from transformers import AutoModelForCausalLM
    from common.config import to_yaml
    from launch.config import build_config
    from learner.batch import make_batch, token_logprobs

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(build_config("async_grpo", "tiny", [f"model.name={tiny_model_path}"])))
    one = make_learner(tiny_model_path)
    for s in range(2):
        one.train_on(batch(s), [0] * 4)
    one.checkpoint(str(run_dir / "checkpoints"))
    result = subprocess.run([sys.executable, "-m", "launch", "export", str(run_dir)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "step-2")
    logprob_head.install(exported, one.config.logprob_chunk)   # the learner's path: equal weights, equal bits
    probe = make_batch(batch(9))
    with torch.no_grad():
        assert torch.equal(token_logprobs(exported, probe)[1], token_logprobs(one.model, probe)[1])
    missing = subprocess.run([sys.executable, "-m", "launch", "export", str(tmp_path)], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "not a run folder" in missing.stderr
