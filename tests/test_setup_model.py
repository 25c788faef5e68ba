"""setup_model's pieces on the CPU: the chunked loss == plain cross-entropy (logit transforms included), the
per-sequence attention == the model's own eager attention on windows and soft-capping, attention and loss choice."""

import re

import pytest
import torch
import torch.nn.functional as F

import setup_model
from setup_model import LogitTransform, chunked_loss_sum, cross_entropy_and_grad


def plain_loss(hidden, head, targets, transform):
    return F.cross_entropy(transform(head(hidden).float()), targets, reduction="sum")


@pytest.mark.floor
@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(1 / 8), LogitTransform(1.3, 2.0)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 37])
def test_chunked_loss_equals_plain_cross_entropy(transform, bias, rows, monkeypatch):
    """Loss and gradients of hidden, weight and bias, over several chunks (7 rows each), fp32."""
    monkeypatch.setattr(setup_model, "CHUNK_LOGITS", 7 * 50)
    torch.manual_seed(rows)
    head = torch.nn.Linear(16, 50, bias=bias)
    head.weight.data *= 20  # large logits, so that soft-capping and scaling matter
    hidden = torch.randn(rows, 16, requires_grad=True)
    targets = torch.randint(0, 50, (rows,))
    results = []
    for fn in (plain_loss, chunked_loss_sum):
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


def test_cross_entropy_and_grad_keeps_dtype_and_matches_autograd():
    logits = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 3, 7])
    transform = LogitTransform(0.7, 1.5)
    loss, grad = cross_entropy_and_grad(logits.detach(), targets, *transform)
    ref = F.cross_entropy(transform(logits), targets, reduction="sum")
    ref.backward()
    assert grad.dtype == torch.float64 and torch.allclose(grad, logits.grad, atol=1e-6)
    assert torch.allclose(loss.double(), ref, atol=1e-5)


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


# --- the setup probe: what auto falls back to, what a named choice refuses -------------------------------------


def setup(model_dir, dist, **flags):
    """setup_model as train.py calls it; returns (model, resolved config)."""
    import train

    required = dict(
        model_name_or_path=str(model_dir), data_path="-", output_dir="-", batch_size=1, max_tokens_per_gpu=64
    )
    cfg = train.TrainConfig(**required, compute_dtype="float32", **flags)
    return setup_model.setup_model(cfg, dist, setup_model.check_model_path(str(model_dir))), cfg


@pytest.fixture(scope="module")
def granite_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    import tiny_model

    torch.manual_seed(0)
    config = tiny_model.arch_config("granite", logits_scaling=4.0, initializer_range=0.2)
    path = tmp_path_factory.mktemp("granite")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def packed_loss(model, qwen_data):
    from sampler import collate, load_tokenized

    data = load_tokenized(qwen_data, 10_000)
    return model(**collate(data, list(range(5))).inputs("cpu"))


@pytest.fixture(scope="module")
def qwen_data(qwen_dir, tmp_path_factory):
    from conftest import tokenized_conversations

    return tokenized_conversations(tmp_path_factory.mktemp("probe_data"), qwen_dir, 10, seed=2, max_tokens=256)


def test_unknown_logit_transform_falls_back_to_the_models_own_loss(granite_dir, qwen_data, dist, monkeypatch, capsys):
    """Pretend leantrain did not know Granite's logits_scaling: auto must notice and use the model's forward (same
    loss as with the transform known); a named chunked loss must refuse."""
    reference, _ = setup(granite_dir, dist)
    assert reference.loss == "chunked"
    monkeypatch.setattr(setup_model.LogitTransform, "of", classmethod(lambda cls, config: cls()))
    model, cfg = setup(granite_dir, dist)
    assert model.loss == cfg.loss == "model"
    assert "using the model's own forward" in capsys.readouterr().out
    with torch.no_grad():
        assert packed_loss(model, qwen_data).item() == pytest.approx(packed_loss(reference, qwen_data).item(), rel=1e-5)
    with pytest.raises(setup_model.UserError, match=r"^--loss chunked: the model's logits are not"):
        setup(granite_dir, dist, loss="chunked")


