"""The HF engine's behaviour log-probs are those the learner computes for the same weights."""
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.engine import WeightUpdateError
from actors.engines.hf import HFEngine
from learner.batch import make_batch, token_logprobs
from common.rollout import RolloutGroup
from tests.conftest import generate


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    return HFEngine(tiny_model_path, stop_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_match_the_learners_logprobs(engine, tiny_model_path, temperature):
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]  # different lengths: left padding in the engine
    samples = generate(engine, prompts, max_new_tokens=6, temperature=temperature)
    assert [len(s.tokens) == len(s.logprobs) for s in samples] == [True] * 3
    rows = [{"tokens": p + s.tokens, "loss_mask": [0] * len(p) + [1] * len(s.tokens),
             "behaviour_logprobs": [0.0] * len(p) + s.logprobs, "reward": 0.0, "turn_rewards": [0.0],
             "error": "", "token_versions": [-1] * len(p) + s.versions} for p, s in zip(prompts, samples)]
    batch = make_batch([RolloutGroup.from_rows(rows, temperature=temperature)])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        start, logprobs = token_logprobs(model, batch)
    mask = batch.loss_mask[:, start:].bool()
    np.testing.assert_allclose(logprobs[mask].numpy(), batch.behaviour_logprobs[:, start:][mask].numpy(), atol=1e-4)


def test_stop_token_ends_a_sample_and_is_kept(engine):
    for s in generate(engine, [[3, 4]] * 16, max_new_tokens=12, temperature=1.0):
        stop = [i for i, t in enumerate(s.tokens) if t == 2]
        assert (s.finish_reason == "stop") == bool(stop)
        assert not stop or stop == [len(s.tokens) - 1]
        assert s.finish_reason == "stop" or len(s.tokens) == 12


