"""The run's typed configuration: every flag of train.py is a field of TrainConfig, with its default, help, switch
names and resume rule in one place; the checks that need no model or data."""

import importlib.util
import math
from dataclasses import MISSING, dataclass, field, fields

from utils import fail

LOSSES = ("auto", "chunked", "model", "liger")  # setup_model implements them (imported lazily: --help stays fast)
MUON_ADJUST_LR = ("match_rms_adamw", "original")  # torch.optim.Muon's adjust_lr_fn
OSFT_RANK_ALLOCATIONS = ("global", "importance")  # osft.target_ranks
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
    data_path: str = option(
        help="Tokenized JSONL written by process_data.py. Several sources: [NAME=]PATH[:WEIGHT], comma-separated "
        "(NAME: the file's stem by default); with weights a mixture, each step drawn from the sources by weight "
        "(a source without one counts 1); without, the sources concatenated in the order given.",
        resume=FREE,
    )
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
    learning_rate: float = option(
        1e-5,
        "Peak learning rate: AdamW's (with --optimizer muon, the AdamW group's, and the Muon group's unless "
        "--muon-learning-rate is given).",
        resume=MATCH,
    )
    num_warmup_steps: int = option(0, "Linear warmup steps.", resume=MATCH)
    lr_scheduler: str = option(
        "constant_with_warmup", "Any transformers.get_scheduler name (cosine, linear, ...).", resume=MATCH
    )
    seed: int = option(42, "Seed of the data order and of torch.", resume=MATCH)
    beta1: float = option(0.9, "AdamW beta1 (with --optimizer muon: the AdamW group's only).", resume=MATCH)
    beta2: float = option(0.95, "AdamW beta2 (with --optimizer muon: the AdamW group's only).", resume=MATCH)
    eps: float = option(1e-8, "AdamW epsilon (with --optimizer muon: the AdamW group's only).", resume=MATCH)
    weight_decay: float = option(
        0.0,
        "Decoupled weight decay of every trained parameter: p -= lr x wd x p, lr the group's scheduled rate (with "
        "--optimizer muon: both groups', Muon's with its lr before the shape scaling).",
        resume=MATCH,
    )
    optimizer: str = option(
        "adamw",
        "adamw: AdamW over every trained parameter. muon: torch.optim.Muon (torch >= 2.9) over the decoder layers' "
        "2-D weights, AdamW over the rest (embeddings, LM head, norms, biases, OSFT's factors); one schedule "
        "multiplies both groups' peak rates.",
        resume=MATCH,
        before="adamw",
    )
    muon_learning_rate: float | None = option(
        None,
        "muon: peak learning rate of the Muon group (default: --learning-rate), scaled per weight by its shape "
        "(--muon-adjust-lr).",
        resume=MATCH,
    )
    muon_momentum: float = option(0.95, "muon: Muon's (Nesterov) momentum, in [0, 1).", resume=MATCH)
    muon_adjust_lr: str = option(
        "match_rms_adamw",
        "muon: how Muon scales its lr by each weight's whole (unsharded) shape A x B: match_rms_adamw, lr x 0.2 x "
        "sqrt(max(A, B)) (updates of AdamW's RMS: AdamW's lr and weight decay carry over), or original, lr x "
        "sqrt(max(1, A / B)) (Keller Jordan's: expects a Muon lr like 0.02).",
        resume=MATCH,
    )
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
    # sampling (sampler.py)
    sampler: str = option(
        "uniform",
        "Which samples each step draws: uniform (a seeded permutation per epoch) or loss-aware (sample i with "
        "probability ~ its last per-token loss ** --loss-aware-power, mixed with --loss-aware-uniform).",
        resume=MATCH,
    )
    loss_aware_power: float = option(
        1.0, "loss-aware: the power of each sample's last per-token loss (0: uniform).", resume=MATCH
    )
    loss_aware_uniform: float = option(
        0.1, "loss-aware: the share of every draw's probability spread uniformly (in [0, 1]).", resume=MATCH
    )
    log_loss_quantiles: bool = option(
        False,
        "Log the step's per-sample loss distribution: loss_p10, loss_p50, loss_p90 of the samples' per-token losses.",
        ("--log-loss-quantiles",),
        resume=FREE,
    )
    # validation
    validation_data_path: str | None = option(
        None,
        "Tokenized JSONL to measure val_loss on (no gradient). Several sets: [NAME=]PATH, comma-separated; each "
        "one's val_loss/NAME is logged, and val_loss is the first set's.",
        resume=FREE,
    )
    validation_split: float | None = option(
        None,
        "Hold out this fraction of --data-path's samples (chosen by --seed; of each source's, one set per source) "
        "to measure val_loss on.",
        resume=MATCH,
    )
    validation_frequency: int | None = option(
        None,
        "Measure val_loss (and generate the samples of --generation-prompts-path) every this many steps, and at the "
        "end. Default: every 10% of a known run length.",
        resume=FREE,
    )
    keep_best_checkpoint: bool = option(
        False,
        "Save a checkpoint whenever val_loss improves; pruning never deletes the best one.",
        ("--keep-best-checkpoint",),
        resume=FREE,
    )
    best_checkpoint_set: str | None = option(
        None,
        "The validation set (its NAME) whose val_loss --keep-best-checkpoint watches. Default: the first.",
        resume=FREE,
    )
    # generation samples (generation.py)
    generation_prompts_path: str | None = option(
        None,
        'JSONL of a handful of prompts ({"messages": [...]} per line, rendered by the chat template): at each '
        "validation (--validation-frequency; also without a validation set) every rank joins one batched greedy "
        "generate with the current weights, written to output_dir/generations.jsonl and the trackers.",
        resume=FREE,
    )
    generation_max_new_tokens: int = option(
        64, "Tokens generated per prompt of --generation-prompts-path (fewer where it ends).", resume=FREE
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
    osft_rank_allocation: str = option(
        "global",
        "OSFT: each target's frozen rank k. global: floor((1 - r) R) for every target. importance: from its "
        "decoder layer's importance on --osft-calibration-data-path (input/output similarity, as in the paper), "
        "the unfrozen directions of all targets together the fraction r. Chosen once: saved in checkpoints, reused "
        "on resume.",
        resume=MATCH,
    )
    osft_calibration_data_path: str | None = option(
        None,
        "OSFT importance: tokenized JSONL (process_data.py) of what the model should keep; up to its first 16,384 "
        "tokens are used. Read only when the ranks are chosen (not on resume).",
        resume=FREE,
    )
    osft_train_non_targets: bool = option(
        True,
        "OSFT: whether everything that is not a target (embeddings, LM head, norms, biases) trains beside the "
        "targets' factors, or stays as loaded.",
        ("--osft-train-non-targets/--osft-freeze-non-targets",),
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
        self.validate_optimizer()
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
        if self.keep_best_checkpoint and not has_validation:
            fail("--keep-best-checkpoint needs --validation-data-path or --validation-split")
        if self.validation_frequency is not None and not (has_validation or self.generation_prompts_path):
            fail("--validation-frequency needs --validation-data-path, --validation-split or --generation-prompts-path")
        if self.generation_prompts_path is None and (given := self.flags_given("generation_")):
            fail(f"{', '.join(given)} need --generation-prompts-path")
        if self.generation_max_new_tokens < 1:
            fail(f"--generation-max-new-tokens must be >= 1, got {self.generation_max_new_tokens}")
        for flag, package in (("wandb_project", "wandb"), ("tensorboard_dir", "tensorboard")):
            if getattr(self, flag) is not None and importlib.util.find_spec(package) is None:
                fail(f"--{flag.replace('_', '-')} needs the {package} package: pip install -e '.[trackers]'")
        if self.osft and self.osft_unfreeze_rank_ratio is None:
            fail("--osft needs --osft-unfreeze-rank-ratio (the fraction of singular directions that train)")
        if (given := self.flags_given("osft_")) and not self.osft:
            fail(f"{', '.join(given)} need --osft")
        if self.osft_rank_allocation not in OSFT_RANK_ALLOCATIONS:
            fail(
                f"--osft-rank-allocation must be one of {', '.join(OSFT_RANK_ALLOCATIONS)}, got "
                f"{self.osft_rank_allocation}"
            )
        if (self.osft_rank_allocation == "importance") != (self.osft_calibration_data_path is not None):
            fail("--osft-rank-allocation importance and --osft-calibration-data-path go together")
        if self.osft_unfreeze_rank_ratio is not None and not 0 <= self.osft_unfreeze_rank_ratio <= 1:
            fail(f"--osft-unfreeze-rank-ratio must be in [0, 1], got {self.osft_unfreeze_rank_ratio}")
        if self.loss not in LOSSES:
            fail(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss}")
        from sampler import CHOICES  # here, not at import: --help stays fast

        if self.sampler not in CHOICES:
            fail(f"--sampler must be one of {', '.join(CHOICES)}, got {self.sampler}")
        self.validate_sources()
        if not (math.isfinite(self.loss_aware_power) and self.loss_aware_power >= 0):
            fail(f"--loss-aware-power must be a finite number >= 0, got {self.loss_aware_power}")
        if not 0 <= self.loss_aware_uniform <= 1:
            fail(f"--loss-aware-uniform must be in [0, 1], got {self.loss_aware_uniform}")

    def flags_given(self, prefix: str) -> list[str]:
        """The flags of a feature (fields named prefix...) set to other than their default."""
        return [
            f"--{f.name.replace('_', '-')}"
            for f in fields(self)
            if f.name.startswith(prefix) and getattr(self, f.name) != f.default
        ]

    def validate_sources(self):
        """--data-path's and --validation-data-path's grammar, and what names a validation set."""
        from dataset import parse_sources

        sources = parse_sources(self.data_path, "--data-path")
        sets = sources if self.validation_split is not None else []  # a split holds out one set per source
        if self.validation_data_path is not None:
            sets = parse_sources(self.validation_data_path, "--validation-data-path", weights=False)
        if len(sources) > 1 and self.sampler == "loss-aware":
            fail("--sampler loss-aware takes one --data-path source (several are drawn uniformly or by weight)")
        if self.best_checkpoint_set is not None:
            if not self.keep_best_checkpoint:
                fail("--best-checkpoint-set needs --keep-best-checkpoint")
            if self.best_checkpoint_set not in [s.name for s in sets]:
                fail(
                    f"--best-checkpoint-set {self.best_checkpoint_set}: no validation set of that name (the sets: "
                    f"{', '.join(s.name for s in sets)})"
                )

    def validate_optimizer(self):
        """--optimizer and its hyper-parameters (the betas, eps and weight decay are checked with the others)."""
        import torch

        from optimizers import OPTIMIZERS  # here, not at import: --help stays fast

        if self.optimizer not in OPTIMIZERS:
            fail(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer}")
        if self.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
            fail(f"--optimizer muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}")
        if (given := self.flags_given("muon_")) and self.optimizer != "muon":
            fail(f"{', '.join(given)} need --optimizer muon")
        if self.muon_learning_rate is not None and not (
            math.isfinite(self.muon_learning_rate) and self.muon_learning_rate >= 0
        ):
            fail(f"--muon-learning-rate must be a finite number >= 0, got {self.muon_learning_rate}")
        if not 0 <= self.muon_momentum < 1:
            fail(f"--muon-momentum must be in [0, 1), got {self.muon_momentum}")
        if self.muon_adjust_lr not in MUON_ADJUST_LR:
            fail(f"--muon-adjust-lr must be one of {', '.join(MUON_ADJUST_LR)}, got {self.muon_adjust_lr}")


def resume_settings(cfg: TrainConfig, identity: dict) -> dict:
    """What a resume must repeat: the model's and the data's fingerprints, and every MATCH flag."""
    matched = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig) if f.metadata["resume"] == MATCH}
    return {"model": identity["model"], "data": identity["data"]} | matched


# What each MATCH flag was before it existed: an older checkpoint that lacks the setting is compared with it.
SETTINGS_BEFORE = {f.name: f.metadata["before"] for f in fields(TrainConfig) if f.metadata["resume"] == MATCH}
