"""The HF engine's behaviour log-probs are those the learner computes for the same weights."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.hf_engine import HFEngine
from learner.batch import make_batch, token_logprobs
from common.rollout import RolloutGroup


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    return HFEngine(tiny_model_path, stop_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_match_the_learners_logprobs(engine, tiny_model_path, temperature):
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]  # different lengths: left padding in the engine
    samples = engine.generate(prompts, max_new_tokens=6, temperature=temperature)
    assert [len(s.tokens) == len(s.logprobs) for s in samples] == [True] * 3
    rows = [{"tokens": p + s.tokens, "loss_mask": [0] * len(p) + [1] * len(s.tokens),
             "behaviour_logprobs": [0.0] * len(p) + s.logprobs, "reward": 0.0, "turn_rewards": [0.0],
             "error": "", "version_first": 0, "version_last": 0} for p, s in zip(prompts, samples)]
    batch = make_batch([RolloutGroup.from_rows(rows, temperature=temperature)])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        start, logprobs = token_logprobs(model, batch)
    mask = batch.loss_mask[:, start:].bool()
    np.testing.assert_allclose(logprobs[mask].numpy(), batch.behaviour_logprobs[:, start:][mask].numpy(), atol=1e-4)


def test_stop_token_ends_a_sample_and_is_kept(engine):
    for s in engine.generate([[3, 4]] * 16, max_new_tokens=12, temperature=1.0):
        stop = [i for i, t in enumerate(s.tokens) if t == 2]
        assert (s.finish_reason == "stop") == bool(stop)
        assert not stop or stop == [len(s.tokens) - 1]
        assert s.finish_reason == "stop" or len(s.tokens) == 12


def test_loading_weights_changes_the_policy_and_its_version(engine, tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    weights = {n: p.detach().numpy() * 0 for n, p in model.named_parameters()}  # all-zero: uniform policy
    engine.load_weights(weights, version=5)
    s = engine.generate([[3, 4]], max_new_tokens=4, temperature=1.0)[0]
    assert engine.version == 5
    np.testing.assert_allclose(s.logprobs, [-np.log(19)] * len(s.tokens), atol=1e-5)
    engine.load_weights({n: p.detach().numpy() for n, p in model.named_parameters()}, version=6)


def test_mismatched_weights_are_refused_naming_them(engine):
    with pytest.raises(ValueError, match="missing"):
        engine.load_weights({"lm_head.bogus": np.zeros(3, dtype=np.float32)}, version=9)
    assert engine.version != 9
