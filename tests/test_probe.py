"""probe.py, the start-up probe, through setup_model as train.py calls it: what `auto` falls back to (eager
attention, padded batches, the model's own loss) and what a named choice refuses, on models built or patched to need
each."""

import pytest
import torch

import attention
import probe
import setup_model
from conftest import packed_loss, per_sample_loss, save_arch, setup
from utils import UserError


@pytest.fixture(scope="module")
def granite_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    import tiny_model

    torch.manual_seed(0)
    config = tiny_model.arch_config("granite", logits_scaling=4.0, initializer_range=0.2)
    path = tmp_path_factory.mktemp("granite")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


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
    with pytest.raises(UserError, match=r"^--loss chunked: the model's logits are not"):
        setup(granite_dir, dist, loss="chunked")


def test_a_slightly_different_logit_transform_is_noticed_in_fp32(qwen_dir, dist, monkeypatch, capsys):
    """A transform leantrain gets 0.1% wrong (as a forgotten soft-cap of RecurrentGemma's moves logits ~1e-3): the
    fp32 probe compares to 1e-4 of the largest logit, so auto falls back to the model's own forward."""
    monkeypatch.setattr(setup_model.LogitTransform, "of", classmethod(lambda cls, config: cls(1.001)))
    model, cfg = setup(qwen_dir, dist)
    assert model.loss == cfg.loss == "model" and "using the model's own forward" in capsys.readouterr().out


def test_attention_the_model_cannot_use_falls_back_to_eager(qwen_dir, qwen_data, dist, monkeypatch, capsys):
    """An attention function that refuses the model (as both of leantrain's refuse attention sinks): auto trains
    with eager instead, through the same FSDP-wrapped model (loss and gradients as a fresh eager model's); a
    named implementation stops with one line."""
    reference, _ = setup(qwen_dir, dist, attn_implementation="eager")

    def refuse(module, *args, **kwargs):
        raise attention.AttentionNotSupported(f"{type(module).__name__} passes `s_aux`")

    monkeypatch.setattr(attention, "per_sequence_attention", refuse)
    model, cfg = setup(qwen_dir, dist)
    assert cfg.attn_implementation == "eager" and "passes `s_aux`; using eager" in capsys.readouterr().out
    losses = [packed_loss(m, qwen_data) for m in (model, reference)]
    for loss in losses:
        loss.backward()
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-6)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p.grad.full_tensor(), q.grad.full_tensor(), atol=1e-6)
    with pytest.raises(UserError, match=r"^--attn-implementation leantrain_per_sequence: .* use --attn"):
        setup(qwen_dir, dist, attn_implementation="leantrain_per_sequence")


# --- models that mix the sequences of a packed row -------------------------------------------------------------


def padded_and_packed_losses(model, qwen_data) -> tuple[float, float]:
    """The summed loss of the first samples as the setup left the model (padded batches), then as packed rows with
    the collator's position_ids: what training would compute without the probe's switch. Eval mode."""
    model.eval()
    with torch.no_grad():
        padded = packed_loss(model, qwen_data).item()
        model.padded = model.own_positions = False
        packed = packed_loss(model, qwen_data).item()
    return padded, packed


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


def test_a_model_that_refuses_packed_rows_trains_on_padded_batches(qwen_dir, qwen_data, dist, monkeypatch, capsys):
    """An error from the model on a packed row (as transformers raises for linear-attention layers it cannot split
    without flash-linear-attention): auto trains on padded batches, with the same loss as packed rows would give a
    model that keeps them apart."""
    reference, _ = setup(qwen_dir, dist)
    with torch.no_grad():
        expected = packed_loss(reference, qwen_data).item()
    attend = attention.per_sequence_attention

    def refuse_packed(module, query, *args, **kwargs):
        if len(kwargs.get("leantrain_cu_seq_lens_host", [])) > 2:
            raise ValueError("`chunk_gated_delta_rule` can't keep packed sequences apart")
        return attend(module, query, *args, **kwargs)

    monkeypatch.setattr(attention, "per_sequence_attention", refuse_packed)
    model, cfg = setup(qwen_dir, dist)
    out = capsys.readouterr().out
    assert "on a packed row fails (`chunk_gated_delta_rule` can't keep packed sequences apart)" in out
    assert model.padded and cfg.attn_implementation == "sdpa"
    with torch.no_grad():
        assert packed_loss(model, qwen_data).item() == pytest.approx(expected, rel=1e-5)


def test_a_model_that_mixes_even_padded_batches_is_refused(qwen_dir, dist, monkeypatch):
    monkeypatch.setattr(probe, "mixing", lambda outputs: 0.5)
    with pytest.raises(UserError, match=r"on a padded batch mixes the two sequences .*5\.0e-01"):
        setup(qwen_dir, dist)


def test_dropout_does_not_fool_the_probe(tmp_path, qwen_data, dist):
    """GPT-2's default dropout (0.1) would make any two training-mode forwards differ: the probe compares in eval
    mode, keeps packed rows and the chunked loss, and leaves the model in training mode."""
    model, cfg = setup(save_arch(tmp_path, "gpt2"), dist)
    assert model.lm.config.resid_pdrop == 0.1
    assert not model.padded and cfg.loss == "chunked" and model.training


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
