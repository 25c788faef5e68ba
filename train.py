"""Fine-tune a Hugging Face causal LM: FSDP2, padding-free packed minibatches, an exact per-token loss.

    torchrun --nproc-per-node 8 train.py --model-name-or-path MODEL --data-path data.jsonl --output-dir out \
        --batch-size 128 --max-tokens-per-gpu 16384 --learning-rate 1e-5 --max-epochs 3

`python train.py ...` (no torchrun) runs as one process. Every flag is a field of `config.TrainConfig`.
"""

import inspect
import math
import platform
import subprocess
import sys
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import typer

from config import SETTINGS_BEFORE, TrainConfig, resume_settings
from utils import Timer, exit_on_user_error, fail, log


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


def find_start(cfg, output_dir: Path, dist, settings: dict, num_samples: int):
    """With --resume/--resume-from: the checkpoint to start from (its settings checked), else None; and the run's
    length in steps from there, which must reach the checkpoint's step."""
    import checkpoint

    found = checkpoint.resume_state(cfg, output_dir, dist, settings, SETTINGS_BEFORE)
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
    import optimizers

    if found is None:
        return checkpoint.TrainState()
    path, meta = found
    state = checkpoint.load(path, meta, model, optimizer, sampler, dist)
    saver.resumed(meta, state)
    # The lr of step t is the schedule of this launch's length at t (a longer run changes the curve from here on).
    optimizers.move_scheduler_to(scheduler, state.step)
    log(f"resumed from {path} at step {state.step} ({state.samples_seen} samples seen)")
    if meta["num_steps"] != num_steps:
        old_lr = optimizers.lr_at(cfg, meta["num_steps"], state.step)
        log(
            f"the run length changed ({meta['num_steps']} -> {num_steps} steps): step {state.step + 1} uses lr "
            f"{scheduler.get_last_lr()[0]:.4g} (the checkpoint's schedule: {old_lr:.4g})"
        )
    saver.complete_resumed(model, path, state)
    return state


def load_data(cfg: TrainConfig, model_config):
    """The training samples (every --data-path source, concatenated in order), the validation sets as
    [(name, samples)] (none without validation) and the training sources (dataset.Sources), checked against the
    model. --validation-split holds out that fraction of each source, one set per source."""
    import numpy as np

    from dataset import Sources, concat_samples, load_tokenized, parse_sources, select_samples

    def load(path, flag):
        return load_tokenized(
            path,
            cfg.max_tokens_per_gpu,
            model_config.vocab_size,
            max_positions=getattr(model_config.get_text_config(), "max_position_embeddings", None),
            drop_overlong=cfg.drop_overlong_samples,
            flag=flag,
        )

    sources = parse_sources(cfg.data_path, "--data-path")
    parts = [load(s.path, "--data-path") for s in sources]
    val_sets = []
    if cfg.validation_data_path:
        specs = parse_sources(cfg.validation_data_path, "--validation-data-path", weights=False)
        val_sets = [(s.name, load(s.path, "--validation-data-path")) for s in specs]
    if cfg.validation_split is not None:
        for k, (source, data) in enumerate(zip(sources, parts)):
            count = max(1, round(cfg.validation_split * len(data)))
            if count >= len(data):
                fail(
                    f"--validation-split {cfg.validation_split} leaves no training sample of the {len(data)} in "
                    f"{source.path}"
                )
            held_out = np.zeros(len(data), dtype=bool)
            held_out[np.random.default_rng(cfg.seed).permutation(len(data))[:count]] = True  # by seed, reproducible
            parts[k] = select_samples(data, ~held_out)
            val_sets.append((source.name, select_samples(data, held_out)))
    for name, val in val_sets:
        if val.num_loss_counted_tokens.sum() == 0:
            fail(f"the validation samples ({name}) have no labelled token to measure val_loss on")
    return concat_samples(parts), val_sets, Sources.of(sources, parts)


def train_minibatch(model, mb, scale: float, sums, device):
    """Forward and backward of one minibatch (loss x scale), its summed loss added into sums[0] and, where sums
    has a slot per sample of the step, each target's loss into its sample's: all on the device, no host sync."""
    losses = model(**mb.inputs(device))
    (losses.total * scale).backward()
    sums[0] += losses.total.detach()
    if len(sums) > 1:
        sums[1:].index_add_(0, mb.target_sample.to(device), losses.per_target.double())


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


def train(cfg: TrainConfig) -> str:
    """Check the flags, start the process group, train, stop the process group. The Python API: a bad flag, path
    or file raises utils.UserError; the output-folder lock and the process group are released on any exit.
    Returns how the run ended: "finished" (its length reached, or none set and the data ran out) or
    "saved-on-signal" (SIGTERM/SIGUSR1: checkpoint saved, more to do)."""
    import optimizers
    import run_folder
    import setup_model
    from utils import check_can_create, destroy_distributed, init_distributed

    cfg.validate()
    optimizers.check_scheduler(cfg)
    check_can_create(Path(cfg.output_dir), f"--output-dir {cfg.output_dir}")
    run_folder.check_output_dir(cfg)
    model_config = setup_model.check_model_path(cfg.model_name_or_path)
    dist = init_distributed()
    try:
        return run_training(cfg, dist, model_config)
    finally:
        destroy_distributed()


