"""Fine-tune a Hugging Face causal LM: FSDP2, padding-free packed minibatches, an exact per-token loss.

    torchrun --nproc-per-node 8 train.py --model-name-or-path MODEL --data-path data.jsonl --output-dir out \
        --batch-size 128 --max-tokens-per-gpu 16384 --learning-rate 1e-5 --max-epochs 3

`python train.py ...` (no torchrun) runs as one process. Every flag is a field of `TrainConfig` below.
"""

import contextlib
import importlib.util
import inspect
import math
import platform
import subprocess
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import typer

from utils import Timer, UserError, exit_on_user_error, fail, log

LOSSES = ("auto", "chunked", "model", "liger")  # setup_model implements them (imported lazily: --help stays fast)
MAX_BATCH_SIZE = 2**24  # samples per step: far past any fine-tuning batch, short of exhausting memory on indices


# Each flag's resume rule, stated where the flag is declared (nothing else lists flags):
MATCH = "must match"  # a resume under another value would silently change the run: refused, every difference named
FREE = "may change"  # speed, memory, length, logging, where outputs go (model and data are checked by fingerprint)


def option(default=MISSING, help: str = "", flags: tuple = (), *, resume: str, before=MISSING):
    """A flag: its default, help, typer's switch names, and its resume rule. `before`: for a MATCH flag added after
    checkpoints exist, the value that reproduces the behaviour from before it existed (default: its default), which
    an older checkpoint that lacks the setting is compared with."""
    assert resume in (MATCH, FREE), resume
    before = default if before is MISSING else before
    return field(default=default, metadata={"help": help, "flags": flags, "resume": resume, "before": before})


