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
r = 1 leaves a target a plain Linear; r = 0 freezes it. Everything that is not a target (embeddings, LM head,
norms, biases) trains as usual, or is frozen with --osft-freeze-non-targets.

Each target's frozen rank k (`target_ranks`): `global`, k = floor((1 - r) R) for every target; `importance`, the
paper's per-layer rule: a decoder layer's importance I_l is the mean cosine similarity of its input and output
hidden states over --osft-calibration-data-path's tokens, and it keeps (freezes) the fraction I_l x trr of each of
its targets' directions (the paper's r_l = mrr + I_l (trr - mrr) with mrr = 0), trr chosen so that the unfrozen
directions of all targets together are the fraction r of all (`allocate_ranks`). The chosen ranks are logged,
saved in every checkpoint and reused on resume, never recomputed.

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


# Importance is a mean over tokens: enough of them, not a whole dataset (rank 0 runs them on its unsharded copy).
CALIBRATION_TOKENS = 2**14


def target_ranks(lm: nn.Module, cfg, dist, saved: dict | None) -> dict[str, int]:
    """Each target's frozen rank k: the checkpoint's (`saved`, checked against this model), else by
    --osft-rank-allocation. Rank 0 decides (only it holds the weights); every rank gets its answer."""
    from utils import UserError, gather_objects, stop_if_any

    targets = {name: min(lm.get_submodule(name).weight.shape) for name in find_targets(lm, cfg.osft_target_patterns)}
    if saved is not None:
        return checked_ranks(saved, targets)
    ranks = error = None
    if dist.rank == 0:
        try:
            if cfg.osft_rank_allocation == "importance":
                importance = layer_importance(lm, cfg.osft_calibration_data_path, list(targets))
                ranks = allocate_ranks(targets, importance, cfg.osft_unfreeze_rank_ratio)
            else:
                ranks = {name: math.floor((1 - cfg.osft_unfreeze_rank_ratio) * rank) for name, rank in targets.items()}
        except UserError as e:
            error = str(e)
    stop_if_any(error)
    return gather_objects(ranks)[0]


def checked_ranks(saved, targets: dict[str, int]) -> dict[str, int]:
    """A checkpoint's ranks, if they are this model's targets' with each k in [0, R]; else a one-line error."""
    if not isinstance(saved, dict) or set(saved) != set(targets):
        fail("cannot resume: the checkpoint's OSFT ranks name other target matrices than this model's")
    for name, k in saved.items():
        if type(k) is not int or not 0 <= k <= targets[name]:
            fail(f"cannot resume: the checkpoint's OSFT rank of {name} is {k!r}, not a rank in [0, {targets[name]}]")
    return dict(saved)


def layer_importance(lm: nn.Module, path: str, targets: list[str]) -> dict[str, float]:
    """Each target's layer importance: the mean cosine similarity of its decoder layer's input and output hidden
    states over the calibration tokens (at most CALIBRATION_TOKENS, from the file's start); a target outside the
    decoder layers gets the layers' mean. One sample per forward, with the model's own attention."""
    from attention import mask_attention
    from dataset import load_tokenized
    from setup_model import decoder_layers

    data = load_tokenized(path, 2**31 - 1, lm.config.get_text_config().vocab_size, flag="--osft-calibration-data-path")
    layers = decoder_layers(lm)
    sums, tokens = torch.zeros(len(layers), dtype=torch.float64), 0

    def hook(index):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            sums[index] += F.cosine_similarity(x.float(), y.float(), dim=-1).sum().double()

        return record

    hooks = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    timer, used = Timer(), 0
    try:
        with torch.no_grad(), mask_attention(lm):
            for start, end in zip(data.offsets[:-1], data.offsets[1:]):
                if tokens >= CALIBRATION_TOKENS:
                    break
                ids = torch.from_numpy(data.input_ids[start:end].astype("int64"))[None]
                lm(input_ids=ids.to(lm.device), use_cache=False)
                tokens, used = tokens + ids.shape[1], used + 1
    finally:
        for h in hooks:
            h.remove()
    per_layer = (sums / tokens).tolist()
    log(
        f"osft: layer importance from {used} of {len(data)} samples ({tokens} tokens) of {path} in "
        f"{timer.elapsed():.1f} s: " + ", ".join(f"{v:.3f}" for v in per_layer)
    )
    names = {id(m): n for n, m in lm.named_modules()}
    owner = {names[id(layer)] + ".": value for layer, value in zip(layers, per_layer)}  # a layer's name prefix
    mean = sum(per_layer) / len(per_layer)
    return {t: next((v for prefix, v in owner.items() if t.startswith(prefix)), mean) for t in targets}