def run_training(cfg: TrainConfig, dist, model_config) -> str:
    """The whole run inside a started process group (tests train several models in one); how it ended (train())."""
    import torch

    import checkpoint
    import optimizers
    import run_folder
    import setup_model
    from batch_metrics import MetricsLog, SourceMetrics, tracking
    from generation import load_prompts
    from sampler import build_sampler
    from validation import Validation

    cfg.compute_dtype = cfg.compute_dtype or ("bfloat16" if dist.device.type == "cuda" else "float32")
    cfg.save_dtype = cfg.save_dtype or checkpoint.loaded_dtype(model_config)
    torch.manual_seed(cfg.seed)

    prompts = load_prompts(cfg)  # --generation-prompts-path: a bad file stops the run now, not at its first samples
    data, val_sets, sources = load_data(cfg, model_config)
    if cfg.batch_size > len(data):
        log(f"note: --batch-size {cfg.batch_size} is more than the {len(data)} samples: a step repeats samples")
    sampler = build_sampler(cfg, len(data), sources)
    # Per-sample losses: what a sampler that observes sees, the loss quantiles and each source's loss are made of.
    per_sample = sampler.observes or cfg.log_loss_quantiles or len(sources.names) > 1
    if per_sample and cfg.loss not in setup_model.PER_TARGET_LOSSES:
        fail(
            f"--sampler {cfg.sampler} / --log-loss-quantiles / several --data-path sources need per-sample losses, "
            f"which --loss {cfg.loss} does not give"
        )
    settings = resume_settings(cfg, checkpoint.run_identity(model_config, sources)) | sources.settings()
    pad_id = model_config.pad_token_id or 0
    log(
        f"data: {len(data)} samples, {int(data.lengths.sum())} tokens; world size {dist.world_size}"
        + (f"; sources ({sources.describe()})" if len(sources.names) > 1 else "")
        + (f"; validation: {', '.join(f'{n} {len(v)}' for n, v in val_sets)} samples" if val_sets else "")
    )
    # --resume-from's checkpoint is checked now, before --overwrite may delete the folder's run for it.
    given = find_start(cfg, Path(cfg.output_dir), dist, settings, len(data)) if cfg.resume_from else None
    # Until here the run only read: the output folder is made and locked now, and a failure before the first
    # finished step removes what the run created.
    with run_folder.claimed_output_dir(cfg, dist) as out:
        found, num_steps = given or find_start(cfg, out.path, dist, settings, len(data))
        # The model is built to the checkpoint's shape: OSFT's frozen ranks are the checkpoint's, never chosen again.
        model = setup_model.setup_model(cfg, dist, model_config, found and found[1].get("osft_ranks"))
        optimizer = optimizers.build_optimizer(cfg, model, dist.device)
        log(f"steps: {num_steps}" if num_steps else "no length set: running until stopped")
        scheduler = optimizers.build_scheduler(cfg, optimizer, num_steps)
        validation = Validation(val_sets, cfg, dist, pad_id, num_steps, model.packing, prompts)
        saver = checkpoint.Saver(cfg, out.path, dist, model_config, settings, num_steps)
        state = resume(found, cfg, dist, model, optimizer, scheduler, sampler, saver, num_steps)
        per_source = SourceMetrics(sources, state.sampler) if len(sources.names) > 1 else None
        params = training_params(cfg, dist)
        out.record_launch(params, state.step)
        with (
            saver.catching_preemption(),
            tracking(cfg, out.path, params, state.step, dist.is_main) as trackers,
            MetricsLog(out.path, dist.is_main, num_steps, trackers) as metrics,  # its progress bar stops on any exit
        ):
            return train_steps(
                Run(
                    cfg,
                    dist,
                    model,
                    optimizer,
                    scheduler,
                    data,
                    sampler,
                    per_sample,
                    pad_id,
                    state,
                    saver,
                    validation,
                    metrics,
                    per_source,
                )  # fmt: skip
            )


@dataclass
class Run:
    """What the loop works with, built once by run_training: one object instead of a dozen parameters."""

    cfg: TrainConfig
    dist: Any  # utils.Dist
    model: Any  # setup_model.LossModel, sharded
    optimizer: Any
    scheduler: Any
    data: Any  # dataset.TokenizedData
    sampler: Any  # sampler.py's interface
    per_sample: bool  # sum each sample's loss in the step (for a sampler that observes, or the loss quantiles)
    pad_id: int
    state: Any  # checkpoint.TrainState: counters and sampler position after the last finished step
    saver: Any  # checkpoint.Saver
    validation: Any  # validation.Validation
    metrics: Any  # batch_metrics.MetricsLog
    per_source: Any = None  # batch_metrics.SourceMetrics where there are several sources (per_sample is set then)


