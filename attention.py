"""Attention: leantrain's attention functions for packed rows, and the choice of the attention a model trains with.

Each packed sequence attends only within itself. Two functions registered with transformers, chosen by name like
its own (`--attn-implementation`); both read the row's sequence boundaries from the keyword arguments LossModel
passes through the model (`cu_seq_lens_q`, ...), as flash_attention_2 does.
"""

import contextlib
import inspect

import torch
import torch.nn.functional as F

from utils import fail


# Read by every model module; here because setup_model and probe both import this one.
def text_config(config):
    """The language model's part of a config (a multimodal config nests it; a text config is its own)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


VARLEN = "leantrain_varlen"  # torch's FlashAttention-2 kernel for packed rows (CUDA, bf16/fp16, PyTorch >= 2.10)
PER_SEQUENCE = "leantrain_per_sequence"  # one causal attention call per sequence of the row (any device)


class AttentionNotSupported(Exception):
    """The model asks an attention function for something it does not compute (the setup probe falls back)."""


def _check_packing_args(module, kwargs: dict, unsupported: dict):
    for name, value in unsupported.items():
        if value is not None and value is not False:
            raise AttentionNotSupported(f"{type(module).__name__} passes `{name}`")
    if kwargs.get("cu_seq_lens_q") is None:
        raise AttentionNotSupported(f"{type(module).__name__} does not pass the packed row's sequence boundaries")


def _varlen_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    # The signature changed between releases: 2.11 has no `enable_gqa` (grouped KV heads just work there).
    gqa = {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}
    return lambda *args, **kw: varlen_attn(*args, **kw, **gqa)


VARLEN_KERNEL = _varlen_kernel()


def varlen_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, softcap=None, **kwargs
):
    """One varlen FlashAttention call for the whole packed row. Shapes: query [1, heads, T, dim] -> [1, T, heads,
    dim]. transformers' sliding_window W lets a query see W keys, itself included: flash's left window W - 1."""
    _check_packing_args(module, kwargs, {"softcap": softcap, "s_aux": kwargs.get("s_aux"), "dropout": dropout or None})
    if query.dtype not in (torch.bfloat16, torch.float16) or query.device.type != "cuda":
        raise AttentionNotSupported(f"{VARLEN} needs CUDA and bf16/fp16 compute")
    cu, max_len = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    # [T, heads, dim], contiguous: under compile the copy fuses into the kernel that wrote q and k (RoPE)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    out = VARLEN_KERNEL(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=window)
    return out.unsqueeze(0), None


def _attend_one(q, k, v, scale, window, softcap, dropout):
    """Causal attention of one sequence ([1, heads, L, dim]), with transformers' sliding window and soft-capping."""
    length = q.shape[2]
    if softcap is None and (window is None or length <= window):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout, enable_gqa=True)
    i = torch.arange(length, device=q.device)
    allowed = i[:, None] >= i[None, :]
    if window is not None:
        allowed &= i[:, None] - i[None, :] < window
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=scale, dropout_p=dropout, enable_gqa=True
        )
    # Soft-capped scores (Gemma 2): SDPA cannot cap them, so compute them as the model's eager attention does.
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = (softcap * torch.tanh(scores / softcap)).masked_fill(~allowed, float("-inf"))
    probs = F.dropout(scores.softmax(-1, dtype=torch.float32).to(q.dtype), dropout)
    return probs @ v


