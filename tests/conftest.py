"""Shared test fixtures: a tiny model and tokenizer built once per session, and a running
buffer server on loopback."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from buffer.server import BufferConfig, BufferServer
from buffer.table import TableConfig
from common.net import free_port  # noqa: F401  (the tests import it from here)
from common.rollout import RolloutGroup
from launch.models import TinyModelConfig, build_tiny


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    return str(build_tiny(TinyModelConfig(), tmp_path_factory.mktemp("tiny-model"), seed=0))


@pytest.fixture
def buffer_server():
    servers = []

    def start(**table):
        server = BufferServer(BufferConfig(timeout_s=5.0, table=TableConfig(**table))).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


def make_group(version: int = 0, group_size: int = 4, length: int = 6, rewards=None, seed: int = 0,
               **meta) -> RolloutGroup:
    """A valid group with random tokens: 2 prompt tokens, then policy tokens."""
    rng = np.random.default_rng(seed)
    rewards = rng.random(group_size) if rewards is None else rewards
    rows = []
    for g in range(group_size):
        n = length - (g % 2)  # rows of different lengths exercise the padding
        mask = [0, 0] + [1] * (n - 2)
        rows.append({"tokens": rng.integers(3, 19, n).tolist(), "loss_mask": mask,
                     "behaviour_logprobs": [-float(rng.random()) * m for m in mask],
                     "reward": float(rewards[g]), "turn_rewards": [float(rewards[g])], "error": "",
                     "token_versions": [version if m else -1 for m in mask]})
    return RolloutGroup.from_rows(rows, **meta)


def generate(engine, prompts: list, max_new_tokens: int, temperature: float) -> list:
    """Submit every prompt to the engine at once (as concurrent episodes do); Samples in order."""
    import asyncio

    async def all_samples():
        return await asyncio.gather(*(engine.generate(p, max_new_tokens, temperature) for p in prompts))
    return asyncio.run(all_samples())


# Chat templates of two families, written out so the tests need no download: ChatML (as
# SmolLM2 and Qwen use: "<|im_end|>" then a newline after every message) and Llama-3's
# header format (no newline after "<|eot_id|>").
CHAT_TEMPLATES = {
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
               "<|im_end|>"),
    "llama3": ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
               "'<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
               "<|eot_id|>"),
}


def build_chat_model(path, template: str) -> str:
    """A tiny Llama with a byte-level BPE tokenizer (any text round-trips exactly) and the
    named chat template; its end-of-turn marker is the eos token."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chat_template, eos = CHAT_TEMPLATES[template]
    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["user assistant system What is 2 + 3? ok, next turn.\n"] * 4,
                             trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token=eos)
    tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=0))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def end_rank() -> None:
    """End a rank spawned by torch.multiprocessing once its work is done and its results are
    written, without the interpreter's teardown. In CI a rank died of SIGABRT ("terminate called
    without an active exception") with no Python frame on its stack, which points at teardown:
    a C++ thread of torch's (gloo's, or the store client's) destroyed while still joinable.
    These tests check the work; a rank that fails before this raises as before."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

