"""Orthogonal Subspace Fine-Tuning (OSFT; Nayak et al., "Sculpting Subspaces"): adapt a model while keeping
what it knows. Each target weight W (N x M, R = min(N, M)) is split by SVD, W = U S V^T, into the top
k = floor((1 - r) R) singular directions, frozen, and the other R - k, trained:

    W = U_k S_k V_k^T  +  U_r S_r V_r^T          r = --osft-unfreeze-rank-ratio
        frozen            trainable (u, s, v)

Every update stays orthogonal to the frozen subspace on both sides, U_k^T dW = 0 and dW V_k = 0:
- gradients of u and v are projected in backward (an autograd function on the gathered factors, so the
  projection needs no collective and `grad_norm` is the norm after projection);
- after each optimizer step u and v are projected again on their shards (AdamW's per-element scaling and weight
  decay otherwise leak into the frozen subspace), with the few collectives this needs batched.
r = 1 leaves a target a plain Linear; r = 0 freezes it. Everything that is not a target trains as usual.

Checkpoints: the full state keeps the factors (exact, reshardable resume); HF folders get dense weights under the
model's own names (`dense_state_dict`).
"""

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import nn

from utils import Timer, all_reduce_sum_, fail, log

DEFAULT_TARGETS = ("*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj")
FACTORS = ("u_frozen", "s_frozen", "v_frozen", "u", "s", "v")
BUCKET = 2**25  # elements per all-reduce of the after-step projection: bounded memory, few collectives


class _ProjectOut(torch.autograd.Function):
    """Identity in forward; in backward removes the gradient's component in the column span of `frozen`
    (orthonormal columns): grad - frozen (frozen^T grad)."""

    @staticmethod
    def forward(ctx, trainable, frozen):
        ctx.save_for_backward(frozen)
        return trainable.view_as(trainable)

    @staticmethod
    def backward(ctx, grad):
        (frozen,) = ctx.saved_tensors
        return grad - frozen @ (frozen.T @ grad), None


class OSFTLinear(nn.Module):
    """A Linear whose weight is (u_frozen s_frozen v_frozen^T) + (u s v^T); only u, s, v (and the bias) train."""

    def __init__(self, out_features: int, in_features: int, k: int, bias, device=None, dtype=None):
        super().__init__()
        rank = min(out_features, in_features)
        self.out_features, self.in_features = out_features, in_features

        def param(*shape, trainable):
            return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype), requires_grad=trainable)

        self.u_frozen, self.s_frozen, self.v_frozen = (
            param(out_features, k, trainable=False),
            param(k, trainable=False),
            param(in_features, k, trainable=False),
        )
        self.u, self.s, self.v = (
            param(out_features, rank - k, trainable=True),
            param(rank - k, trainable=True),
            param(in_features, rank - k, trainable=True),
        )
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, k: int) -> "OSFTLinear":
        """Decompose a loaded Linear (float32 SVD, on the GPU when there is one); a meta Linear (ranks other than
        0, which receive rank 0's factors after sharding) gives meta factors of the same shapes."""
        w = linear.weight
        module = cls(w.shape[0], w.shape[1], k, linear.bias, device=w.device, dtype=w.dtype)
        if w.is_meta:
            return module
        device = "cuda" if torch.cuda.is_available() else w.device
        u, s, vh = torch.linalg.svd(w.detach().to(device, torch.float32), full_matrices=False)
        with torch.no_grad():
            for name, value in zip(FACTORS, (u[:, :k], s[:k], vh[:k].T, u[:, k:], s[k:], vh[k:].T)):
                getattr(module, name).copy_(value)
        return module

    def factors(self):
        """(U S) and V of the whole weight, W = (U S) V^T, with the trainable factors' gradients projected."""
        u = _ProjectOut.apply(self.u, self.u_frozen)
        v = _ProjectOut.apply(self.v, self.v_frozen)
        return torch.cat([self.u_frozen * self.s_frozen, u * self.s], dim=1), torch.cat([self.v_frozen, v], dim=1)

    def forward(self, x):
        us, vs = self.factors()  # N x R, M x R
        tokens, (n, m, r) = x.numel() // self.in_features, (self.out_features, self.in_features, us.shape[1])
        if n * m * r + tokens * n * m <= tokens * r * (n + m):  # fewer FLOPs (measured: docs/BENCHMARKS.md)
            return self.through_dense(x, us, vs)
        return self.through_factors(x, us, vs)

    def through_dense(self, x, us, vs):
        """Rebuild W once, then one matmul per token: cheaper for many tokens."""
        return F.linear(x, us @ vs.T, self.bias)

    def through_factors(self, x, us, vs):
        """Two thin matmuls per token: cheaper for a few tokens."""
        return F.linear(F.linear(x, vs.T), us, self.bias)


