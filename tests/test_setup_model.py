"""setup_model's pieces on the CPU: the chunked loss == plain cross-entropy (logit transforms included), the logit
transform read from the config, schedules refused early, no host sync inside a minibatch, compiled layers that do not
recompile, padded batches, decoder layers of unusual layouts, longrope's samples trained alone."""

import re

import pytest
import torch
import torch.nn.functional as F

import optimizers
import setup_model
import train
from attention import PER_SEQUENCE, register_attention
from conftest import packed_loss, per_sample_loss, save_arch, setup
from setup_model import LogitTransform, chunked_losses, cross_entropy_and_grad


def plain_loss(hidden, head, targets, transform):
    return F.cross_entropy(transform(head(hidden).float()), targets, reduction="sum")


@pytest.mark.floor
@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(1 / 8), LogitTransform(1.3, 2.0)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 37])
def test_chunked_loss_equals_plain_cross_entropy(transform, bias, rows, monkeypatch):
    """Loss, each target's loss, and gradients of hidden, weight and bias, over several chunks (7 rows each), fp32;
    with and without gradients (validation)."""
    monkeypatch.setattr(setup_model, "CHUNK_LOGITS", 7 * 50)
    torch.manual_seed(rows)
    head = torch.nn.Linear(16, 50, bias=bias)
    head.weight.data *= 20  # large logits, so that soft-capping and scaling matter
    hidden = torch.randn(rows, 16, requires_grad=True)
    targets = torch.randint(0, 50, (rows,))
    results = []
    for fn in (plain_loss, lambda *args: chunked_losses(*args).total):
        head.zero_grad()
        hidden.grad = None
        loss = fn(hidden, head, targets, transform)
        (loss * 0.5).backward()
        grads = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
        results.append((loss.detach(), [g.clone() for g in grads]))
    (ref, ref_grads), (loss, grads) = results
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-5)
    each = F.cross_entropy(transform(head(hidden).float()), targets, reduction="none").detach()
    assert torch.allclose(chunked_losses(hidden, head, targets, transform).per_target, each, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        no_grad = chunked_losses(hidden, head, targets, transform)
    assert torch.allclose(no_grad.per_target, each, rtol=1e-5, atol=1e-5)
    assert torch.allclose(no_grad.total, ref, rtol=1e-5, atol=1e-5)


def test_cross_entropy_and_grad_keeps_dtype_and_matches_autograd():
    logits = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 3, 7])
    transform = LogitTransform(0.7, 1.5)
    losses, grad = cross_entropy_and_grad(logits.detach(), targets, *transform)
    ref = F.cross_entropy(transform(logits), targets, reduction="none")
    ref.sum().backward()
    assert grad.dtype == torch.float64 and torch.allclose(grad, logits.grad, atol=1e-6)
    assert torch.allclose(losses.double(), ref, atol=1e-5)


@pytest.mark.parametrize(
    "config, expected",
    [
        (dict(model_type="qwen2"), LogitTransform()),
        (dict(model_type="granite", logits_scaling=8.0), LogitTransform(1 / 8)),
        (dict(model_type="cohere", logit_scale=0.0625), LogitTransform(0.0625)),
        (dict(model_type="gemma2", final_logit_softcapping=30.0), LogitTransform(1.0, 30.0)),
        (dict(model_type="recurrent_gemma", logits_soft_cap=25.0), LogitTransform(1.0, 25.0)),
    ],
)
def test_logit_transform_read_from_config(config, expected):
    from transformers import AutoConfig

    model_type = config.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **config)
    if model_type == "gemma2":
        cfg.final_logit_softcapping = config["final_logit_softcapping"]
    assert LogitTransform.of(cfg) == expected


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(lr_scheduler="cosinus"), "--lr-scheduler cosinus: cannot be built from leantrain's flags"),
        (dict(lr_scheduler="cosine"), "--lr-scheduler cosine needs a known run length"),
        (
            dict(lr_scheduler="reduce_lr_on_plateau", max_steps=5),
            "--lr-scheduler reduce_lr_on_plateau: steps only with",
        ),
        (dict(lr_scheduler="warmup_stable_decay", max_steps=5), "--lr-scheduler warmup_stable_decay: cannot be built"),
    ],
)
def test_unusable_schedules_fail_before_any_heavy_work(flags, message):
    import train

    cfg = train.TrainConfig(model_name_or_path="-", data_path="-", output_dir="-", batch_size=1, max_tokens_per_gpu=8)
    for name, value in flags.items():
        setattr(cfg, name, value)
    with pytest.raises(setup_model.UserError, match="^" + re.escape(message)):
        optimizers.check_scheduler(cfg)
    cfg.lr_scheduler, cfg.max_steps = "cosine", 5
    optimizers.check_scheduler(cfg)