def test_loading_weights_changes_the_policy_and_its_version(engine, tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    weights = {n: p.detach().numpy() * 0 for n, p in model.named_parameters()}  # all-zero: uniform policy
    engine.load_weights(weights, version=5)
    s = generate(engine, [[3, 4]], max_new_tokens=4, temperature=1.0)[0]
    assert engine.version == 5
    np.testing.assert_allclose(s.logprobs, [-np.log(19)] * len(s.tokens), atol=1e-5)
    engine.load_weights({n: p.detach().numpy() for n, p in model.named_parameters()}, version=6)


def test_mismatched_weights_are_refused_naming_them(engine):
    with pytest.raises(WeightUpdateError, match="'lm_head.bogus' is not a parameter"):
        engine.load_weights({"lm_head.bogus": np.zeros(3, dtype=np.float32)}, version=9)
    with pytest.raises(WeightUpdateError, match="version 9 lacks"):
        engine.load_weights({"model.norm.weight": np.ones(64, dtype=np.float32)}, version=9)
    generate(engine, [[3]], max_new_tokens=1, temperature=1.0)
    assert engine.version != 9


def test_the_models_generation_config_does_not_change_what_is_sampled(tiny_model_path, tmp_path):
    """A generation_config.json with a repetition penalty and top-k must not reshape the
    sampling distribution behind the engine's back: the reported log-probs would be wrong."""
    import shutil
    from transformers import GenerationConfig
    path = tmp_path / "penalised"
    shutil.copytree(tiny_model_path, path)
    GenerationConfig(repetition_penalty=1e4, top_k=2, no_repeat_ngram_size=1, do_sample=True).save_pretrained(path)
    engine = HFEngine(str(path), stop_token_ids=[], pad_token_id=0, seed=3)
    prompt = list(range(3, 11))  # half of the words
    samples = generate(engine, [prompt] * 32, max_new_tokens=8, temperature=1.0)
    tokens = [t for s in samples for t in s.tokens]
    # Near-uniform tiny model: about 8/19 of sampled tokens repeat a prompt word, and most of
    # the 19 tokens show up; the penalty or top-k would make both (almost) never happen.
    assert sum(t in prompt for t in tokens) / len(tokens) > 0.25
    assert len(set(tokens)) >= 15
    assert any(len(set(s.tokens)) < len(s.tokens) for s in samples)  # repeats within a sample occur
    engine.close()


def test_write_many_stages_what_write_stages_and_follows_sources_that_change_in_place():
    from actors.engine import StagedWeights
    served = {"a": torch.zeros(3, 2), "b": torch.zeros(4)}
    one, many = StagedWeights({n: t.clone() for n, t in served.items()}), StagedWeights(served)
    sources = {"a": torch.randn(3, 2), "b": torch.randn(4)}
    for version in (1, 2):  # the same source tensors, new contents: the kept routes still read them
        one.begin(version)
        for name, tensor in sources.items():
            one.write(name, tensor)
        one.commit(version)
        many.begin(version)
        many.write_many(list(sources.items()))
        many.commit(version)
        assert one.swap_if_ready() == many.swap_if_ready() == version
        for name in served:
            assert torch.equal(many.params[name], sources[name]) and torch.equal(one.params[name], sources[name])
        for tensor in sources.values():
            tensor.mul_(-2.0)
    many.begin(3)
    with pytest.raises(WeightUpdateError, match=r"'a' has shape \(2, 3\)"):
        many.write_many([("a", torch.zeros(2, 3))])
    many.abort()
    assert many.swap_if_ready() is None


def test_direct_weights_write_into_the_served_weights_while_the_engine_is_held():
    """actors.weight_staging=none: no staging copy; the engine's step lock is held from the
    first write to the commit, and the version is labelled at the next step."""
    import threading
    from actors.engine import DirectWeights, choose_staging
    served = {"a": torch.zeros(3, 2), "b": torch.zeros(4)}
    # auto: a full copy wherever it fits; host memory always counts as fitting
    assert [choose_staging(m, served) for m in ("auto", "full", "none")] == ["full", "full", "none"]
    hold = threading.Lock()
    direct = DirectWeights(served, hold)
    assert all(direct.staging[n] is served[n] for n in served)   # no copy
    sources = {"a": torch.randn(3, 2), "b": torch.randn(4)}
    direct.begin(1)
    assert not hold.acquire(blocking=False)   # no step runs while the version is written
    direct.write_many(list(sources.items()))
    direct.commit(1)
    assert hold.acquire(blocking=False)
    hold.release()
    assert all(torch.equal(served[n], sources[n]) for n in served)
    assert direct.swap_if_ready() == 1 and direct.swap_if_ready() is None
    # refused before its first write (a shape that does not fit): the served weights stay, no harm
    direct.begin(2)
    with pytest.raises(WeightUpdateError, match=r"'a' has shape \(2, 3\)"):
        direct.write("a", torch.zeros(2, 3))
    direct.abort()
    assert direct.broken is None and torch.equal(served["a"], sources["a"])
    with pytest.raises(WeightUpdateError, match="lacks"):   # a whole version checked before begin
        direct.check_version(2, {"a": torch.zeros(3, 2)})
    # a transfer that fails after a write: the served weights are mixed, so the engine stops
    direct.begin(3)
    direct.write("a", torch.ones(3, 2))
    direct.abort()
    assert hold.acquire(blocking=False)   # released: the engine's steps go on and fail loudly
    hold.release()
    for call in (direct.swap_if_ready, lambda: direct.begin(4)):
        with pytest.raises(WeightUpdateError, match="failed after part of it was written"):
            call()


def test_an_hf_engine_without_staging_serves_a_loaded_version_and_refuses_a_bad_one_whole(tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    engine = HFEngine(tiny_model_path, stop_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                      weight_staging="none")
    try:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        zeros = {n: p.detach().numpy() * 0 for n, p in model.named_parameters()}   # uniform policy
        partial = dict(list(zeros.items())[:2])
        with pytest.raises(WeightUpdateError, match="version 4 lacks"):
            engine.load_weights(partial, version=4)   # refused before anything was written
        s = generate(engine, [[3, 4]], max_new_tokens=4, temperature=1.0)[0]
        assert engine.version == 0 and s.versions == [0] * len(s.tokens)
        engine.load_weights(zeros, version=5)
        s = generate(engine, [[3, 4]], max_new_tokens=4, temperature=1.0)[0]
        assert engine.version == 5 and s.versions == [5] * len(s.tokens)
        np.testing.assert_allclose(s.logprobs, [-np.log(19)] * len(s.tokens), atol=1e-5)
        assert engine.staged.staging["lm_head.weight" if "lm_head.weight" in engine.staged.staging
                                     else "model.embed_tokens.weight"].abs().sum() == 0   # served in place
        engine.check()
    finally:
        engine.close()


@pytest.mark.parametrize("staging", ["full", "none"])
def test_an_hf_engine_takes_new_versions_between_two_tokens_and_labels_each_token(tiny_model_path, staging):
    """Every forward is a step: a version loaded while a sample is being generated serves its
    next tokens, and each token carries the version of the forward that sampled it."""
    import threading
    engine = HFEngine(tiny_model_path, stop_token_ids=[], pad_token_id=0, weight_staging=staging)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    loaded, done = [], threading.Event()

    def keep_loading():
        version = 10
        while not done.is_set():
            engine.load_weights(weights, version=version)
            loaded.append(version)
            version += 1
            time.sleep(0.002)
    loader = threading.Thread(target=keep_loading)
    try:
        loader.start()
        s = generate(engine, [[3, 4, 5]], max_new_tokens=200, temperature=1.0)[0]
    finally:
        done.set()
        loader.join(10)
        engine.close()
    assert len(s.versions) == len(s.tokens) == 200
    assert s.versions == sorted(s.versions) and len(set(s.versions)) > 1, s.versions
    assert set(s.versions) <= {0, *loaded}
