"""Model, optimizer and scheduler: load a Hugging Face causal LM, choose its loss, optionally apply Liger and
torch.compile, shard with FSDP2. Its attention is chosen in attention.py, and checked by probe.py's start-up probe.

The model the loop sees is `LossModel`: it wraps the causal LM and returns the *summed* cross-entropy of one
padding-free row over its target positions (an index the collator built on the CPU, so nothing in a minibatch's
forward or backward waits on the GPU). Making the wrapper the FSDP root keeps the LM head gathered while the loss
runs, whichever loss is used.
"""

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from attention import (
    PER_SEQUENCE,  # noqa: F401  (tests/test_train.py reads it here)
    choose_attention,
    register_attention,
    text_config,
)
from probe import probe_model
from utils import UserError, broadcast_buffers, fail, first_line, log

# ---------------------------------------------------------------------------------------------------------------
# Loss: summed cross-entropy over the row's target positions. Three ways, one result:
#   model   - the model's own forward, projecting only target positions (`logits_to_keep` = the index);
#   chunked - the LM head and cross-entropy a chunk of targets at a time: [tokens, vocab] logits never exist whole;
#   liger   - Liger's fused linear cross-entropy (CUDA), the same idea in Triton.
# chunked and liger apply the LM head themselves, so they must apply the model's logit transform too; the setup
# probe checks they agree with the model's own logits and `auto` falls back to `model` where they do not.

CHUNK_LOGITS = 2**28  # logits per chunk (1 GiB in fp32): bounds the loss's memory whatever the vocabulary