def train_steps(run: Run) -> str:
    """The loop: sample -> pack -> forward -> scale -> backward -> step -> log -> maybe validate -> maybe save."""
    import torch

    from batch_metrics import step_metrics
    from packing import Prefetcher
    from utils import all_reduce_sum
    from validation import val_loss_logged, validate

    cfg, dist, model, optimizer, state, saver, validation, metrics = (
        run.cfg, run.dist, run.model, run.optimizer, run.state, run.saver, run.validation, run.metrics
    )  # fmt: skip
    start_step, preempted = state.step, False
    with Prefetcher(
        run.data,
        run.sampler,
        batch_sizes(cfg, len(run.data), state.step, state.samples_seen),
        cfg.max_tokens_per_gpu,
        dist.rank,
        dist.world_size,
        run.pad_id,
        model.packing,  # e.g. padded batches: at most max_tokens_per_gpu tokens padding included
    ) as steps:  # closed on any exit: no thread left running when the process ends
        step_timer = Timer()
        for batch in steps:  # sampled, packed and collated one step ahead, in a background thread
            step = state.step + 1
            # [the step's summed loss, then each sample's (in batch order) when asked for], summed over ranks below
            sums = torch.zeros(1 + batch.num_samples * run.per_sample, dtype=torch.float64, device=dist.device)
            # The exact per-token mean over the whole global batch; x world size cancels FSDP's gradient mean.
            scale = dist.world_size / batch.num_loss_tokens
            for mb in batch.minibatches:
                train_minibatch(model, mb, scale, sums, dist.device)
            grad_norm = clip_gradients(model, cfg.max_grad_norm)
            sums = all_reduce_sum(sums)  # the step's one collective, per-sample losses included
            loss = float(sums[0]) / batch.num_loss_tokens
            check_finite(step, loss, grad_norm)  # loss and norm are global: every rank decides alike
            lr = take_optimizer_step(optimizer, run.scheduler)
            sample_losses = sums[1:] if run.per_sample else None  # each sample's summed loss, batch order
            sample_targets = run.data.num_loss_counted_tokens[batch.indices]  # each sample's target count
            if run.sampler.observes:  # it sees the step before drawing the next (the prefetcher waits for it)
                run.sampler.observe(batch.indices, sample_losses, sample_targets)
                batch.sampler_state = run.sampler.state_dict()
                steps.observed()
            state.advance(batch)
            row = step_metrics(
                step=step,
                batch=batch,
                lr=lr,
                loss=loss,
                grad_norm=grad_norm,
                time_per_step=step_timer.elapsed(),
                state=state,
                device=dist.device,
                sample_losses=sample_losses if cfg.log_loss_quantiles else None,
                sample_targets=sample_targets,
            )
            if run.per_source is not None:  # each source's loss, tokens and passes
                row |= run.per_source.row(batch.indices, sample_losses, sample_targets, run.data.lengths)
            metrics.write(row)
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
    return "saved-on-signal" if preempted else "finished"


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
    """The CLI. With LEANTRAIN_STATUS_FILE set (slurm/train.sbatch sets it), rank 0 writes there at exit how the run
    ended: `finished`, `saved-on-signal` or `error CODE` (train.py's exit code), what the job script requeues on and
    exits with. A SIGUSR1 that comes before training takes it (start-up, loading) is kept, and delivered again once
    training's handler is in place: the run saves and stops at its first step."""
    import os
    import signal
    import threading
    import time

    ended, kept, lock = [], [], threading.Lock()

    def keep(signum, frame):
        if not kept:
            threading.Thread(target=deliver, daemon=True).start()
        kept.append(signum)

    def deliver():  # to training's own handler (checkpoint.Saver), as soon as there is one
        while True:
            with lock:
                handler = signal.getsignal(signal.SIGUSR1)
                if handler is not keep:  # training's, or what main() restored on leaving
                    if callable(handler):
                        os.kill(os.getpid(), signal.SIGUSR1)
                    return
            time.sleep(0.01)

    def run(cfg):
        ended.append(train(cfg))

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGUSR1, keep) if in_main_thread else None
    code = 1
    try:
        app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
        app.command()(_cli_from_config(exit_on_user_error(run)))
        app(argv if argv is not None else sys.argv[1:])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        raise
    finally:
        if in_main_thread:
            with lock:
                signal.signal(signal.SIGUSR1, previous)
        status_file = os.environ.get("LEANTRAIN_STATUS_FILE")
        if status_file and os.environ.get("RANK", "0") == "0" and (ended or code):
            try:
                Path(status_file).write_text(f"{ended[0] if ended and not code else f'error {code}'}\n")
            except OSError as e:
                print(f"warning: could not write LEANTRAIN_STATUS_FILE {status_file}: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
