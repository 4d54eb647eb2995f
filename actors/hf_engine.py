"""A Hugging Face transformers engine (CPU or one GPU): `generate` with sampled log-probs."""
from __future__ import annotations

import warnings

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig

from actors.engine import Engine, Sample


class HFEngine(Engine):
    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu",
                 stop_token_ids: list = (), pad_token_id: int = 0, seed: int = 0):
        self.device = torch.device(device)
        transformers.logging.disable_progress_bar()  # one bar per process per load floods the driver's log
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        self.stop_token_ids = list(stop_token_ids)
        self.pad_token_id = pad_token_id
        self.version = 0
        self._params = dict(self.model.named_parameters())
        torch.manual_seed(seed)

    @torch.no_grad()
    def generate(self, prompts: list, max_new_tokens: int, temperature: float) -> list:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: generation continues every row at the end
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p):] = 1
        config = GenerationConfig(
            do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_token_ids or None, pad_token_id=self.pad_token_id,
            output_logits=True, return_dict_in_generate=True)
        out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                  generation_config=config)
        new_tokens = out.sequences[:, width:]                                   # [B, N]
        logprobs = torch.stack([
            torch.log_softmax(step_logits.float() / temperature, dim=-1).gather(1, new_tokens[:, i:i + 1])[:, 0]
            for i, step_logits in enumerate(out.logits)], dim=1)                # [B, N]
        samples = []
        stops = set(self.stop_token_ids)
        for row, row_logprobs in zip(new_tokens.tolist(), logprobs.tolist()):
            end = next((i + 1 for i, t in enumerate(row) if t in stops), None)
            n = end if end is not None else len(row)
            samples.append(Sample(row[:n], row_logprobs[:n], "stop" if end is not None else "length"))
        return samples

    @torch.no_grad()
    def load_weights(self, weights: dict, version: int) -> None:
        missing = sorted(set(self._params) - set(weights))
        unknown = sorted(set(weights) - set(self._params))
        if missing or unknown:
            raise ValueError(f"weights for version {version} do not match the model: "
                             f"missing {missing[:5]}, unknown {unknown[:5]}")
        for name, value in weights.items():
            param = self._params[name]
            with warnings.catch_warnings():  # arrays from the object store are read-only; copy_ only reads
                warnings.simplefilter("ignore", UserWarning)
                tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"weight {name}: shape {tuple(tensor.shape)} != model's {tuple(param.shape)}")
            param.copy_(tensor)
        self.version = version
