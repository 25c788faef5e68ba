"""A tiny causal LM that mixes the sequences of a packed row on purpose, whatever a transformers release does with
its own architectures: a Qwen2 whose embeddings get a token shift (each position adds half of the previous
position's embedding, as RWKV-style token mixing does). In a packed row the first token of each sequence sees the
last token of the one before; in a padded batch (one sequence per row, padding on the right) nothing leaks.
Importing this module registers `leaky_qwen2` with transformers' Auto classes."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import tiny_model


class LeakyConfig(Qwen2Config):
    model_type = "leaky_qwen2"


def token_shift(module, inputs, output):
    return output + 0.5 * torch.nn.functional.pad(output[:, :-1], (0, 0, 1, 0))


class LeakyForCausalLM(Qwen2ForCausalLM):
    config_class = LeakyConfig

    def __init__(self, config):
        super().__init__(config)
        self.model.embed_tokens.register_forward_hook(token_shift)


AutoConfig.register(LeakyConfig.model_type, LeakyConfig, exist_ok=True)
AutoModelForCausalLM.register(LeakyConfig, LeakyForCausalLM, exist_ok=True)


def save_leaky_model(directory, seed: int = 0):
    """A random tiny leaky model saved like any Hugging Face model; returns its folder."""
    config = LeakyConfig(**tiny_model.arch_config("qwen2").to_dict() | {"model_type": LeakyConfig.model_type})
    torch.manual_seed(seed)
    LeakyForCausalLM(config).save_pretrained(directory)
    return directory
