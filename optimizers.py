"""Optimizers and the learning-rate schedule: --optimizer's choices (OPTIMIZERS: adding an optimizer is a builder
here and its line in that table, its flags in config.py with resume=MATCH), the schedule, and where a resumed run
stands on it."""

import warnings

import torch
from torch import nn

from setup_model import decoder_layers
from utils import fail, first_line


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def fused_adamw(cfg, params, device):
    """AdamW from the flags. Fused (one kernel over all parameters, CUDA and CPU): FSDP2's parameters are
    DTensors, and each DTensor op costs host time per parameter; the foreach variant runs a dozen such ops a step
    (150 ms a step for 24 layers on the CPU, against 19 ms fused)."""
    return torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=device.type in ("cuda", "cpu"),
    )


def adamw(cfg, model, device):
    """--optimizer adamw: AdamW over every trainable parameter, one group at --learning-rate."""
    return fused_adamw(cfg, trainable(model), device)


class CombinedOptimizer(torch.optim.Optimizer):
    """Several torch optimizers as one: one param_groups list (each group names its part under "optimizer") and
    one state, which the scheduler (one lr factor, each group's own base lr), the after-step hooks (OSFT's
    projection) and DCP's get/set_state_dict (parameters by FQN) see as those of any optimizer. step() hands each
    part its groups and the shared state, then steps it: each part runs its own update on its own parameters. The
    parts get them anew at every step, since load_state_dict replaces the combined object's."""

    def __init__(self, parts: dict):
        self.parts = parts
        super().__init__(
            [group | {"optimizer": name} for name, part in parts.items() for group in part.param_groups], {}
        )

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for name, part in self.parts.items():
            part.param_groups = [group for group in self.param_groups if group["optimizer"] == name]
            part.state = self.state
            part.step()
        return loss


# torch < 2.9 has no Muon: this module still imports, and config.py refuses --optimizer muon in one line.
class WholeMatrixMuon(getattr(torch.optim, "Muon", torch.optim.Optimizer)):
    """torch.optim.Muon, each matrix orthogonalised whole. Under FSDP2 a parameter is a DTensor sharded by rows;
    torch's Muon then runs Newton-Schulz as DTensor matmuls, reducing bf16 partial products across ranks (2 ranks
    drifted from 1 by 3e-5 of the loss in 3 steps, and stepped 3x slower on 2 CPU ranks). Here each rank gathers a
    matrix's momentum-mixed update (one all-gather), runs torch's own Newton-Schulz on it, the same on every rank
    whatever their number, and applies its own rows. Otherwise torch's step, op for op (bit for bit on plain
    tensors: tests/test_optimizers.py)."""

    @torch.no_grad()
    def step(self, closure=None):
        from torch.distributed.tensor import DTensor, distribute_tensor
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            lr, momentum = group["lr"], group["momentum"]
            for param, grad, buffer in zip(params, grads, buffers):
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                sharded = isinstance(update, DTensor)
                whole = update.full_tensor() if sharded else update
                ortho = _zeropower_via_newtonschulz(whole, group["ns_coefficients"], group["ns_steps"], group["eps"])
                if sharded:  # this rank's rows of the whole result: no communication
                    ortho = distribute_tensor(ortho, update.device_mesh, update.placements, src_data_rank=None)
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(ortho, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss


def muon_matrices(model) -> set[int]:
    """ids of the parameters Muon trains: the decoder layers' trainable 2-D weights (attention and MLP matrices,
    routers), OSFT's factors excepted (their updates must stay orthogonal to the frozen subspace: AdamW's,
    projected after each step, as without Muon)."""
    import osft

    factors = {id(p) for m in model.modules() if isinstance(m, osft.OSFTLinear) for p in (m.u, m.s, m.v)}
    return {
        id(p)
        for layer in decoder_layers(model.lm)
        for p in layer.parameters()
        if p.requires_grad and p.ndim == 2 and id(p) not in factors
    }


def muon(cfg, model, device):
    """--optimizer muon: torch.optim.Muon over the decoder layers' 2-D weights (muon_matrices) at
    --muon-learning-rate (default --learning-rate), scaled per weight by its whole shape (--muon-adjust-lr);
    fused AdamW over the rest (embeddings, LM head, norms, biases, OSFT's factors) at --learning-rate. One
    schedule multiplies both. The AdamW group comes first: the logged `lr` is its rate."""
    chosen = muon_matrices(model)
    matrices = [p for p in trainable(model) if id(p) in chosen]
    rest = [p for p in trainable(model) if id(p) not in chosen]
    if not matrices:
        fail(
            "--optimizer muon: no trainable 2-D weight in the decoder layers for Muon (OSFT's factors train with AdamW)"
        )
    muon_lr = cfg.learning_rate if cfg.muon_learning_rate is None else cfg.muon_learning_rate
    parts = {
        "muon": WholeMatrixMuon(
            matrices,
            lr=muon_lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.muon_momentum,
            adjust_lr_fn=cfg.muon_adjust_lr,
        )
    }
    if rest:
        parts = {"adamw": fused_adamw(cfg, rest, device)} | parts
    return CombinedOptimizer(parts)


OPTIMIZERS = {"adamw": adamw, "muon": muon}  # --optimizer's choices: name -> builder(cfg, model, device)


def build_optimizer(cfg, model, device):
    """The optimizer --optimizer names, over the trainable parameters; OSFT's after-step projection, if any, hangs
    on it."""
    import osft

    if not trainable(model):  # e.g. --osft-unfreeze-rank-ratio 0 with --osft-freeze-non-targets
        fail("nothing to train: every parameter of the model is frozen")
    optimizer = OPTIMIZERS[cfg.optimizer](cfg, model, device)
    osft.keep_orthogonal(optimizer, model)
    return optimizer


def build_scheduler(cfg, optimizer, total_steps: int | None):
    from transformers import get_scheduler

    try:
        return get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.num_warmup_steps, num_training_steps=total_steps
        )
    except (ValueError, TypeError) as e:
        if total_steps is None and "num_training_steps" in str(e):
            fail(f"--lr-scheduler {cfg.lr_scheduler} needs a known run length: set --max-steps or --max-epochs")
        fail(f"--lr-scheduler {cfg.lr_scheduler}: cannot be built from leantrain's flags ({first_line(e)})")


def check_scheduler(cfg):
    """Before any heavy work: the schedule builds from the flags alone and steps without a metric
    (reduce_lr_on_plateau and greedy want one, which leantrain does not give them)."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(cfg, optimizer, cfg.max_steps or (10**6 if cfg.max_epochs else None))
    optimizer.step()
    try:
        scheduler.step()
    except TypeError as e:
        fail(
            f"--lr-scheduler {cfg.lr_scheduler}: steps only with a metric, which leantrain does not pass ({first_line(e)})"
        )


def move_scheduler_to(scheduler, step: int):
    """Place a schedule at `step` finished steps, as if it had stepped that often. transformers' schedules are
    LambdaLR: the lr is base_lr x lambda(step), whatever lengths earlier launches had."""
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore")
        scheduler.step()


def lr_at(cfg, total_steps: int | None, step: int) -> float:
    """The lr a run of `total_steps` uses for the step after `step` (for the resume notice)."""
    scheduler = build_scheduler(cfg, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate), total_steps)
    move_scheduler_to(scheduler, step)
    return scheduler.get_last_lr()[0]