def test_a_slightly_different_logit_transform_is_noticed_in_fp32(qwen_dir, dist, monkeypatch, capsys):
    """A transform leantrain gets 0.1% wrong (as a forgotten soft-cap of RecurrentGemma's moves logits ~1e-3): the
    fp32 probe compares to 1e-4 of the largest logit, so auto falls back to the model's own forward."""
    monkeypatch.setattr(setup_model.LogitTransform, "of", classmethod(lambda cls, config: cls(1.001)))
    model, cfg = setup(qwen_dir, dist)
    assert model.loss == cfg.loss == "model" and "using the model's own forward" in capsys.readouterr().out


def test_attention_choice_refuses_what_cannot_train(dist):
    """Chunked attention (Llama 4's attention_chunk_size) is not a window leantrain's packed-row functions know:
    where a sequence can be longer than a chunk, auto takes the model's own sdpa (exact on packed rows:
    transformers builds the chunked mask from position_ids) and a named one stops in one line; flex attention has
    no backward on the CPU."""
    import tiny_model
    import train

    config = tiny_model.arch_config("llama4_text", attention_chunk_size=32, num_local_experts=2)
    cfg = train.TrainConfig(model_name_or_path="-", data_path="-", output_dir="-", batch_size=1, max_tokens_per_gpu=33)
    assert setup_model.choose_attention(cfg, dist, config) == "sdpa"
    cfg.attn_implementation = setup_model.PER_SEQUENCE
    with pytest.raises(setup_model.UserError, match=r"^--attn-implementation leantrain_per_sequence: llama4_text "):
        setup_model.choose_attention(cfg, dist, config)
    cfg.max_tokens_per_gpu = 32  # no sequence passes its first chunk
    assert setup_model.choose_attention(cfg, dist, config) == setup_model.PER_SEQUENCE
    cfg.attn_implementation = "auto"
    assert setup_model.choose_attention(cfg, dist, config) == setup_model.PER_SEQUENCE
    cfg.attn_implementation = "flex_attention"
    with pytest.raises(setup_model.UserError, match=r"^--attn-implementation flex_attention: torch has no backward"):
        setup_model.choose_attention(cfg, dist, config)


def test_auto_attention_on_cuda_takes_the_fastest_kernel_the_model_allows(monkeypatch):
    """The CUDA order, decided on the host (no GPU needed): flash-attn's varlen kernel if the package is installed,
    else torch's varlen kernel for bf16/fp16 without attention soft-capping, else per-sequence attention; a model
    that takes no attention functions keeps its own."""
    import sys
    from types import ModuleType, SimpleNamespace

    import tiny_model
    import train

    cuda = SimpleNamespace(device=torch.device("cuda"))
    qwen, gemma2, falcon = (tiny_model.arch_config(arch) for arch in ("qwen2", "gemma2", "falcon"))
    assert gemma2.attn_logit_softcapping
    falcons_own = setup_model.own_attention(falcon)  # imports its modeling code before flash_attn is faked

    required = dict(model_name_or_path="-", data_path="-", output_dir="-", batch_size=1, max_tokens_per_gpu=64)

    def choice(config, compute_dtype="bfloat16", flash=False, varlen=True):
        monkeypatch.setitem(sys.modules, "flash_attn", ModuleType("flash_attn") if flash else None)
        monkeypatch.setattr(setup_model, "VARLEN_KERNEL", (lambda *a, **k: None) if varlen else None)
        return setup_model.choose_attention(train.TrainConfig(**required, compute_dtype=compute_dtype), cuda, config)

    assert choice(qwen, flash=True) == choice(gemma2, flash=True) == "flash_attention_2"
    assert choice(qwen) == choice(qwen, compute_dtype="float16") == setup_model.VARLEN
    assert choice(gemma2) == setup_model.PER_SEQUENCE  # torch's varlen kernel has no soft-capping
    assert choice(qwen, compute_dtype="float32") == setup_model.PER_SEQUENCE
    assert choice(qwen, varlen=False) == setup_model.PER_SEQUENCE  # a torch without torch.nn.attention.varlen
    assert choice(falcon, flash=True) == falcons_own == "sdpa"
    cfg = train.TrainConfig(**required, compute_dtype="float32", attn_implementation=setup_model.VARLEN)
    with pytest.raises(setup_model.UserError, match=r"^--attn-implementation leantrain_varlen needs CUDA, bf16"):
        setup_model.choose_attention(cfg, cuda, qwen)


