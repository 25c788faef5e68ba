"""setup_model's pieces on the CPU: the chunked loss == plain cross-entropy (logit transforms included), the
per-sequence attention == the model's own eager attention on windows and soft-capping, attention and loss choice."""

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
