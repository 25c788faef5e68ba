"""Fifteen tiny random Hugging Face architectures beyond Qwen2/Llama, each trained on 2 ranks with many minibatches
through every attention and loss path this machine has, equal to an unpacked per-sample reference (the model's
own eager attention and own loss: loss and grad norm rel 1e-4). They cover attention and final-logit soft-capping,
Granite's multipliers, Cohere's logit scale, QK-norm, sliding windows shorter than the samples, mixtures of
experts, tied embeddings, fused QKV, decoder layers that are not at `model.layers`, and models that may mix the
sequences of a packed row (recurrent state, convolutions, masks of their own), plus one built to mix them
(tests/leaky_model.py). Whatever path the start-up probe picks for each (packed rows or padded batches: for upstream
classes that can change between transformers releases), the run must equal the reference; the model built to mix
must be trained on padded batches."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import attention
import setup_model
import tiny_model
from conftest import ROOT, tokenized_conversations, torchrun
from leaky_model import save_leaky_model
from test_train import BATCH, CAP_SMALL, LR, STEPS, reference_run

WINDOW = 16  # shorter than nearly every sample
ARCHS = {
    "gemma2": dict(
        head_dim=32,
        sliding_window=WINDOW,
        initializer_range=0.2,  # large enough scores and logits that both soft-caps bite
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
        tie_word_embeddings=True,
    ),
    "gemma3_text": dict(head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=32),
    "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0),
    "cohere": dict(logit_scale=0.5, use_qk_norm=False),
    "mistral": dict(sliding_window=WINDOW),
    "qwen3": dict(head_dim=32),
    "olmo2": dict(),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt_neox": dict(rotary_pct=0.5),  # layers at gpt_neox.layers
    "phi3": dict(),  # fused qkv_proj
    # Models that mixed the sequences of a packed row in some transformers release (the probe decides)
    "falcon": dict(),  # no attention functions (its own sdpa); masks that ignored position_ids up to 5.23
    "minimax": dict(),  # linear-attention layers with a state along the row, beside softmax attention
    "mamba": dict(state_size=4),  # convolutions and a state along the row; layers at backbone.layers
    "opt": dict(dropout=0.0),  # layers at model.decoder.layers
    "llama4_text": dict(num_local_experts=4),  # the body at `model` while the prefix says `language_model`
}
LEAKY = "leaky"  # tests/leaky_model.py: mixes the sequences of a packed row on purpose
# Trained with --attn-implementation auto: a named packed-row attention would stop (rightly) on a model that takes
# no attention functions or mixes the sequences; auto lets the probe choose packed rows or padded batches.
AUTO = {"falcon", "minimax", "mamba", LEAKY}
# Every path of leantrain's own on the CPU (on a GPU, tests/test_gpu.py adds the varlen and Liger paths).
PATHS = [(attention.PER_SEQUENCE, "chunked"), (attention.PER_SEQUENCE, "model")]


@pytest.fixture(scope="module")
def arch_data(qwen_dir, tmp_path_factory):
    return tokenized_conversations(tmp_path_factory.mktemp("arch_data"), qwen_dir, 120, seed=11, max_tokens=CAP_SMALL)


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("archs")
    models = {}
    for i, (model_type, overrides) in enumerate(ARCHS.items()):
        torch.manual_seed(i)
        lm = AutoModelForCausalLM.from_config(tiny_model.arch_config(model_type, **overrides), dtype=torch.float32)
        lm.save_pretrained(root / model_type)
        models[model_type] = str(root / model_type)
    models[LEAKY] = str(save_leaky_model(root / LEAKY, seed=len(ARCHS)))
    return models


@pytest.fixture(scope="module")
def references(arch_models, arch_data) -> dict:
    return {name: reference_run(path, arch_data, CAP_SMALL)[:2] for name, path in arch_models.items()}


def test_every_architecture_has_what_it_is_meant_to_cover(arch_models):
    from transformers import AutoConfig

    configs = {name: AutoConfig.from_pretrained(path) for name, path in arch_models.items()}
    assert configs["gemma2"].attn_logit_softcapping and configs["gemma2"].final_logit_softcapping
    assert setup_model.LogitTransform.of(configs["granite"]).scale == 0.25
    assert setup_model.LogitTransform.of(configs["cohere"]).scale == 0.5
    assert all(configs[n].sliding_window == WINDOW for n in ("gemma2", "gemma3_text", "mistral"))
    lm = AutoModelForCausalLM.from_pretrained(arch_models["gpt_neox"])
    assert not hasattr(lm, "model") and len(setup_model.decoder_layers(lm)) == 2


@pytest.mark.floor
@pytest.mark.parametrize("attn, loss", PATHS)
def test_architectures_equal_unpacked_reference(attn, loss, arch_models, arch_data, references, tmp_path):
    config = dict(data_path=str(arch_data), batch_size=BATCH, max_tokens_per_gpu=CAP_SMALL, max_steps=STEPS)
    config |= dict(learning_rate=LR, seed=3, attn_implementation=attn, loss=loss, save_final_checkpoint=False)
    spec = tmp_path / "spec.json"
    overrides = {name: {"attn_implementation": "auto"} for name in AUTO}
    spec.write_text(
        json.dumps({"models": arch_models, "output_root": str(tmp_path), "config": config} | {"overrides": overrides})
    )
    r = torchrun(ROOT / "tests" / "train_many.py", spec, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    padded_classes = set(re.findall(r"packing: (\w+) on a packed row .* training on padded batches", r.stdout))
    assert "LeakyForCausalLM" in padded_classes  # the probe's decision is right where the answer is known
    minibatches, padded = {}, set()
    for name in arch_models:
        metrics = [json.loads(line) for line in open(tmp_path / name / "training_metrics_0.jsonl")]
        minibatches[name] = [m["num_minibatches"] for m in metrics]
        params = json.loads((tmp_path / name / "training_params.json").read_text())
        assert params["loss"] == loss, name
        if name not in AUTO:
            assert params["attn_implementation"] == attn, name  # the named path ran
        config = json.loads((Path(arch_models[name]) / "config.json").read_text())
        if config["architectures"][0] in padded_classes:
            padded.add(name)  # padded batches run the model's own attention, not a packed-row one
            assert params["attn_implementation"] not in (attention.PER_SEQUENCE, attention.VARLEN), name
        assert all(m["num_minibatches"] >= 2 for m in metrics), name
        ref_losses, ref_norms = references[name]
        for m, ref_loss, ref_norm in zip(metrics, ref_losses, ref_norms, strict=True):
            assert m["loss"] == pytest.approx(ref_loss, rel=1e-4), name
            assert m["grad_norm"] == pytest.approx(ref_norm, rel=1e-4), name
    # Same data and seed, so the same samples per step: padded batches are packed by their padded size (samples x
    # longest <= the capacity), which takes more minibatches than packing by tokens
    assert LEAKY in padded
    for name in padded:
        assert all(p >= q for p, q in zip(minibatches[name], minibatches["qwen3"])), name
        assert sum(minibatches[name]) > sum(minibatches["qwen3"]), name