def test_attention_the_model_cannot_use_falls_back_to_eager(qwen_dir, qwen_data, dist, monkeypatch, capsys):
    """An attention function that refuses the model (as both of leantrain's refuse attention sinks): auto trains
    with eager instead, through the same FSDP-wrapped model (loss and gradients as a fresh eager model's); a
    named implementation stops with one line."""
    reference, _ = setup(qwen_dir, dist, attn_implementation="eager")

    def refuse(module, *args, **kwargs):
        raise setup_model.AttentionNotSupported(f"{type(module).__name__} passes `s_aux`")

    monkeypatch.setattr(setup_model, "per_sequence_attention", refuse)
    model, cfg = setup(qwen_dir, dist)
    assert cfg.attn_implementation == "eager" and "passes `s_aux`; using eager" in capsys.readouterr().out
    losses = [packed_loss(m, qwen_data) for m in (model, reference)]
    for loss in losses:
        loss.backward()
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-6)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p.grad.full_tensor(), q.grad.full_tensor(), atol=1e-6)
    with pytest.raises(setup_model.UserError, match=r"^--attn-implementation leantrain_per_sequence: .* use --attn"):
        setup(qwen_dir, dist, attn_implementation="leantrain_per_sequence")


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
        setup_model.check_scheduler(cfg)
    cfg.lr_scheduler, cfg.max_steps = "cosine", 5
    setup_model.check_scheduler(cfg)


# --- models that mix the sequences of a packed row -------------------------------------------------------------


def save_arch(tmp_path, model_type, **overrides):
    from transformers import AutoModelForCausalLM

    import tiny_model

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_model.arch_config(model_type, **overrides)).save_pretrained(tmp_path)
    return tmp_path


def per_sample_loss(model_dir, qwen_data, n=5):
    """The model's own forward, one sample at a time, eval mode: summed loss over the first n samples."""
    from transformers import AutoModelForCausalLM

    from sampler import collate, load_tokenized

    data = load_tokenized(qwen_data, 10_000)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for i in range(n):
            mb = collate(data, [i])
            logits = lm(input_ids=mb.input_ids, use_cache=False).logits[0, mb.target_index]
            total += F.cross_entropy(logits, mb.target_ids, reduction="sum").item()
    return total


def padded_and_packed_losses(model, qwen_data) -> tuple[float, float]:
    """The summed loss of the first samples as the setup left the model (padded batches), then as packed rows with
    the collator's position_ids: what training would compute without the probe's switch. Eval mode."""
    model.eval()
    with torch.no_grad():
        padded = packed_loss(model, qwen_data).item()
        model.padded = model.own_positions = False
        packed = packed_loss(model, qwen_data).item()
    return padded, packed


@pytest.mark.parametrize(
    "attention, loss, padded, own_positions",
    [
        (setup_model.PER_SEQUENCE, "chunked", False, False),
        (setup_model.PER_SEQUENCE, "model", False, False),
        ("eager", "chunked", True, False),
        ("eager", "model", True, True),
    ],
)
def test_a_minibatch_never_reads_device_memory(qwen_dir, qwen_data, attention, loss, padded, own_positions):
    """No host sync inside a minibatch's forward and backward: on the meta device (shapes, no data) any `.item()`,
    `.tolist()`, `nonzero` or boolean-mask index of a device tensor raises, as it would stall a GPU. Only the
    collator's host copy of the boundaries (a real CPU tensor, as on CUDA) may be read."""
    from transformers import AutoModelForCausalLM

    from sampler import collate, load_tokenized

    setup_model.register_attention()
    lm = AutoModelForCausalLM.from_pretrained(qwen_dir, attn_implementation=attention).to("meta")
    model = setup_model.LossModel(lm, loss, LogitTransform.of(lm.config))
    model.padded, model.own_positions = padded, own_positions
    inputs = collate(load_tokenized(qwen_data, 10_000), list(range(5))).inputs("meta")
    assert inputs["cu_seq_lens_host"].device.type == "cpu"
    model(**inputs).backward()
    assert lm.get_input_embeddings().weight.grad.device.type == "meta"
    with pytest.raises(RuntimeError, match="meta"):  # what a host sync would meet: the check can fail
        inputs["target_index"].tolist()