@pytest.mark.parametrize(
    "attention, loss, padded, own_positions",
    [
        (PER_SEQUENCE, "chunked", False, False),
        (PER_SEQUENCE, "model", False, False),
        ("eager", "chunked", True, False),
        ("eager", "model", True, True),
    ],
)
def test_a_minibatch_never_reads_device_memory(qwen_dir, qwen_data, attention, loss, padded, own_positions):
    """No host sync inside a minibatch's forward and backward, per-sample losses included: on the meta device (shapes, no data) any `.item()`,
    `.tolist()`, `nonzero` or boolean-mask index of a device tensor raises, as it would stall a GPU. Only the
    collator's host copy of the boundaries (a real CPU tensor, as on CUDA) may be read."""
    from transformers import AutoModelForCausalLM

    from dataset import load_tokenized
    from packing import collate

    register_attention()
    lm = AutoModelForCausalLM.from_pretrained(qwen_dir, attn_implementation=attention).to("meta")
    model = setup_model.LossModel(lm, loss, LogitTransform.of(lm.config))
    model.padded, model.own_positions = padded, own_positions
    mb = collate(load_tokenized(qwen_data, 10_000), list(range(5)))
    assert mb.inputs("meta")["cu_seq_lens_host"].device.type == "cpu"
    sums = torch.zeros(1 + 5, dtype=torch.float64, device="meta")  # the step's loss and each sample's, as train.py
    train.train_minibatch(model, mb, 0.5, sums, "meta")
    assert lm.get_input_embeddings().weight.grad.device.type == "meta" and sums.device.type == "meta"
    with pytest.raises(RuntimeError, match="meta"):  # what a host sync would meet: the check can fail
        mb.inputs("meta")["target_index"].tolist()


def test_compiled_layers_compile_once_for_every_length(qwen_dir, qwen_data, dist, monkeypatch):
    """--compile: the setup probe compiles nothing (its no-grad forwards are graphs training never runs), and after
    the first training minibatch, minibatches of other lengths and sequence counts run without a recompile.
    Dynamo's guards decide recompiles whatever the backend: its `eager` backend keeps this fast on the CPU. (The
    one-token row of an empty minibatch, which a rank runs when it has fewer than another, compiles once more: a
    size of 1 specializes.)"""
    import functools

    import torch._dynamo

    from dataset import load_tokenized
    from packing import collate

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, cfg = setup(qwen_dir, dist, compile=True)
    assert cfg.compile and not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    data = load_tokenized(qwen_data, 10_000)
    minibatches = [collate(data, idx) for idx in ([0, 1, 2], [3], [4, 5], [5, 1, 3, 0])]
    model(**minibatches[0].inputs("cpu")).total.backward()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs > 0
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    for mb in minibatches[1:]:
        model(**mb.inputs("cpu")).total.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def test_padded_batch_puts_outputs_back_in_row_order():
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    row = torch.arange(100, 109)[None]
    positions = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3, 4]])
    inputs, row_order = setup_model.padded_batch(row, positions, cu, max_length=5)
    assert inputs["input_ids"].tolist() == [[100, 101, 102, 100, 100], [103] + [100] * 4, [104, 105, 106, 107, 108]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1] * 5]
    assert inputs["position_ids"][2].tolist() == [0, 1, 2, 3, 4]
    assert inputs["input_ids"][row_order].tolist() == row[0].tolist()


