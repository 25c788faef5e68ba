"""Model, optimizer and scheduler: load a Hugging Face causal LM, optionally apply Liger, shard with FSDP2.

The model the loop sees is `LossModel`: it wraps the causal LM and returns the *summed* cross-entropy of one
padding-free row, computing logits only at positions that have a target (a large share of a chat row is prompt).
Making the wrapper the FSDP root keeps the LM head gathered while the loss runs, whichever loss is used.
"""

import torch
import torch.nn.functional as F
from torch import nn

from sampler import IGNORE
from utils import UserError, broadcast_buffers, fail, first_line, log

VARLEN_SDPA = "leantrain_varlen_sdpa"


# ---------------------------------------------------------------------------------------------------------------
# Attention: each packed sequence attends only within itself.


def varlen_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal SDPA run per sequence of a packed row (`cu_seq_lens_q` gives the boundaries).

    transformers builds a dense block-diagonal T x T mask for packed rows under sdpa/eager, and the CPU kernels
    compute every masked block; attending within each sequence costs ~T/len(sequence) times less. Without
    `cu_seq_lens_q` the row is one sequence. Shapes: query [1, heads, T, dim]; returns [1, T, heads, dim]."""
    cu = kwargs.get("cu_seq_lens_q")
    lengths = cu.diff().tolist() if cu is not None else [query.shape[2]]
    dropout = dropout if module.training else 0.0
    outs = [
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=True)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def resolve_attn_implementation(requested: str, device: torch.device) -> str:
    """auto: flash_attention_2 on CUDA when flash-attn is installed, else per-sequence SDPA."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    if requested != "auto":
        return requested
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return VARLEN_SDPA


# ---------------------------------------------------------------------------------------------------------------
# Loss


def logits_loss_sum(lm, input_ids, position_ids, targets, **varlen):
    """Summed CE through the model's own forward (keeps any model-specific logit scaling or soft-capping);
    `logits_to_keep` with a boolean mask projects only the positions that have a target."""
    keep = targets != IGNORE
    logits = lm(input_ids=input_ids, position_ids=position_ids, logits_to_keep=keep, use_cache=False, **varlen).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets[keep], reduction="sum")


def liger_loss_sum(lm, input_ids, position_ids, targets, **varlen):
    """Summed CE with Liger's fused linear cross-entropy: never materialises the [tokens, vocab] logits."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    keep = targets != IGNORE
    hidden = lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **varlen).last_hidden_state
    head = lm.get_output_embeddings()
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, hidden[keep], targets[keep], head.bias)


class LossModel(nn.Module):
    """The causal LM plus its loss: forward(minibatch tensors) -> summed cross-entropy over the row's targets."""

    def __init__(self, lm: nn.Module, loss_sum=logits_loss_sum):
        super().__init__()
        self.lm = lm
        self.loss_sum = loss_sum

    def forward(self, input_ids, position_ids, targets, cu_seq_lens, max_length):
        varlen = dict(
            cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=max_length, max_length_k=max_length
        )
        return self.loss_sum(self.lm, input_ids, position_ids, targets, **varlen)


# ---------------------------------------------------------------------------------------------------------------
# Loading and sharding


def check_model_path(path: str):
    """A one-line error for a missing or non-model --model-name-or-path, before any heavy work."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # OSError, ValueError, KeyError... depending on what is wrong with the folder
        raise UserError(f"--model-name-or-path {path}: not a loadable model ({first_line(e)})") from None


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (the FSDP and activation-checkpointing unit) of a HF causal LM."""
    base = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if layers is None:
        fail(f"cannot find the decoder layers of {type(lm).__name__}")
    return list(layers)


def load_model(cfg, dist, config):
    """Rank 0 reads the weights; other ranks build the model on the meta device and receive rank 0's weights
    after sharding (one copy of the checkpoint in host memory per node instead of one per GPU)."""
    from transformers import AutoModelForCausalLM

    train_dtype = getattr(torch, cfg.train_dtype)
    kwargs = dict(dtype=train_dtype, attn_implementation=cfg.attn_implementation)
    if dist.rank == 0:
        try:
            lm = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, **kwargs)
        except Exception as e:
            raise UserError(
                f"--model-name-or-path {cfg.model_name_or_path}: cannot load the model ({first_line(e)})"
            ) from None
    else:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config, **kwargs)
    lm.config.use_cache = False  # a KV cache makes packed attention leak across samples (shared/NOTES.md)
    return lm


def apply_liger(lm):
    """Liger's fused RMSNorm/SwiGLU/RoPE kernels (CUDA only). The fused linear cross-entropy is LossModel's."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=lm, fused_linear_cross_entropy=False, cross_entropy=False)


def setup_model(cfg, dist, config) -> LossModel:
    """Load, patch (Liger, activation checkpointing), wrap in LossModel and shard with FSDP2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    lm = load_model(cfg, dist, config)
    if cfg.use_liger_kernels:
        if dist.device.type != "cuda":
            fail("--use-liger-kernels needs a CUDA GPU")
        apply_liger(lm)
    if cfg.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = LossModel(lm, liger_loss_sum if cfg.use_liger_kernels else logits_loss_sum)
    full_state = model.state_dict() if dist.rank == 0 and dist.world_size > 1 else None

    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.compute_dtype), reduce_dtype=torch.float32)
    for layer in decoder_layers(lm):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)

    if dist.world_size > 1:
        if dist.rank != 0:
            model.to_empty(device=dist.device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full_state or {}, options=options)
        broadcast_buffers(model)
    model.train()
    log(
        f"model: {type(lm).__name__}, {sum(p.numel() for p in model.parameters()) * dist.world_size / 1e6:.1f}M "
        f"parameters, attention {cfg.attn_implementation}, compute {cfg.compute_dtype}, master {cfg.train_dtype}"
    )
    return model


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def build_optimizer(cfg, model, device):
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=device.type == "cuda",
    )


def build_scheduler(cfg, optimizer, total_steps: int | None):
    from transformers import get_scheduler

    try:
        return get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.num_warmup_steps, num_training_steps=total_steps
        )
    except ValueError as e:
        if total_steps is None:
            fail(f"--lr-scheduler {cfg.lr_scheduler} needs a known run length: set --max-steps or --max-epochs")
        fail(f"--lr-scheduler {cfg.lr_scheduler}: {e}")