def allocate_ranks(targets: dict[str, int], importance: dict[str, float], ratio: float) -> dict[str, int]:
    """Frozen ranks k_t = R_t x min(1, trr x I_t) (importance below 0 counts 0), trr chosen so that the unfrozen
    directions sum to round(ratio x sum R_t) (rounded down per target, the rest to the largest remainders). Equal
    importances give every target the same fraction; all zero: the global ratio."""
    names = list(targets)
    sizes = torch.tensor([targets[n] for n in names], dtype=torch.float64)
    weights = torch.tensor([max(0.0, importance[n]) for n in names], dtype=torch.float64)
    # A floor far below any real score: all zero means equal, and a zero fills only after every other target is full
    # (r = 0 still freezes everything).
    weights = weights.clamp(min=1e-9 * max(float(weights.max()), 1.0))
    frozen_total = round((1 - ratio) * float(sizes.sum()))
    # Find trr: the frozen directions sum(R_t min(1, trr I_t)) grow with trr; bisection on a monotone function.
    low, high = 0.0, 1.0 / float(weights.min())
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if float((sizes * (mid * weights).clamp(max=1)).sum()) < frozen_total else (low, mid)
    exact = sizes * (high * weights).clamp(max=1)
    ks = exact.floor().clamp(max=sizes)
    for i in torch.argsort(exact - ks, descending=True, stable=True).tolist()[: max(0, frozen_total - int(ks.sum()))]:
        ks[i] += 1 if ks[i] < sizes[i] else 0
    return {n: int(k) for n, k in zip(names, ks.tolist())}


def apply_osft(lm: nn.Module, ranks: dict[str, int], train_non_targets: bool = True):
    """Replace each target Linear by its OSFT form with `ranks[name]` frozen directions (before sharding); without
    `train_non_targets`, freeze every parameter but the targets' trainable part. Logs the ranks, the SVD time and
    the memory added."""
    timer, added, total, trained = Timer(), 0, 0, []
    for name, k in ranks.items():
        parent_name, _, child = name.rpartition(".")
        parent = lm.get_submodule(parent_name)
        linear = getattr(parent, child)
        rank = min(linear.weight.shape)
        total += rank
        if k == rank:  # r = 0 (or a ratio too small for this matrix): frozen as it is
            linear.weight.requires_grad_(False)
        elif k > 0:  # k == 0 (r = 1): a plain Linear, exactly plain fine-tuning
            module = OSFTLinear.from_linear(linear, k)
            added += sum(getattr(module, f).numel() for f in FACTORS) - linear.weight.numel()
            setattr(parent, child, module)
            trained += [module.u, module.s, module.v]
        else:
            trained.append(linear.weight)
    if not train_non_targets:  # embeddings, LM head, norms, biases: as loaded
        keep = {id(p) for p in trained}
        for p in lm.parameters():
            p.requires_grad_(p.requires_grad and id(p) in keep)
    dtype_bytes = next(lm.parameters()).element_size()
    log(
        f"osft: {len(ranks)} target matrices, {sum(ranks.values())}/{total} singular directions frozen; SVD "
        f"{timer.elapsed():.1f} s; factors add {added / 1e6:.1f}M parameters ({added * dtype_bytes / 2**20:.0f} MiB "
        f"before sharding); non-targets {'train' if train_non_targets else 'frozen'}"
    )
    log("osft: frozen directions k per target: " + ", ".join(f"{name} {k}" for name, k in ranks.items()))


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