def test_decoder_layers_and_body_of_unusual_layouts():
    """The layers are the ModuleList holding most parameters (OPT's model.decoder.layers, Mamba's backbone.layers,
    a hybrid's mixed layer types); Llama 4's body sits at `model` while its prefix says `language_model`."""
    from transformers import AutoModelForCausalLM

    import tiny_model

    expected = {"opt": "OPTDecoderLayer", "mamba": "MambaBlock", "llama4_text": "Llama4TextDecoderLayer"}
    expected |= {"jamba": "JambaAttentionDecoderLayer|JambaMambaDecoderLayer"}
    for model_type, layer_types in expected.items():
        overrides = dict(attn_layer_period=2, attn_layer_offset=1) if model_type == "jamba" else {}
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(tiny_model.arch_config(model_type, **overrides))
        layers = setup_model.decoder_layers(lm)
        assert len(layers) == lm.config.num_hidden_layers, model_type
        assert {type(x).__name__ for x in layers} == set(layer_types.split("|")), model_type
        assert setup_model.body(lm) is not lm, model_type


def test_a_model_that_ignores_logits_to_keep(qwen_dir, qwen_data, dist, monkeypatch):
    """Some models (TrOCR, xLSTM) return every position's logits whatever logits_to_keep says: the model loss
    and the probe take the targets' rows themselves."""
    model, _ = setup(qwen_dir, dist, loss="model")
    with torch.no_grad():
        expected = packed_loss(model, qwen_data).item()
        forward = model.lm.forward
        monkeypatch.setattr(model.lm, "forward", lambda *args, logits_to_keep=0, **kwargs: forward(*args, **kwargs))
        assert packed_loss(model, qwen_data).item() == pytest.approx(expected, rel=1e-6)


def test_longrope_samples_past_the_switch_get_a_minibatch_to_themselves(tmp_path, qwen_data, dist, capsys):
    """Phi-3's longrope takes its long factors when the longest sequence of a forward passes
    original_max_position_embeddings: a short sample packed with a long one would be computed with them. Samples
    past the switch train alone, and the loss equals separate per-sample forwards."""
    import numpy as np

    from dataset import load_tokenized
    from packing import collate

    half = 16  # head_dim 32: 16 frequencies
    rope = dict(rope_type="longrope", short_factor=[1.0] * half, long_factor=[1.0 + i for i in range(half)])
    model_dir = save_arch(
        tmp_path, "phi3", max_position_embeddings=1024, original_max_position_embeddings=128, rope_scaling=rope
    )
    model, _ = setup(model_dir, dist)
    assert model.alone_from == 129 and "a sample of 129 positions or more gets a minibatch" in capsys.readouterr().out
    data = load_tokenized(qwen_data, 10_000)
    n = len(data)
    assert (data.spans > 128).any() and (data.spans <= 128).sum() >= 2
    plan = model.packing.plan(data, np.arange(n), 10_000, 1)[0]
    for mb in plan:
        assert len(mb) == 1 or (data.spans[mb] <= 128).all()
    model.eval()
    with torch.no_grad():
        total = sum(model(**collate(data, mb).inputs("cpu")).total.item() for mb in plan)
        mixed = model(**collate(data, list(range(n))).inputs("cpu")).total.item()
    reference = per_sample_loss(model_dir, qwen_data, n)
    assert total == pytest.approx(reference, rel=1e-5)
    assert mixed != pytest.approx(reference, rel=1e-5)  # one packed row: every sample with the long factors
