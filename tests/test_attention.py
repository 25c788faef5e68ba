"""attention.py: which attention `auto` chooses and what a named one refuses (the CUDA order decided on the host, no
GPU needed), and chunked attention (Llama 4) trained exactly on packed rows."""

import pytest
import torch

import attention
from conftest import packed_loss, per_sample_loss, save_arch, setup
from utils import UserError


def test_attention_choice_refuses_what_cannot_train(dist):
    """Chunked attention (Llama 4's attention_chunk_size) is not a window leantrain's packed-row functions know:
    where a sequence can be longer than a chunk, auto takes the model's own sdpa (exact on packed rows:
    transformers builds the chunked mask from position_ids) and a named one stops in one line; flex attention has
    no backward on the CPU."""
    import tiny_model
    import train

    config = tiny_model.arch_config("llama4_text", attention_chunk_size=32, num_local_experts=2)
    cfg = train.TrainConfig(model_name_or_path="-", data_path="-", output_dir="-", batch_size=1, max_tokens_per_gpu=33)
    assert attention.choose_attention(cfg, dist, config) == "sdpa"
    cfg.attn_implementation = attention.PER_SEQUENCE
    with pytest.raises(UserError, match=r"^--attn-implementation leantrain_per_sequence: llama4_text "):
        attention.choose_attention(cfg, dist, config)
    cfg.max_tokens_per_gpu = 32  # no sequence passes its first chunk
    assert attention.choose_attention(cfg, dist, config) == attention.PER_SEQUENCE
    cfg.attn_implementation = "auto"
    assert attention.choose_attention(cfg, dist, config) == attention.PER_SEQUENCE
    cfg.attn_implementation = "flex_attention"
    with pytest.raises(UserError, match=r"^--attn-implementation flex_attention: torch has no backward"):
        attention.choose_attention(cfg, dist, config)


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
    falcons_own = attention.own_attention(falcon)  # imports its modeling code before flash_attn is faked

    required = dict(model_name_or_path="-", data_path="-", output_dir="-", batch_size=1, max_tokens_per_gpu=64)

    def choice(config, compute_dtype="bfloat16", flash=False, varlen=True):
        monkeypatch.setitem(sys.modules, "flash_attn", ModuleType("flash_attn") if flash else None)
        monkeypatch.setattr(attention, "VARLEN_KERNEL", (lambda *a, **k: None) if varlen else None)
        return attention.choose_attention(train.TrainConfig(**required, compute_dtype=compute_dtype), cuda, config)

    assert choice(qwen, flash=True) == choice(gemma2, flash=True) == "flash_attention_2"
    assert choice(qwen) == choice(qwen, compute_dtype="float16") == attention.VARLEN
    assert choice(gemma2) == attention.PER_SEQUENCE  # torch's varlen kernel has no soft-capping
    assert choice(qwen, compute_dtype="float32") == attention.PER_SEQUENCE
    assert choice(qwen, varlen=False) == attention.PER_SEQUENCE  # a torch without torch.nn.attention.varlen
    assert choice(falcon, flash=True) == falcons_own == "sdpa"
    cfg = train.TrainConfig(**required, compute_dtype="float32", attn_implementation=attention.VARLEN)
    with pytest.raises(UserError, match=r"^--attn-implementation leantrain_varlen needs CUDA, bf16"):
        attention.choose_attention(cfg, cuda, qwen)


def test_a_named_packed_row_attention_is_refused_for_a_model_without_attention_functions(tmp_path, dist, monkeypatch):
    """A model that takes no attention functions (as Falcon, Bloom or MPT in the transformers releases measured)
    cannot run leantrain's packed-row attention: a named one stops with one line, auto takes the model's own."""
    from leaky_model import save_leaky_model

    model_dir = save_leaky_model(tmp_path)
    monkeypatch.setattr(attention, "takes_attention_functions", lambda config: False)
    with pytest.raises(UserError, match=r"^--attn-implementation leantrain_per_sequence: leaky_qwen2 models"):
        setup(model_dir, dist, attn_implementation="leantrain_per_sequence")
    _, cfg = setup(model_dir, dist)
    assert cfg.attn_implementation == "sdpa"


def test_chunked_attention_trains_exactly_under_auto(tmp_path, qwen_data, dist):
    """Llama 4 with 32-token attention chunks on samples of up to ~250 tokens: auto's packed rows give the loss of
    separate per-sample forwards."""
    model_dir = save_arch(tmp_path, "llama4_text", attention_chunk_size=32, num_local_experts=2, initializer_range=0.2)
    model, cfg = setup(model_dir, dist)
    assert cfg.attn_implementation == "sdpa" and not model.padded
    model.eval()
    with torch.no_grad():
        assert packed_loss(model, qwen_data).item() == pytest.approx(per_sample_loss(model_dir, qwen_data), rel=1e-5)