def test_compiled_layers_compile_once_for_every_length(qwen_dir, qwen_data, dist, monkeypatch):
    """--compile: the setup probe compiles nothing (its no-grad forwards are graphs training never runs), and after
    the first training minibatch, minibatches of other lengths and sequence counts run without a recompile.
    Dynamo's guards decide recompiles whatever the backend: its `eager` backend keeps this fast on the CPU. (The
    one-token row of an empty minibatch, which a rank runs when it has fewer than another, compiles once more: a
    size of 1 specializes.)"""
    import functools

    import torch._dynamo

    from sampler import collate, load_tokenized

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, cfg = setup(qwen_dir, dist, compile=True)
    assert cfg.compile and not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    data = load_tokenized(qwen_data, 10_000)
    minibatches = [collate(data, idx) for idx in ([0, 1, 2], [3], [4, 5], [5, 1, 3, 0])]
    model(**minibatches[0].inputs("cpu")).backward()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs > 0
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    for mb in minibatches[1:]:
        model(**mb.inputs("cpu")).backward()
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


def test_a_model_that_mixes_packed_sequences_trains_on_padded_batches(tmp_path, qwen_data, dist, capsys):
    """A model built to leak across the sequences of a packed row (tests/leaky_model.py: a token shift over the
    embeddings): the probe finds it, switches to padded batches, and the loss equals separate per-sample forwards,
    where packed rows would not. Built on purpose, so no transformers release can change what it does."""
    from leaky_model import save_leaky_model

    model_dir = save_leaky_model(tmp_path)
    model, cfg = setup(model_dir, dist)
    assert model.padded and cfg.attn_implementation == "sdpa" and cfg.loss == "chunked"
    assert f"packing: {type(model.lm).__name__} on a packed row mixes the two sequences" in capsys.readouterr().out
    padded, packed = padded_and_packed_losses(model, qwen_data)
    reference = per_sample_loss(model_dir, qwen_data)
    assert padded == pytest.approx(reference, rel=1e-5)
    assert packed != pytest.approx(reference, rel=1e-5)  # what training on packed rows would have computed


def test_a_named_packed_row_attention_is_refused_for_a_model_without_attention_functions(tmp_path, dist, monkeypatch):
    """A model that takes no attention functions (as Falcon, Bloom or MPT in the transformers releases measured)
    cannot run leantrain's packed-row attention: a named one stops with one line, auto takes the model's own."""
    from leaky_model import save_leaky_model

    model_dir = save_leaky_model(tmp_path)
    monkeypatch.setattr(setup_model, "takes_attention_functions", lambda config: False)
    with pytest.raises(
        setup_model.UserError, match=r"^--attn-implementation leantrain_per_sequence: leaky_qwen2 models"
    ):
        setup(model_dir, dist, attn_implementation="leantrain_per_sequence")
    _, cfg = setup(model_dir, dist)
    assert cfg.attn_implementation == "sdpa"


def test_a_model_that_refuses_packed_rows_trains_on_padded_batches(qwen_dir, qwen_data, dist, monkeypatch, capsys):
    """An error from the model on a packed row (as transformers raises for linear-attention layers it cannot split
    without flash-linear-attention): auto trains on padded batches, with the same loss as packed rows would give a
    model that keeps them apart."""
    reference, _ = setup(qwen_dir, dist)
    with torch.no_grad():
        expected = packed_loss(reference, qwen_data).item()
    attend = setup_model.per_sequence_attention

    def refuse_packed(module, query, *args, **kwargs):
        if len(kwargs.get("leantrain_cu_seq_lens_host", [])) > 2:
            raise ValueError("`chunk_gated_delta_rule` can't keep packed sequences apart")
        return attend(module, query, *args, **kwargs)

    monkeypatch.setattr(setup_model, "per_sequence_attention", refuse_packed)
    model, cfg = setup(qwen_dir, dist)
    out = capsys.readouterr().out
    assert "on a packed row fails (`chunk_gated_delta_rule` can't keep packed sequences apart)" in out
    assert model.padded and cfg.attn_implementation == "sdpa"
    with torch.no_grad():
        assert packed_loss(model, qwen_data).item() == pytest.approx(expected, rel=1e-5)


def test_a_model_that_mixes_even_padded_batches_is_refused(qwen_dir, dist, monkeypatch):
    monkeypatch.setattr(setup_model, "mixing", lambda outputs: 0.5)
    with pytest.raises(setup_model.UserError, match=r"on a padded batch mixes the two sequences .*5\.0e-01"):
        setup(qwen_dir, dist)