@dataclass
class TrainConfig:
    # data and model
    model_name_or_path: str = option(help="Hugging Face model folder or hub id (a causal LM).", resume=FREE)
    data_path: str = option(help="Tokenized JSONL written by process_data.py.", resume=FREE)
    output_dir: str = option(help="Where metrics, training_params.json and checkpoints go.", resume=FREE)
    batch_size: int = option(help="Samples per optimizer step, over all ranks (the global batch).", resume=MATCH)
    max_tokens_per_gpu: int = option(
        help="Token capacity of one minibatch on one rank; longer samples are dropped.", resume=FREE
    )
    drop_overlong_samples: bool = option(
        False,
        "Drop (and count) samples with a sequence longer than the model's positions instead of stopping.",
        ("--drop-overlong-samples",),
        resume=FREE,
    )
    # optimisation
    learning_rate: float = option(1e-5, "Peak learning rate (AdamW).", resume=MATCH)
    num_warmup_steps: int = option(0, "Linear warmup steps.", resume=MATCH)
    lr_scheduler: str = option(
        "constant_with_warmup", "Any transformers.get_scheduler name (cosine, linear, ...).", resume=MATCH
    )
    seed: int = option(42, "Seed of the data order and of torch.", resume=MATCH)
    beta1: float = option(0.9, "AdamW beta1.", resume=MATCH)
    beta2: float = option(0.95, "AdamW beta2.", resume=MATCH)
    eps: float = option(1e-8, "AdamW epsilon.", resume=MATCH)
    weight_decay: float = option(0.0, "AdamW decoupled weight decay (applied to every parameter).", resume=MATCH)
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this (0 disables clipping).", resume=MATCH)
    # length: neither flag means run until stopped
    max_steps: int | None = option(None, "Stop after this many optimizer steps.", resume=FREE)
    max_epochs: int | None = option(None, "Stop after exactly this many passes over the data.", resume=FREE)
    # precision
    train_dtype: str = option("float32", "Dtype of master weights and optimizer state.", resume=MATCH)
    compute_dtype: str | None = option(
        None, "Forward/backward dtype. Default: bfloat16 on CUDA, float32 on CPU.", resume=FREE
    )
    # model
    use_liger_kernels: bool = option(False, "Liger's fused RMSNorm/SwiGLU/RoPE kernels (CUDA only).", resume=FREE)
    loss: str = option(
        "auto",
        "Cross-entropy: chunked (LM head + loss a chunk of targets at a time, bounded memory), model (the model's own "
        "forward, logits at target positions only) or liger (Liger's fused linear cross-entropy, CUDA). "
        "auto: chunked, or model where chunked would not reproduce the model's own logits.",
        resume=FREE,
    )
    compile: bool | None = option(
        None,
        "torch.compile each decoder layer (regional, dynamic shapes). Default: on with CUDA, off on CPU.",
        ("--compile/--no-compile",),
        resume=FREE,
    )
    activation_checkpointing: bool = option(
        False,
        "Recompute each decoder layer in backward to save memory.",
        ("--activation-checkpointing/--no-activation-checkpointing",),
        resume=FREE,
    )
    attn_implementation: str = option(
        "auto",
        "auto: on CUDA flash_attention_2 if flash-attn is installed, else leantrain_varlen (torch's varlen "
        "FlashAttention, bf16/fp16, no soft-capping); else leantrain_per_sequence (causal SDPA per packed sequence, "
        "any device); the model's own sdpa/eager for models that take no attention functions or attend in chunks, "
        "and padded batches for models that mix the sequences of a packed row (README). Or any transformers name: "
        "sdpa, eager, ...",
        resume=FREE,
    )
    # validation
    validation_data_path: str | None = option(
        None, "Tokenized JSONL to measure val_loss on (no gradient).", resume=FREE
    )
    validation_split: float | None = option(
        None,
        "Hold out this fraction of --data-path's samples (chosen by --seed) to measure val_loss on.",
        resume=MATCH,
    )
    validation_frequency: int | None = option(
        None,
        "Measure val_loss every this many steps, and at the end. Default: every 10% of a known run length.",
        resume=FREE,
    )
    keep_best_checkpoint: bool = option(
        False,
        "Save a checkpoint whenever val_loss improves; pruning never deletes the best one.",
        ("--keep-best-checkpoint",),
        resume=FREE,
    )
    # experiment trackers (optional packages: pip install -e ".[trackers]")
    wandb_project: str | None = option(
        None,
        "Log every metric to this Weights & Biases project (offline, in output_dir/wandb, without an API key).",
        resume=FREE,
    )
    tensorboard_dir: str | None = option(None, "Write every metric as TensorBoard scalars to this folder.", resume=FREE)
    # OSFT (osft.py)
    osft: bool = option(
        False,
        "Orthogonal Subspace Fine-Tuning: freeze each target's top singular subspace, train the rest orthogonally.",
        ("--osft/--no-osft",),
        resume=MATCH,
    )
    osft_unfreeze_rank_ratio: float | None = option(
        None,
        "OSFT: fraction r of each target's singular directions that train (0 freezes, 1 = plain fine-tuning).",
        resume=MATCH,
    )
    osft_target_patterns: str | None = option(
        None,
        "OSFT: comma-separated fnmatch patterns of Linear module names (e.g. '*.q_proj,*.mlp.*'). Default: the "
        "attention q/k/v/o and MLP gate/up/down projections.",
        resume=MATCH,
    )
    # checkpoints
    save_dtype: str | None = option(
        None,
        "Dtype of saved HF weights: float32, bfloat16 or float16. Default: the dtype the model was loaded with.",
        resume=FREE,
    )
    min_samples_per_checkpoint: int | None = option(None, "Save a checkpoint every this many samples.", resume=FREE)
    save_final_checkpoint: bool = option(
        True,
        "Save a checkpoint when the run ends.",
        ("--save-final-checkpoint/--no-save-final-checkpoint",),
        resume=FREE,
    )
    keep_last_checkpoints: int | None = option(None, "Keep only the newest K checkpoints.", resume=FREE)
    resume: bool = option(
        False,
        "Resume from the newest intact checkpoint in --output-dir (damaged ones are skipped with a notice; start "
        "fresh, with a notice, if there is none). The settings must equal the checkpoint's; the length may grow.",
        resume=FREE,
    )
    resume_from: str | None = option(
        None, "Resume from this checkpoint folder (output_dir/full_state/samples_N).", resume=FREE
    )
    overwrite: bool = option(
        False,
        "Start over in an --output-dir that holds a run: delete its training_params.json, metrics, checkpoints and "
        "tracker folders (nothing else) first.",
        resume=FREE,
    )

    def validate(self):
        """Flag checks that need no model or data: fail before any heavy work."""
        if self.batch_size < 1:
            fail(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 1 <= self.max_tokens_per_gpu < 2**31:  # a row's sequence boundaries are int32 (varlen kernels)
            fail(f"--max-tokens-per-gpu must be in [1, 2**31), got {self.max_tokens_per_gpu}")
        if self.max_steps is not None and self.max_epochs is not None:
            fail("--max-steps and --max-epochs conflict: give at most one (neither runs until stopped)")
        for name in ("max_steps", "max_epochs", "min_samples_per_checkpoint", "keep_last_checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch_size > MAX_BATCH_SIZE:  # every rank holds and packs the whole global batch's indices
            fail(f"--batch-size must be <= {MAX_BATCH_SIZE}, got {self.batch_size}")
        for name in ("learning_rate", "max_grad_norm", "weight_decay", "eps", "beta1", "beta2"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                fail(f"--{name.replace('_', '-')} must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not getattr(self, name) < 1:
                fail(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.num_warmup_steps < 0:
            fail(f"--num-warmup-steps must be >= 0, got {self.num_warmup_steps}")
        if not 0 <= self.seed < 2**63:
            fail(f"--seed must be in [0, 2**63), got {self.seed}")
        dtypes = ("float32", "bfloat16", "float16")
        for name in ("train_dtype", "compute_dtype", "save_dtype"):
            if getattr(self, name) not in (None, *dtypes):
                fail(f"--{name.replace('_', '-')} must be one of {', '.join(dtypes)}, got {getattr(self, name)}")
        if self.resume and self.resume_from:
            fail("--resume and --resume-from conflict: give at most one")
        if self.overwrite and self.resume:
            fail("--overwrite and --resume conflict: --overwrite deletes the checkpoints --resume would continue")
        if self.validation_data_path is not None and self.validation_split is not None:
            fail("--validation-data-path and --validation-split conflict: give at most one")
        if self.validation_split is not None and not 0 < self.validation_split < 1:
            fail(f"--validation-split must be a fraction in (0, 1), got {self.validation_split}")
        if self.validation_frequency is not None and self.validation_frequency < 1:
            fail(f"--validation-frequency must be >= 1, got {self.validation_frequency}")
        has_validation = self.validation_data_path is not None or self.validation_split is not None
        if (self.validation_frequency is not None or self.keep_best_checkpoint) and not has_validation:
            fail("--validation-frequency and --keep-best-checkpoint need --validation-data-path or --validation-split")
        for flag, package in (("wandb_project", "wandb"), ("tensorboard_dir", "tensorboard")):
            if getattr(self, flag) is not None and importlib.util.find_spec(package) is None:
                fail(f"--{flag.replace('_', '-')} needs the {package} package: pip install -e '.[trackers]'")
        if self.osft and self.osft_unfreeze_rank_ratio is None:
            fail("--osft needs --osft-unfreeze-rank-ratio (the fraction of singular directions that train)")
        if not self.osft and (self.osft_unfreeze_rank_ratio is not None or self.osft_target_patterns is not None):
            fail("--osft-unfreeze-rank-ratio and --osft-target-patterns need --osft")
        if self.osft_unfreeze_rank_ratio is not None and not 0 <= self.osft_unfreeze_rank_ratio <= 1:
            fail(f"--osft-unfreeze-rank-ratio must be in [0, 1], got {self.osft_unfreeze_rank_ratio}")
        if self.loss not in LOSSES:
            fail(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss}")


def total_steps(cfg: TrainConfig, num_samples: int, step: int = 0, samples_seen: int = 0) -> int | None:
    """The run's length in steps, counted from where it starts (`step` steps and `samples_seen` samples done, as in
    the checkpoint it resumes): --max-steps, or the steps that draw the rest of --max-epochs' samples, as
    batch_sizes() will (a grown run's earlier launch may have ended on a short step, which a count from 0 misses)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.max_epochs is not None:
        left = cfg.max_epochs * num_samples - samples_seen  # integers: exact for any length
        return step + max(0, -(-left // cfg.batch_size))
    return None


def batch_sizes(cfg: TrainConfig, num_samples: int, step: int, samples_seen: int):
    """Samples per step from the current position on: batch_size each, the last one shorter so that
    --max-epochs ends after exactly that many passes; endless when no length is set."""
    limit = cfg.max_epochs * num_samples if cfg.max_epochs is not None else None
    while cfg.max_steps is None or step < cfg.max_steps:
        count = cfg.batch_size if limit is None else min(cfg.batch_size, limit - samples_seen)
        if count <= 0:
            return
        yield count
        step, samples_seen = step + 1, samples_seen + count


def training_params(cfg: TrainConfig, dist) -> dict:
    """The resolved flags of this launch, with the world size and library versions."""
    import numba
    import numpy
    import torch
    import transformers

    return asdict(cfg) | {
        "world_size": dist.world_size,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numba": numba.__version__,
            "numpy": numpy.__version__,
        },
    }


def resume_settings(cfg: TrainConfig, identity: dict) -> dict:
    """What a resume must repeat: the model's and the data's fingerprints, and every MATCH flag."""
    matched = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig) if f.metadata["resume"] == MATCH}
    return {"model": identity["model"], "data": identity["data"]} | matched


# What each MATCH flag was before it existed: an older checkpoint that lacks the setting is compared with it.
SETTINGS_BEFORE = {f.name: f.metadata["before"] for f in fields(TrainConfig) if f.metadata["resume"] == MATCH}


def find_start(cfg, output_dir: Path, dist, sampler, settings: dict, num_samples: int):
    """With --resume/--resume-from: the checkpoint to start from (its settings checked), else None; and the run's
    length in steps from there, which must reach the checkpoint's step."""
    import checkpoint

    found = checkpoint.resume_state(cfg, output_dir, dist, sampler.check_state, settings, SETTINGS_BEFORE)
    state = found[1]["state"] if found else {"step": 0, "samples_seen": 0}
    num_steps = total_steps(cfg, num_samples, state["step"], state["samples_seen"])
    if found and cfg.max_epochs is not None and state["samples_seen"] > cfg.max_epochs * num_samples:
        fail(
            f"cannot resume from {found[0]}: --max-epochs {cfg.max_epochs} draws {cfg.max_epochs * num_samples} "
            f"samples, and the checkpoint has drawn {state['samples_seen']}"
        )
    if found and num_steps is not None and num_steps < state["step"]:
        fail(
            f"cannot resume from {found[0]}: the run length ({num_steps} steps) is below the checkpoint's step "
            f"{state['step']}"
        )
    return found, num_steps


def resume(found, cfg, dist, model, optimizer, scheduler, sampler, saver, num_steps):
    """The checkpoint's state, loaded (a fresh TrainState at step 0 when `found` is None)."""
    import checkpoint
    import setup_model

    if found is None:
        return checkpoint.TrainState()
    path, meta = found
    state = checkpoint.load(path, meta, model, optimizer, sampler, dist)
    saver.resumed(meta, state)
    # The lr of step t is the schedule of this launch's length at t (a longer run changes the curve from here on).
    setup_model.move_scheduler_to(scheduler, state.step)
    log(f"resumed from {path} at step {state.step} ({state.samples_seen} samples seen)")
    if meta["num_steps"] != num_steps:
        old_lr = setup_model.lr_at(cfg, meta["num_steps"], state.step)
        log(
            f"the run length changed ({meta['num_steps']} -> {num_steps} steps): step {state.step + 1} uses lr "
            f"{scheduler.get_last_lr()[0]:.4g} (the checkpoint's schedule: {old_lr:.4g})"
        )
    saver.complete_resumed(model, path, state)
    return state


def load_data(cfg: TrainConfig, model_config):
    """The training samples and the validation samples (None without validation), checked against the model."""
    import numpy as np

    from sampler import load_tokenized, select_samples

    def load(path):
        return load_tokenized(
            path,
            cfg.max_tokens_per_gpu,
            model_config.vocab_size,
            max_positions=getattr(model_config.get_text_config(), "max_position_embeddings", None),
            drop_overlong=cfg.drop_overlong_samples,
        )

    data = load(cfg.data_path)
    val = load(cfg.validation_data_path) if cfg.validation_data_path else None
    if cfg.validation_split is not None:
        count = max(1, round(cfg.validation_split * len(data)))
        if count >= len(data):
            fail(
                f"--validation-split {cfg.validation_split} leaves no training sample of the {len(data)} in {cfg.data_path}"
            )
        held_out = np.zeros(len(data), dtype=bool)
        held_out[np.random.default_rng(cfg.seed).permutation(len(data))[:count]] = True  # by seed, reproducible
        data, val = select_samples(data, ~held_out), select_samples(data, held_out)
    if val is not None and val.num_loss_counted_tokens.sum() == 0:
        fail("the validation samples have no labelled token to measure val_loss on")
    return data, val


class Validation:
    """val_loss: the exact token-weighted mean over the whole held-out set across ranks, packed and computed like
    the training loss, without gradients. Due every `every` steps and at the end."""

    def __init__(self, data, cfg: TrainConfig, dist, pad_id: int, num_steps: int | None, packing):
        import numpy as np

        self.data, self.dist, self.pad_id = data, dist, pad_id
        # The held-out set never changes: pack it once, this rank's minibatches of sample indices.
        self.plan = (
            packing.plan(data, np.arange(len(data)), cfg.max_tokens_per_gpu, dist.world_size)[dist.rank]
            if data is not None
            else []
        )
        self.every = cfg.validation_frequency or (math.ceil(num_steps / 10) if num_steps else None)
        self.last_step = None

    def due(self, step: int, final: bool = False) -> bool:
        if self.data is None or step == self.last_step or step == 0:
            return False
        return final or (self.every is not None and step % self.every == 0)

    def run(self, model, step: int) -> dict:
        import torch

        import setup_model
        from sampler import collate
        from utils import all_reduce_sum

        timer, device = Timer(), self.dist.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        model.eval()
        with torch.no_grad():
            for indices in self.plan:  # every rank runs as many minibatches (some empty): FSDP's collectives line up
                loss_sum += forward_loss_sum(model, collate(self.data, indices, self.pad_id), device)
        model.train()
        setup_model.reshard(model)  # a no-grad forward leaves FSDP's root gathered: the optimizer needs the shards
        num_tokens = int(self.data.num_loss_counted_tokens.sum())
        val_loss = all_reduce_sum([loss_sum.item()], device)[0] / num_tokens
        self.last_step = step
        return {
            "step": step,
            "val_loss": val_loss,
            "val_num_loss_counted_tokens": num_tokens,
            "val_time": timer.elapsed(),
            "timestamp": time.time(),
        }


def validate(validation, model, optimizer, state, metrics, saver):
    """Measure val_loss, log it as its own row, and let --keep-best-checkpoint save an improvement."""
    row = validation.run(model, state.step)
    metrics.write_validation(row)
    saver.note_validation(row["val_loss"], model, optimizer, state)


def val_loss_logged(dist, output_dir, step: int) -> bool:
    """Whether the run's metrics file has a val_loss row for `step` (rank 0 reads it; every rank gets its answer)."""
    from batch_metrics import read_metrics
    from utils import any_rank

    found = False
    if dist.is_main:
        with contextlib.suppress(UserError):  # no file, or no step in it: measure again
            found = any(row["step"] == step for row in read_metrics(output_dir)[1])
    return any_rank(found, dist.device)


def forward_loss_sum(model, mb, device):
    """Summed cross-entropy of one padding-free minibatch (moved to the device here)."""
    return model(**mb.inputs(device))


def clip_gradients(model, max_norm: float) -> float:
    """Global gradient norm before clipping (FSDP2 grads are DTensors: the norm covers every rank's shard)."""
    import torch

    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def check_finite(step: int, loss: float, grad_norm: float):
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        fail(f"step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); stopped before the optimizer step")


def take_optimizer_step(optimizer, scheduler) -> float:
    """AdamW step, then advance the schedule; returns the learning rate the step used."""
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


def train(cfg: TrainConfig):
    """Check the flags, start the process group, train, stop the process group. The Python API: a bad flag, path
    or file raises utils.UserError; the output-folder lock and the process group are released on any exit."""
    import run_folder
    import setup_model
    from utils import check_can_create, destroy_distributed, init_distributed

    cfg.validate()
    setup_model.check_scheduler(cfg)
    check_can_create(Path(cfg.output_dir), f"--output-dir {cfg.output_dir}")
    run_folder.check_output_dir(cfg)
    model_config = setup_model.check_model_path(cfg.model_name_or_path)
    dist = init_distributed()
    try:
        run_training(cfg, dist, model_config)
    finally:
        destroy_distributed()


def run_training(cfg: TrainConfig, dist, model_config):
    """The whole run inside a started process group (tests train several models in one)."""
    import torch

    import checkpoint
    import run_folder
    import setup_model
    from batch_metrics import MetricsLog, tracking
    from sampler import GlobalSampler

    cfg.compute_dtype = cfg.compute_dtype or ("bfloat16" if dist.device.type == "cuda" else "float32")
    cfg.save_dtype = cfg.save_dtype or checkpoint.loaded_dtype(model_config)
    torch.manual_seed(cfg.seed)

    data, val_data = load_data(cfg, model_config)
    if cfg.batch_size > len(data):
        log(f"note: --batch-size {cfg.batch_size} is more than the {len(data)} samples: a step repeats samples")
    model = setup_model.setup_model(cfg, dist, model_config)
    optimizer = setup_model.build_optimizer(cfg, model, dist.device)
    sampler = GlobalSampler(len(data), cfg.seed)
    settings = resume_settings(cfg, checkpoint.run_identity(model_config, data))
    pad_id = model_config.pad_token_id or 0
    log(
        f"data: {len(data)} samples, {int(data.lengths.sum())} tokens; world size {dist.world_size}"
        + (f"; validation: {len(val_data)} samples" if val_data is not None else "")
    )
    # --resume-from's checkpoint is checked now, before --overwrite may delete the folder's run for it.
    given = find_start(cfg, Path(cfg.output_dir), dist, sampler, settings, len(data)) if cfg.resume_from else None
    # Until here the run only read: the output folder is made and locked now, and a failure before the first
    # finished step removes what the run created.
    with run_folder.claimed_output_dir(cfg, dist) as out:
        found, num_steps = given or find_start(cfg, out.path, dist, sampler, settings, len(data))
        log(f"steps: {num_steps}" if num_steps else "no length set: running until stopped")
        scheduler = setup_model.build_scheduler(cfg, optimizer, num_steps)
        validation = Validation(val_data, cfg, dist, pad_id, num_steps, model.packing)
        saver = checkpoint.Saver(cfg, out.path, dist, model_config, settings, num_steps)
        state = resume(found, cfg, dist, model, optimizer, scheduler, sampler, saver, num_steps)
        params = training_params(cfg, dist)
        out.record_launch(params, state.step)
        with (
            saver.catching_preemption(),
            tracking(cfg, out.path, params, state.step, dist.is_main) as trackers,
            MetricsLog(out.path, dist.is_main, num_steps, trackers) as metrics,  # its progress bar stops on any exit
        ):
            train_steps(
                cfg, dist, model, optimizer, scheduler, data, sampler, pad_id, state, saver, validation, metrics
            )


def train_steps(cfg, dist, model, optimizer, scheduler, data, sampler, pad_id, state, saver, validation, metrics):
    """The loop: sample -> pack -> forward -> scale -> backward -> step -> log -> maybe validate -> maybe save."""
    import torch

    from batch_metrics import step_metrics
    from sampler import Prefetcher
    from utils import all_reduce_sum

    start_step, preempted = state.step, False
    with Prefetcher(
        data,
        sampler,
        batch_sizes(cfg, len(data), state.step, state.samples_seen),
        cfg.max_tokens_per_gpu,
        dist.rank,
        dist.world_size,
        pad_id,
        model.packing,  # e.g. padded batches: at most max_tokens_per_gpu tokens padding included
    ) as steps:  # closed on any exit: no thread left running when the process ends
        step_timer = Timer()
        for batch in steps:  # sampled, packed and collated one step ahead, in a background thread
            step = state.step + 1
            loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
            for mb in batch.minibatches:
                loss = forward_loss_sum(model, mb, dist.device)
                # The exact per-token mean over the whole global batch; x world size cancels FSDP's gradient mean.
                (loss * dist.world_size / batch.num_loss_tokens).backward()
                loss_sum += loss.detach()
            grad_norm = clip_gradients(model, cfg.max_grad_norm)
            loss = all_reduce_sum([loss_sum.item()], dist.device)[0] / batch.num_loss_tokens
            check_finite(step, loss, grad_norm)  # loss and norm are global: every rank decides alike
            lr = take_optimizer_step(optimizer, scheduler)
            state.advance(batch)
            metrics.write(
                step_metrics(
                    step=step,
                    batch=batch,
                    lr=lr,
                    loss=loss,
                    grad_norm=grad_norm,
                    time_per_step=step_timer.elapsed(),
                    state=state,
                    device=dist.device,
                )
            )
            if validation.due(state.step):
                validate(validation, model, optimizer, state, metrics, saver)
            if preempted := saver.maybe_save(model, optimizer, state):
                break  # a preemption signal arrived: saved, now exit cleanly
            step_timer = Timer()  # after any validation or save: neither is part of the next step's time
    # The end: a launch that resumed at the end has its step's val_loss from the last one, unless that one was
    # killed after its last save and before measuring it. A preempted launch measures nothing: its grace period
    # is short, and the run is not at its end.
    if (
        not preempted
        and validation.due(state.step, final=True)
        and (state.step > start_step or not val_loss_logged(dist, saver.output_dir, state.step))
    ):
        validate(validation, model, optimizer, state, metrics, saver)
    saver.save_final(model, optimizer, state)
    if state.step == start_step:
        log(f"nothing to do: the run already reached step {state.step}")
    log(f"done: {state.step} steps, {state.samples_seen} samples, {state.tokens_seen} tokens")


def launch(cfg: TrainConfig, nproc_per_node: int, torchrun_args: tuple[str, ...] = ("--standalone",), on_output=None):
    """Run `cfg` under torchrun with several processes on this machine (from a notebook or a sweep script): the
    same config, as the CLI's flags; torchrun's own flags go before train.py (--standalone: a free port, so that
    launches can run side by side). The run's output (stdout and stderr, merged) streams line by line to
    `on_output` (default: this process's stdout, so that a notebook sees progress). Returns the finished process,
    its whole output in `.stdout`; raises UserError with the run's error line if it fails."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc_per_node), *torchrun_args]
    argv.append(str(Path(__file__).resolve()))
    for f in fields(TrainConfig):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, bool):  # switches: --x/--no-x (typer's default form where none is named)
            on, _, off = (f.metadata["flags"] or (f"{flag}/--no-{flag[2:]}",))[0].partition("/")
            argv += [on] if value else [off] if off else []
        elif value is not None:
            argv += [flag, str(value)]
    on_output = on_output or (lambda line: print(line, end="", flush=True))
    lines = []
    # torchrun starts its workers unbuffered (python -u): their lines come as they are printed.
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line)
            on_output(line)
    output = "".join(lines)
    if proc.returncode != 0:
        errors = [line for line in lines if line.startswith("error: ")]
        fail(
            errors[0].removeprefix("error: ").rstrip()
            if errors
            else f"torchrun exited {proc.returncode}: {output[-2000:]}"
        )
    return subprocess.CompletedProcess(argv, proc.returncode, output, None)


def _cli_from_config(run):
    """A typer command whose options are TrainConfig's fields (one typed config, no second list of flags)."""
    params, annotations = [], {}
    for f in fields(TrainConfig):
        default = ... if f.default is MISSING else f.default
        opt = typer.Option(default, *f.metadata["flags"], help=f.metadata["help"])
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=f.type))
        annotations[f.name] = f.type

    def command(**kwargs):
        run(TrainConfig(**kwargs))

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = annotations
    command.__doc__ = __doc__.split("\n\n")[0]
    return command


def main(argv=None):
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    app.command()(_cli_from_config(exit_on_user_error(train)))
    app(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