def per_sequence_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, softcap=None, **kwargs
):
    """Causal attention run per sequence of a packed row, on any device and dtype. transformers builds a dense T x T
    block-diagonal mask for packed rows under sdpa/eager, and the CPU kernels compute every masked block; attending
    within each sequence costs ~T/len(sequence) times less. Shapes: query [1, heads, T, dim] -> [1, T, heads, dim]."""
    _check_packing_args(module, kwargs, {"s_aux": kwargs.get("s_aux")})
    lengths = kwargs["leantrain_cu_seq_lens_host"].diff().tolist()  # a CPU copy of the boundaries: no device sync
    dropout = dropout if module.training else 0.0
    outs = [
        _attend_one(q, k, v, scaling, sliding_window, softcap, dropout)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def register_attention(compiled: bool = False):
    """Register both functions with transformers. `compiled` (the decoder layers compiled): per-sequence attention,
    a Python loop over host-side lengths, stays out of the graphs."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    per_sequence = torch.compiler.disable(per_sequence_attention) if compiled else per_sequence_attention
    AttentionInterface.register(PER_SEQUENCE, per_sequence)


# ---------------------------------------------------------------------------------------------------------------
# Choosing: which attention a model trains with, from its config and the device


def model_class(config):
    """The causal-LM class transformers builds for this config (None where it has none registered here)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return None


def takes_attention_functions(config) -> bool:
    """Whether the model calls its attention through transformers' AttentionInterface, which is how leantrain's
    attention functions (and flash_attention_2) reach it. Older designs (Falcon, Bloom, MPT, Mamba...) do not."""
    cls = model_class(config)
    return cls is None or bool(getattr(cls, "_supports_attention_backend", True))


def own_attention(config) -> str:
    """The model's own attention: sdpa where it has one, else eager."""
    cls = model_class(config)
    return "sdpa" if cls is None or getattr(cls, "_supports_sdpa", False) else "eager"


def packed_attention_cannot(config, longest: int) -> str | None:
    """What leantrain's packed-row attention functions (and flash-attn's) cannot compute for this model on
    sequences of up to `longest` tokens, if any: they see only the row's sequence boundaries, not the mask
    transformers builds."""
    text = text_config(config)
    if not takes_attention_functions(config):
        return f"{config.model_type} models take no attention functions"
    chunk = getattr(text, "attention_chunk_size", None)  # Llama 4: each query sees only its own chunk of keys
    if chunk and chunk < longest:
        return (
            f"{config.model_type} attends in chunks of {chunk} tokens (attention_chunk_size), and sequences of up "
            f"to --max-tokens-per-gpu {longest} span several"
        )
    return None


def packed_rows_cannot(config, longest: int) -> str | None:
    """What the model computes along the whole row, whatever the attention, that the probe's short rows cannot
    show (seen in its config). Llama 4's NoPE layers scale queries by their index in the row from floor_scale on:
    in a packed row, not their position in their own sequence."""
    text = text_config(config)
    floor = getattr(text, "floor_scale", None)
    nope = 0 in (getattr(text, "no_rope_layers", None) or [])
    if getattr(text, "attn_temperature_tuning", False) and nope and floor and floor < longest:
        return (
            f"scales queries by their index along the row (attn_temperature_tuning from floor_scale {floor}, "
            f"below --max-tokens-per-gpu {longest})"
        )
    return None


def flex_attention_trains_on(device) -> bool:
    """torch's flex attention has no backward on some devices (the CPU): it raises once its inputs need grads."""
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.zeros(1, 1, 16, 16, device=device, requires_grad=True)
    try:
        flex_attention(q, q, q)
    except NotImplementedError:
        return False
    return True


@contextlib.contextmanager
def mask_attention(lm):
    """The model's own attention (sdpa or eager), which honours an attention mask, for forwards outside training
    (OSFT's calibration, generation): leantrain's packed-row functions and flash-attn's varlen need the row's
    sequence boundaries. The training implementation is restored on leaving."""
    before, own = lm.config._attn_implementation, own_attention(lm.config)
    if before == own:  # already (models that take no attention functions always are)
        yield
        return
    lm.set_attn_implementation(own)
    try:
        yield
    finally:
        lm.set_attn_implementation(before)


def choose_attention(cfg, dist, config) -> str:
    """`auto`: flash-attn's varlen kernel if installed (CUDA), else torch's varlen kernel (CUDA, bf16/fp16, no
    attention soft-capping), else per-sequence attention; for a model they cannot compute (no attention functions,
    chunked attention), its own sdpa. A named implementation is used as given, if it can train here."""
    name = cfg.attn_implementation
    if name in ("auto", VARLEN, PER_SEQUENCE) and (cannot := packed_attention_cannot(config, cfg.max_tokens_per_gpu)):
        if name == "auto":
            return own_attention(config)
        fail(f"--attn-implementation {name}: {cannot}; use --attn-implementation auto, sdpa or eager")
    if name == "flex_attention" and not flex_attention_trains_on(dist.device):
        fail(f"--attn-implementation flex_attention: torch has no backward for it on {dist.device.type}; use auto")
    cuda = dist.device.type == "cuda"
    varlen_runs = cuda and VARLEN_KERNEL is not None and cfg.compute_dtype in ("bfloat16", "float16")
    if name == VARLEN and not varlen_runs:
        fail(f"--attn-implementation {VARLEN} needs CUDA, bf16/fp16 compute and torch >= 2.10; use auto")
    if name != "auto":
        return name
    if cuda:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
        if varlen_runs and not getattr(text_config(config), "attn_logit_softcapping", None):
            return VARLEN
    return PER_SEQUENCE