@dataclass(frozen=True)
class LogitTransform:
    """logits = softcap * tanh(scale * (hidden @ W.T + b) / softcap): Granite divides by `logits_scaling`, Cohere
    multiplies by `logit_scale`, Gemma 2/3 soft-cap with `final_logit_softcapping`, RecurrentGemma with
    `logits_soft_cap`."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, config) -> "LogitTransform":
        config = text_config(config)
        scale = 1.0 / (getattr(config, "logits_scaling", None) or 1.0) * (getattr(config, "logit_scale", None) or 1.0)
        softcap = getattr(config, "final_logit_softcapping", None) or getattr(config, "logits_soft_cap", None)
        return cls(scale, softcap)

    def __iter__(self):
        return iter((self.scale, self.softcap))

    def __call__(self, logits):
        logits = logits * self.scale if self.scale != 1.0 else logits
        return self.softcap * torch.tanh(logits / self.softcap) if self.softcap else logits


def cross_entropy_and_grad(logits, targets, scale: float, softcap: float | None):
    """Cross-entropy of transform(logits), one per row, and the gradient of their sum w.r.t. logits, written out by
    hand so that, once compiled, reading the logits and writing their gradient is one fused pass (autograd takes
    ~6 fp32 passes)."""
    z = logits.float() * scale
    if softcap:
        capped = torch.tanh(z / softcap)
        z = softcap * capped
    lse = torch.logsumexp(z, dim=-1)
    losses = lse - z.gather(1, targets[:, None]).squeeze(1)
    grad = torch.exp(z - lse[:, None])
    grad = torch.where(torch.arange(z.shape[1], device=z.device)[None, :] == targets[:, None], grad - 1.0, grad)
    grad = grad * (scale * (1.0 - capped * capped)) if softcap else grad * scale
    return losses, grad.to(logits.dtype)


@functools.cache
def compiled_cross_entropy_and_grad():
    """Made on first use (importing the compiler costs ~100 MB and a second: CPU runs never need it)."""
    return torch.compile(cross_entropy_and_grad, dynamic=True)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(transform(hidden @ weight.T + bias), targets): (their sum, differentiable; each row's, not),
    a chunk of rows at a time. Each chunk's gradients are computed right after its loss, in forward, so at most one
    chunk's logits and their gradient exist at once; backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform, chunk_rows, compiled):
        ce_and_grad = compiled_cross_entropy_and_grad() if compiled else cross_entropy_and_grad
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
        per_target = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows]
            losses, grad = ce_and_grad(F.linear(h, weight, bias), targets[start : start + chunk_rows], *transform)
            per_target[start : start + chunk_rows] = losses
            grad_hidden[start : start + chunk_rows] = grad @ weight
            grad_weight += (grad.t() @ h).float()
            if bias is not None:
                grad_bias += grad.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(per_target)
        return per_target.sum(), per_target

    @staticmethod
    def backward(ctx, grad_total, _):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        grad_bias = (grad_bias * grad_total).to(bias_dtype) if grad_bias is not None else None
        return grad_hidden * grad_total, (grad_weight * grad_total).to(weight_dtype), grad_bias, None, None, None, None


class Losses(NamedTuple):
    """A minibatch's loss: `total`, the summed cross-entropy the loop backpropagates, and `per_target`, each
    target's (detached; None where the loss path does not expose them: Liger's fused kernel)."""

    total: torch.Tensor
    per_target: torch.Tensor | None


def chunked_losses(hidden, head, targets, transform, compiled=False) -> Losses:
    chunk_rows = max(1, CHUNK_LOGITS // head.weight.shape[0])
    if not torch.is_grad_enabled():  # validation: the loss alone, still a chunk at a time (no gradient work)
        chunks = zip(hidden.split(chunk_rows), targets.split(chunk_rows))
        parts = [F.cross_entropy(transform(head(h)).float(), t, reduction="none") for h, t in chunks]
        per_target = torch.cat(parts) if parts else torch.zeros(0, device=hidden.device)
        return Losses(per_target.sum(), per_target)
    return Losses(
        *ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, transform, chunk_rows, compiled)
    )


def liger_losses(hidden, head, targets, transform, compiled=False) -> Losses:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if targets.numel() == 0:  # an empty minibatch (known on the host): zero, but still through the graph
        return Losses(hidden.sum() * 0.0, None)
    bias = head.bias * transform.scale if head.bias is not None else None
    fused = LigerFusedLinearCrossEntropyLoss(reduction="sum", softcap=transform.softcap)
    return Losses(
        fused(head.weight, hidden * transform.scale if transform.scale != 1.0 else hidden, targets, bias), None
    )


HEAD_LOSSES = {"chunked": chunked_losses, "liger": liger_losses}
PER_TARGET_LOSSES = {"auto", "chunked", "model"}  # the --loss choices that give each target's loss (auto runs one)


def body(lm: nn.Module) -> nn.Module:
    """The causal LM without its head (embeddings, layers, final norm): `lm.base_model` for nearly all, and the one
    pretrained-model child where the prefix names no attribute (Llama 4's text model sits at `model`)."""
    from transformers import PreTrainedModel

    if lm.base_model is not lm:
        return lm.base_model
    children = [m for m in lm.children() if isinstance(m, PreTrainedModel)]
    if len(children) != 1:
        fail(f"cannot find the body (embeddings and layers) of {type(lm).__name__}")
    return children[0]


def padded_batch(input_ids, position_ids, cu_seq_lens_host, max_length: int):
    """A packed row's sequences as a right-padded batch, one sequence per row, with an attention mask: for models
    whose outputs mix the sequences of a packed row (the setup probe finds them). Also returns the index that puts
    a [sequences, longest, dim] output back in row order, [tokens, dim]. Built on the CPU from the host copy of the
    boundaries."""
    starts, lengths = cu_seq_lens_host[:-1].long(), cu_seq_lens_host.diff().long()
    cols = torch.arange(max_length)
    mask = cols[None, :] < lengths[:, None]
    gather = torch.where(mask, starts[:, None] + cols[None, :], 0)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    local = torch.arange(int(cu_seq_lens_host[-1])) - starts[seq]
    to = dict(device=input_ids.device, non_blocking=True)
    gather = gather.to(**to)
    inputs = dict(input_ids=input_ids[0, gather], position_ids=position_ids[0, gather], use_cache=False)
    return inputs | dict(attention_mask=mask.long().to(**to)), (seq.to(**to), local.to(**to))


class LossModel(nn.Module):
    """The causal LM plus its loss: forward(one minibatch's tensors) -> Losses (summed and per-target cross-entropy).
    `padded`: run the row's sequences as a padded batch instead of one packed row (exact for models that mix the
    sequences of a packed row, and slower). `own_positions`: give the model no position_ids, so that it numbers
    positions its own way (RoBERTa-style models count from padding_idx + 1; with `padded`, each sequence from its
    start)."""

    def __init__(self, lm: nn.Module, loss: str, transform: LogitTransform, compiled: bool = False):
        super().__init__()
        self.lm, self.loss, self.transform, self.compiled = lm, loss, transform, compiled
        self.padded = self.own_positions = False
        self.alone_from = rope_switch(lm.config)

    @property
    def packing(self):
        """What this model asks of the sampler's minibatches."""
        from packing import Packing

        return Packing(self.padded, self.alone_from)

    def forward(
        self, input_ids, position_ids, cu_seq_lens, cu_seq_lens_host, max_length, target_index, target_ids=None
    ):
        """target_index: positions of the row that have a target, target_ids: those targets. Without target_ids
        (the setup probe), returns the model's own logits and the head-and-transform logits at target_index."""
        if self.padded:
            inputs, row_order = padded_batch(input_ids, position_ids, cu_seq_lens_host, max_length)
            keep = 0  # every position's logits: each sequence has its own targets
        else:
            inputs = dict(
                input_ids=input_ids,
                position_ids=position_ids,
                use_cache=False,
                cu_seq_lens_q=cu_seq_lens,
                cu_seq_lens_k=cu_seq_lens,
                max_length_q=max_length,
                max_length_k=max_length,
                leantrain_cu_seq_lens_host=cu_seq_lens_host,  # a tensor, not a list: compiled layers need no guard
            )
            keep, row_order = target_index, None
        if self.own_positions:
            del inputs["position_ids"]

        def at_targets(x):  # a [1, T or K, dim] or [sequences, longest, dim] output -> [K, dim]
            if row_order is not None:
                return x[row_order][target_index]
            # K < T always (a sequence's last token has no target): a model that ignores logits_to_keep is seen here
            return x[0] if x.shape[1] == target_index.shape[0] else x[0, target_index]

        if self.loss == "model" or target_ids is None:
            logits = at_targets(self.lm(**inputs, logits_to_keep=keep).logits)
            if target_ids is None:
                hidden = at_targets(body(self.lm)(**inputs).last_hidden_state)
                return logits, self.transform(self.lm.get_output_embeddings()(hidden).float())
            per_target = F.cross_entropy(logits.float(), target_ids, reduction="none")
            return Losses(per_target.sum(), per_target.detach())
        hidden = at_targets(body(self.lm)(**inputs).last_hidden_state)
        return HEAD_LOSSES[self.loss](
            hidden, self.lm.get_output_embeddings(), target_ids, self.transform, self.compiled
        )


# ---------------------------------------------------------------------------------------------------------------
# Loading, choosing, compiling and sharding


def looks_local(path: str) -> bool:
    """A path that can only mean a folder here: absolute, ./ ~ or ../, more than `org/name`, or under a folder
    that exists here (`runs/nope` when runs/ exists). A hub id is `name` or `org/name`."""
    p = Path(path).expanduser()
    return (
        p.is_absolute() or path.startswith((".", "~")) or len(p.parts) > 2 or (len(p.parts) == 2 and p.parent.is_dir())
    )


def check_model_path(path: str):
    """A one-line error for a missing or non-model --model-name-or-path, before any heavy work (a misspelt local
    folder is reported at once instead of after transformers has tried the hub)."""
    from transformers import AutoConfig

    if looks_local(path) and not Path(path).expanduser().exists():
        fail(f"--model-name-or-path {path}: no such folder")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # OSError, ValueError, KeyError... depending on what is wrong with the folder
        raise UserError(f"--model-name-or-path {path}: not a loadable model ({first_line(e)})") from None


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The repeated blocks (the FSDP, compile and activation-checkpointing unit) of a HF causal LM: the ModuleList
    that holds most of its parameters (`model.layers` for most, `transformer.h` for GPT-2, `model.decoder.layers`
    for OPT, `backbone.layers` for Mamba...; a hybrid's mixed layer types included)."""
    lists = [m for m in body(lm).modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        fail(f"cannot find the decoder layers of {type(lm).__name__}")
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def load_model(cfg, dist, config, attn_implementation: str):
    """Rank 0 reads the weights; other ranks build the model on the meta device and receive rank 0's weights
    after sharding (one copy of the checkpoint in host memory per node instead of one per GPU)."""
    from transformers import AutoModelForCausalLM

    register_attention()
    kwargs = dict(dtype=getattr(torch, cfg.train_dtype), attn_implementation=attn_implementation)
    try:
        if dist.rank == 0:
            lm = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, **kwargs)
        else:
            with torch.device("meta"):
                lm = AutoModelForCausalLM.from_config(config, **kwargs)
            lm.tie_weights()  # older transformers leave a meta-built model untied: ranks would shard different sets
    except Exception as e:
        raise UserError(
            f"--model-name-or-path {cfg.model_name_or_path}: cannot load the model ({first_line(e)})"
        ) from None
    lm.config.use_cache = False  # a KV cache makes packed attention leak across samples (shared/NOTES.md)
    return lm


def rope_switch(config) -> int | None:
    """For RoPE whose frequencies follow the longest sequence of a forward (longrope: Phi-3, Phi-4-mini), the
    number of positions from which it switches to its long factors; else None."""
    text = text_config(config)
    params = getattr(text, "rope_parameters", None) or {}
    per_layer_type = all(isinstance(p, dict) for p in params.values()) and params
    switches = [
        p.get("original_max_position_embeddings") or getattr(text, "original_max_position_embeddings", None)
        for p in (params.values() if per_layer_type else [params])
        if p.get("rope_type") == "longrope"
    ]
    if not switches or None in switches:
        return None
    return min(switches) + 1


def choose_loss(cfg, dist) -> str:
    """`auto`: chunked cross-entropy (no dependency, bounded memory); `liger` only when asked for."""
    if cfg.loss == "liger" and dist.device.type != "cuda":
        fail("--loss liger needs a CUDA GPU")
    return "chunked" if cfg.loss == "auto" else cfg.loss


def apply_liger(lm):
    """Liger's fused RMSNorm/SwiGLU/RoPE kernels (CUDA only). Its fused linear cross-entropy is `--loss liger`."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=lm, fused_linear_cross_entropy=False, cross_entropy=False)


def compile_layers(lm):
    """Regional compile: each decoder layer's forward on its own (one graph reused by every layer, compiled in
    seconds), with dynamic shapes so that a new row length or sequence count does not recompile."""
    register_attention(compiled=True)
    for layer in decoder_layers(lm):
        layer.forward = torch.compile(layer.forward, dynamic=True)


def reshard(model):
    """After a forward without backward: put every FSDP unit back to its sharded parameters (the optimizer must
    be built on those), the root's and, with reshard_after_forward off, each layer's."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def setup_model(cfg, dist, config, osft_ranks: dict | None = None) -> LossModel:
    """Load, choose attention and loss, patch (OSFT, Liger, activation checkpointing, compile), wrap in LossModel
    and shard with FSDP2. Fills in cfg's `auto` choices with what runs. `osft_ranks`: the frozen ranks a resumed
    checkpoint chose (else chosen now); the model keeps them in `osft_ranks` for its checkpoints."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import osft

    requested = (cfg.attn_implementation, cfg.loss)
    cfg.attn_implementation = choose_attention(cfg, dist, config)
    cfg.loss = choose_loss(cfg, dist)
    if cfg.compile is None:  # Liger's Triton kernels inside compiled layers fail to trace: one or the other
        cfg.compile = dist.device.type == "cuda" and not cfg.use_liger_kernels
    lm = load_model(cfg, dist, config, cfg.attn_implementation)
    if cfg.osft:
        osft_ranks = osft.target_ranks(lm, cfg, dist, osft_ranks)
        osft.apply_osft(lm, osft_ranks, cfg.osft_train_non_targets)
    if cfg.use_liger_kernels:
        if dist.device.type != "cuda":
            fail("--use-liger-kernels needs a CUDA GPU")
        apply_liger(lm)
    if cfg.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        compile_layers(lm)
    model = LossModel(lm, cfg.loss, LogitTransform.of(config), compiled=cfg.compile)
    model.osft_ranks = osft_ranks if cfg.osft else None
    num_params = sum(p.numel() for p in model.parameters())  # before sharding: whole, on every rank
    full_state = model.state_dict() if dist.rank == 0 and dist.world_size > 1 else None

    # One rank holds whole parameters anyway: resharding after forward would only copy them again for backward.
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.compute_dtype), reduce_dtype=torch.float32)
    for layer in decoder_layers(lm):
        fully_shard(layer, mp_policy=mp, reshard_after_forward=dist.world_size > 1)
    fully_shard(model, mp_policy=mp)

    if dist.world_size > 1:
        if dist.rank != 0:
            model.to_empty(device=dist.device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full_state or {}, options=options)
        broadcast_buffers(model)
    model.train()
    with torch.compiler.set_stance("force_eager"):  # the probe's no-grad forwards: graphs training would not use
        probe_model(model, cfg, dist, config, requested)
    if model.alone_from:
        log(
            f"packing: longrope switches RoPE frequencies on the longest sequence of a forward: a sample of "
            f"{model.alone_from} positions or more gets a minibatch to itself"
        )
    log(
        f"model: {type(lm).__name__}, {num_params / 1e6:.1f}M "
        f"parameters, attention {cfg.attn_implementation}, loss {cfg.loss}, compile {'on' if cfg.compile else 'off'}, "
        f"compute {cfg.compute_dtype}, master {cfg.train_dtype}"
    )
    return model