def test_dropout_does_not_fool_the_probe(tmp_path, qwen_data, dist):
    """GPT-2's default dropout (0.1) would make any two training-mode forwards differ: the probe compares in eval
    mode, keeps packed rows and the chunked loss, and leaves the model in training mode."""
    model, cfg = setup(save_arch(tmp_path, "gpt2"), dist)
    assert model.lm.config.resid_pdrop == 0.1
    assert not model.padded and cfg.loss == "chunked" and model.training


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

    from sampler import collate, load_tokenized

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
        total = sum(model(**collate(data, mb).inputs("cpu")).item() for mb in plan)
        mixed = model(**collate(data, list(range(n))).inputs("cpu")).item()
    reference = per_sample_loss(model_dir, qwen_data, n)
    assert total == pytest.approx(reference, rel=1e-5)
    assert mixed != pytest.approx(reference, rel=1e-5)  # one packed row: every sample with the long factors


def test_chunked_attention_trains_exactly_under_auto(tmp_path, qwen_data, dist):
    """Llama 4 with 32-token attention chunks on samples of up to ~250 tokens: auto's packed rows give the loss of
    separate per-sample forwards."""
    model_dir = save_arch(tmp_path, "llama4_text", attention_chunk_size=32, num_local_experts=2, initializer_range=0.2)
    model, cfg = setup(model_dir, dist)
    assert cfg.attn_implementation == "sdpa" and not model.padded
    model.eval()
    with torch.no_grad():
        assert packed_loss(model, qwen_data).item() == pytest.approx(per_sample_loss(model_dir, qwen_data), rel=1e-5)


def test_query_scaling_along_the_row_trains_on_padded_batches(tmp_path, qwen_data, dist, capsys):
    """Llama 4's NoPE layers scale queries by their index in the row from floor_scale on (attention temperature
    tuning): past floor_scale tokens, packed rows scale a sequence's queries by where it sits in the row. The probe's
    rows (21 tokens) are too short to see it; the config says it, and auto trains on padded batches, equal to per-sample
    forwards where one packed row is not."""
    overrides = dict(num_local_experts=2, num_hidden_layers=4, floor_scale=32, attn_scale=8.0, initializer_range=0.2)
    model_dir = save_arch(tmp_path, "llama4_text", **overrides)
    model, cfg = setup(model_dir, dist)
    assert model.padded and "scales queries by their index along the row" in capsys.readouterr().out
    padded, packed = padded_and_packed_losses(model, qwen_data)
    reference = per_sample_loss(model_dir, qwen_data)
    assert padded == pytest.approx(reference, rel=1e-5)
    assert packed != pytest.approx(reference, rel=1e-5)


def test_a_model_that_numbers_its_own_positions_gets_none(tmp_path, qwen_data, dist, capsys):
    """RoBERTa-style causal LMs count positions from padding_idx + 1 when given none: 0-based position_ids would
    silently shift every position embedding. The probe sees the logits move, and auto trains on padded batches
    without position_ids, equal to per-sample forwards, where packed rows with position_ids are not."""
    model_dir = save_arch(tmp_path, "roberta", is_decoder=True, initializer_range=0.2)
    model, cfg = setup(model_dir, dist)
    assert model.padded and model.own_positions
    assert "needs positions numbered its own way" in capsys.readouterr().out
    padded, packed = padded_and_packed_losses(model, qwen_data)
    reference = per_sample_loss(model_dir, qwen_data)
    assert padded == pytest.approx(reference, rel=1e-5)
    assert packed != pytest.approx(reference, rel=1e-4)


def test_a_model_that_needs_position_ids_keeps_them(qwen_dir, dist, monkeypatch):
    from transformers.models.qwen2 import modeling_qwen2

    forward = modeling_qwen2.Qwen2Model.forward

    def needs_positions(self, *args, position_ids=None, **kwargs):
        if position_ids is None:
            raise TypeError("position_ids are required")
        return forward(self, *args, position_ids=position_ids, **kwargs)

    monkeypatch.setattr(modeling_qwen2.Qwen2Model, "forward", needs_positions)
    model, cfg = setup(qwen_dir, dist)
    assert not model.padded and not model.own_positions and cfg.loss == "chunked"