def parse_targets(patterns: str | None) -> tuple[tuple[str, ...], bool]:
    """(fnmatch patterns, whether the user gave them)."""
    if patterns is None:
        return DEFAULT_TARGETS, False
    return tuple(p.strip() for p in patterns.split(",") if p.strip()), True


def find_targets(lm: nn.Module, patterns: str | None) -> list[str]:
    """Qualified names (relative to the model) of the Linear modules matching the patterns."""
    chosen, given = parse_targets(patterns)
    linears = [name for name, module in lm.named_modules() if type(module) is nn.Linear]
    for pattern in chosen if given else ():
        if not any(fnmatch.fnmatchcase(name, pattern) for name in linears):
            fail(f"--osft-target-patterns: {pattern!r} matches no Linear module of the model (e.g. {linears[0]})")
    targets = [name for name in linears if any(fnmatch.fnmatchcase(name, p) for p in chosen)]
    if not targets:
        fail(
            f"--osft: none of the default targets ({', '.join(DEFAULT_TARGETS)}) exist here: give --osft-target-patterns"
        )
    return targets


def apply_osft(lm: nn.Module, ratio: float, patterns: str | None):
    """Replace each target Linear by its OSFT form (before sharding). Logs the SVD time and the memory added."""
    timer, added, frozen_dirs, all_dirs = Timer(), 0, 0, 0
    targets = find_targets(lm, patterns)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = lm.get_submodule(parent_name)
        linear = getattr(parent, child)
        rank = min(linear.weight.shape)
        k = math.floor((1 - ratio) * rank)
        frozen_dirs, all_dirs = frozen_dirs + k, all_dirs + rank
        if k == rank:  # r = 0 (or a ratio too small for this matrix): frozen as it is
            linear.weight.requires_grad_(False)
        elif k > 0:  # k == 0 (r = 1): a plain Linear, exactly plain fine-tuning
            module = OSFTLinear.from_linear(linear, k)
            added += sum(getattr(module, f).numel() for f in FACTORS) - linear.weight.numel()
            setattr(parent, child, module)
    dtype_bytes = next(lm.parameters()).element_size()
    log(
        f"osft: {len(targets)} target matrices, {frozen_dirs}/{all_dirs} singular directions frozen "
        f"(ratio {ratio}); SVD {timer.elapsed():.1f} s; factors add {added / 1e6:.1f}M parameters "
        f"({added * dtype_bytes / 2**20:.0f} MiB before sharding)"
    )


def project_factors(modules: list[OSFTLinear]):
    """After an optimizer step: u -= u_frozen (u_frozen^T u), v likewise, on each rank's shard (FSDP2 shards
    rows, the same rows of a factor and its frozen partner). The k x (R-k) products are summed over ranks in
    buckets of at most BUCKET elements, one all-reduce per bucket."""
    pairs = [(m.u, m.u_frozen) for m in modules] + [(m.v, m.v_frozen) for m in modules]
    with torch.no_grad():
        start = 0
        while start < len(pairs):
            bucket, size = [], 0
            while start < len(pairs) and (
                not bucket or size + pairs[start][0].shape[1] * pairs[start][1].shape[1] <= BUCKET
            ):
                bucket.append(pairs[start])
                size += pairs[start][0].shape[1] * pairs[start][1].shape[1]
                start += 1
            _project_bucket(bucket)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _project_bucket(pairs):
    shards = [(_local(t), _local(f).float()) for t, f in pairs]
    products = [f.T @ t.float() for t, f in shards]
    flat = torch.cat([p.flatten() for p in products])
    all_reduce_sum_(flat)
    offset = 0
    for (t, f), p in zip(shards, products):
        total = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        t.sub_((f @ total).to(t.dtype))


def keep_orthogonal(optimizer, model: nn.Module):
    """Hang the after-step projection on the optimizer (the training loop stays the same with or without OSFT)."""
    modules = [m for m in model.modules() if isinstance(m, OSFTLinear)]
    if modules:
        optimizer.register_step_post_hook(lambda opt, args, kwargs: project_factors(modules))


def dense_state_dict(state: dict) -> dict:
    """A full state dict with each OSFT target's factors merged back into `<name>.weight` (HF checkpoints)."""
    prefixes = [key.removesuffix(".u_frozen") for key in state if key.endswith(".u_frozen")]
    factor_keys = {f"{p}.{f}" for p in prefixes for f in FACTORS}
    out = {k: v for k, v in state.items() if k not in factor_keys}
    for p in prefixes:
        u_f, s_f, v_f, u, s, v = (state[f"{p}.{f}"].float() for f in FACTORS)
        weight = (u_f * s_f) @ v_f.T + (u * s) @ v.T
        out[f"{p}.weight"] = weight.to(state[f"{p}.u"].dtype)
    return out
