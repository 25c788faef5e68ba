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


@pytest.fixture
def dist():
    """A 1-process gloo group (no torchrun), as train.py starts it."""
    from utils import destroy_distributed, init_distributed

    yield init_distributed()
    destroy_distributed()


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
