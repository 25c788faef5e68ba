"""Per-step metrics: one JSON line per optimizer step in output_dir/training_metrics_0.jsonl (rank 0), and one
human line on the console.

Every count here is global (all ranks) and real: `num_total_tokens` counts the tokens of the samples in the
step, no padding and no dummy rows; `time_per_step` is the step's whole wall time, waiting for data included.
"""

import contextlib
import json
import os
import re
import resource
import secrets
import sys
import time
import weakref
from pathlib import Path

from utils import (
    UserError,
    check_can_create,
    fail,
    first_line,
    format_duration,
    log,
    parse_json,
    stop_if_any,
    write_atomically,
)

METRICS_FILE = "training_metrics_0.jsonl"


def peak_memory_gb(device) -> float:
    """Peak GPU memory allocated on CUDA; peak resident memory of this process on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


LOSS_QUANTILES = (10, 50, 90)  # --log-loss-quantiles: loss_p10, loss_p50, loss_p90


def step_metrics(
    *, step, batch, lr, loss, grad_norm, time_per_step, state, device, sample_losses=None, sample_targets=None
) -> dict:
    """One step's row. With `sample_losses` (each sample's summed loss, batch order) and `sample_targets` (its
    target count): the quantiles of the samples' per-token losses, what a sampler that learns from losses sees."""
    row = {
        "step": step,
        "epoch": batch.epoch,
        "lr": lr,
        "loss": loss,
        "grad_norm": grad_norm,
        "num_samples": batch.num_samples,
        "num_loss_counted_tokens": batch.num_loss_tokens,
        "num_total_tokens": batch.num_tokens,
        "num_minibatches": len(batch.minibatches),
        "tokens_per_second": batch.num_tokens / time_per_step,
        "samples_per_second": batch.num_samples / time_per_step,
        "samples_seen": state.samples_seen,
        "tokens_seen": state.tokens_seen,
        "time_per_step": time_per_step,
        "peak_memory_gb": peak_memory_gb(device),
        "timestamp": time.time(),
    }
    if sample_losses is not None:
        import numpy as np

        counted = sample_targets > 0
        per_token = sample_losses[counted] / sample_targets[counted]
        row |= {f"loss_p{q}": float(v) for q, v in zip(LOSS_QUANTILES, np.percentile(per_token, LOSS_QUANTILES))}
    return row


class SourceMetrics:
    """Where the data has several sources (dataset.Sources), each training row's keys per source NAME: `loss/NAME`,
    the exact token-weighted mean of the source's samples in the step (from the per-sample losses; null where the
    step drew none of it), `num_samples/NAME`, `num_loss_counted_tokens/NAME`, `num_total_tokens/NAME` (global,
    real tokens), and `epoch/NAME`, the passes over the source so far (samples drawn from it through this step /
    its samples). `sampler_state`: the state the run starts from ({} when fresh), which says what was drawn."""

    def __init__(self, sources, sampler_state: dict):
        import numpy as np

        from sampler import drawn_per_source

        self.names, self.counts = sources.names, np.asarray(sources.counts, dtype=np.int64)
        self.source_of = np.repeat(np.arange(len(self.names)), self.counts)
        self.drawn = drawn_per_source(sampler_state, sources.counts)

    def row(self, indices, sample_losses, sample_targets, lengths) -> dict:
        """The step's keys: `indices` its samples in batch order, `sample_losses` each one's summed loss (a tensor
        or array, batch order), `sample_targets` each one's target count, `lengths` every sample's tokens."""
        import numpy as np

        if hasattr(sample_losses, "cpu"):
            sample_losses = sample_losses.cpu().numpy()
        k, source = len(self.names), self.source_of[indices]
        samples = np.bincount(source, minlength=k)
        targets, tokens = np.zeros(k, np.int64), np.zeros(k, np.int64)
        np.add.at(targets, source, np.asarray(sample_targets, dtype=np.int64))
        np.add.at(tokens, source, lengths[indices])
        losses = np.bincount(source, weights=np.asarray(sample_losses, dtype=np.float64), minlength=k)
        self.drawn = self.drawn + samples
        row = {}
        for i, name in enumerate(self.names):
            row[f"loss/{name}"] = float(losses[i] / targets[i]) if targets[i] else None
            row[f"num_samples/{name}"] = int(samples[i])
            row[f"num_loss_counted_tokens/{name}"] = int(targets[i])
            row[f"num_total_tokens/{name}"] = int(tokens[i])
            row[f"epoch/{name}"] = float(self.drawn[i] / self.counts[i])
        return row


class MetricsLog:
    """Appends metrics to the JSONL (rank 0 only) and prints the console line with an ETA when the length is known."""

    def __init__(self, output_dir: Path, is_main: bool, total_steps: int | None, trackers=None):
        self.path = Path(output_dir) / METRICS_FILE
        self.is_main, self.total_steps, self.trackers = is_main, total_steps, trackers
        self.recent: list[float] = []  # step times after the first, for the ETA
        self.written = 0
        self.bar = None  # rank 0's progress bar in an interactive terminal, made at the first step (False: none)
        self.stop_bar = lambda: None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop_bar()  # on any exit: a live bar hides the cursor and holds stdout

    def append(self, row: dict):
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a full disk or a vanished folder: the user's to fix, so one line
            fail(f"cannot write {self.path}: {e.strerror or e}")
        if self.trackers is not None:
            self.trackers.log(row)

    def write(self, metrics: dict):
        if not self.is_main:
            return
        self.append(metrics)
        self.written += 1
        if self.written > 1:  # the first step of a process compiles and warms up: it says nothing about the rest
            self.recent = (self.recent + [metrics["time_per_step"]])[-20:]
        eta = ""
        if self.total_steps:
            recent = self.recent or [metrics["time_per_step"]]
            eta = format_duration(sum(recent) / len(recent) * (self.total_steps - metrics["step"]))
        of = f"/{self.total_steps}" if self.total_steps else ""
        log(
            f"step {metrics['step']}{of} | loss {metrics['loss']:.4f} | grad_norm {metrics['grad_norm']:.3f} | "
            f"lr {metrics['lr']:.2e} | {metrics['tokens_per_second']:,.0f} tok/s | "
            f"{metrics['num_minibatches']} mb" + (f" | ETA {eta}" if eta else "")
        )
        self.advance_bar(metrics["step"], eta)

    def advance_bar(self, step: int, eta: str):
        """A bar under the console lines in an interactive terminal when the length is known. Logs that are not a
        terminal (SLURM files, pipes) get the lines only: a bar there is one more line per refresh."""
        if self.bar is None:  # decided at the first step
            self.bar = False
            if not (self.total_steps and sys.stdout.isatty()):
                return
            from rich.errors import LiveError
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            bar = Progress(
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("steps | ETA {task.fields[eta]}"),
                auto_refresh=False,  # redrawn at each step: no refresh thread
                transient=True,
                # What prints to the terminal goes above the bar; stderr sent elsewhere (2>file) stays there.
                redirect_stderr=sys.stderr.isatty(),
            )
            self.task = bar.add_task("", total=self.total_steps, completed=step, eta=eta)
            try:
                bar.start()
            except LiveError:  # a bar an earlier run in this process left live: the lines only
                return
            self.bar = bar
            # Also stopped at interpreter exit, or when a MetricsLog left unclosed is dropped.
            self.stop_bar = weakref.finalize(self, bar.stop)
        if self.bar:
            self.bar.update(self.task, completed=step, eta=eta)
            self.bar.refresh()
            if step >= self.total_steps:
                self.stop_bar()

    def write_validation(self, row: dict):
        """A validation row of its own (no `loss` key: training rows are exactly those with one). A run that
        generates samples without a validation set writes `step` and `generation_time` only (generation.py prints
        its own line)."""
        if not self.is_main:
            return
        self.append(row)
        if "val_loss" not in row:
            return
        names = [k.removeprefix("val_loss/") for k in row if k.startswith("val_loss/")]  # several sets: each one's
        tokens = sum(row[f"val_num_loss_counted_tokens/{n}"] for n in names) or row["val_num_loss_counted_tokens"]
        log(
            f"step {row['step']} | val_loss {row['val_loss']:.4f} | "
            + "".join(f"{n} {row[f'val_loss/{n}']:.4f} | " for n in names)
            + f"{tokens:,} tokens in {row['val_time']:.1f} s"
        )


# ----------------------------------------------------------------------------------------------------------------
# Optional experiment trackers: imported only when their flag is given


def wandb_key_configured() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` puts it), checked without the network."""
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


@contextlib.contextmanager
def tracking(cfg, output_dir: Path, params: dict, resumed_step: int, is_main: bool):
    """The run's Trackers on rank 0 (None elsewhere or when no tracker is asked for), closed on any exit. If they
    cannot start, every rank stops with rank 0's one-line reason (no rank is left waiting in a collective)."""
    trackers = error = None
    if is_main and (cfg.wandb_project or cfg.tensorboard_dir):
        try:
            trackers = Trackers(cfg, output_dir, params, resumed_step)
        except UserError as e:
            error = str(e)
        except Exception as e:  # wandb's own errors (a bad project name, a server refusing the run, ...)
            error = f"could not start the trackers: {type(e).__name__}: {first_line(e)}"
    stop_if_any(error)
    failed = True
    try:
        yield trackers
        failed = False
    finally:
        if trackers is not None:
            trackers.close(failed)


class Trackers:
    """Every metrics row (training and validation) also goes to Weights & Biases (--wandb-project; offline when no
    API key is configured) and/or TensorBoard (--tensorboard-dir). A resumed run continues the same wandb run (its
    id is kept in output_dir/wandb/) and purges TensorBoard steps past the resume point (a fresh run: every step)."""

    def __init__(self, cfg, output_dir: Path, params: dict, resumed_step: int):
        self.wandb_run = self.writer = None
        if cfg.wandb_project:
            self.wandb_run = self._start_wandb(cfg.wandb_project, Path(output_dir), params)
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides the folder's earlier events from this step on: steps a resume replays, and a
            # whole earlier run after --overwrite (which deletes only output_dir/tensorboard/, not a folder elsewhere)
            self.writer = SummaryWriter(cfg.tensorboard_dir, purge_step=resumed_step + 1)

    @staticmethod
    def _start_wandb(project: str, output_dir: Path, params: dict):
        import wandb

        id_file = output_dir / "wandb" / "leantrain_run_id"
        check_can_create(id_file.parent, "--wandb-project")
        if id_file.exists() and not id_file.is_file():
            fail(f"{id_file}: not a file (it keeps the wandb run id of this output folder)")
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text(errors="replace").strip() if id_file.exists() else ""
        if not re.fullmatch(r"[0-9a-f]{12}", run_id):  # none yet, or damaged: a new wandb run
            if id_file.exists():
                log(f"{id_file}: not a run id written by leantrain; starting a new wandb run")
            run_id = secrets.token_hex(6)
            write_atomically(id_file, run_id + "\n")
        if "WANDB_MODE" not in os.environ and not wandb_key_configured():
            os.environ["WANDB_MODE"] = "offline"
            log(f"wandb: no API key, logging offline to {output_dir / 'wandb'} (`wandb sync` uploads it later)")
        return wandb.init(project=project, dir=output_dir, id=run_id, resume="allow", config=params)

    def log_generations(self, step: int, rows: list[dict]):
        """A step's generation samples (generation.py): a wandb table, and a TensorBoard text per prompt (its own
        history across steps), prompt and completion as code blocks (a template's `<|im_start|>` would otherwise
        read as an HTML tag)."""
        import textwrap

        columns = ["step", "prompt", "completion"]
        if self.wandb_run is not None:
            import wandb

            table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
            self.wandb_run.log({"generations": table}, step=step)
        if self.writer is not None:
            for k, row in enumerate(rows):
                text = "\n\n".join(f"{c}:\n\n" + textwrap.indent(row[c], "    ") for c in columns[1:])
                self.writer.add_text(f"generations/{k}", text, step)

    def log(self, row: dict):
        scalars = {k: v for k, v in row.items() if k not in ("step", "timestamp") and isinstance(v, (int, float))}
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=row["step"])
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, row["step"])

    def close(self, failed: bool):
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------------------------------------------
# Plots: `python batch_metrics.py plot OUTPUT_DIR`, also while the run is still appending to the metrics file.

PLOT_FILE = "training_curves.png"


TRAIN_ROW = ("step", "epoch", "loss", "lr", "grad_norm", "tokens_per_second")  # what a plot needs of a row
VAL_ROW = ("step", "val_loss")
GENERATION_ROW = ("step", "generation_time")  # a validation row of a run that generates without a validation set


def is_number(value) -> bool:
    """A JSON number matplotlib can draw: a float, or an int within float range."""
    return type(value) is float or (type(value) is int and abs(value) <= sys.float_info.max)


def is_row(row, keys) -> bool:
    return isinstance(row, dict) and all(is_number(row.get(k)) for k in keys)


def read_metrics(output_dir: Path) -> tuple[list[dict], list[dict]]:
    """The training rows (those with `loss`) and the validation rows (`val_loss`, or `generation_time` alone) of a
    run's metrics file; lines that are not such rows are skipped and counted."""
    output_dir = Path(output_dir)
    path = output_dir / METRICS_FILE
    if not output_dir.is_dir():
        fail(f"{output_dir}: no such folder")
    if not path.is_file():
        fail(f"{path}: no such file (the run has not finished a step yet?)")
    train, val, skipped = [], [], 0
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    if not text.endswith("\n"):  # half-written by a running trainer (or a crashed one, until a resume trims it)
        lines = lines[:-1]
    for line in lines:
        try:
            row = parse_json(line)
        except ValueError:
            row = None
        if is_row(row, TRAIN_ROW):
            train.append(row)
        elif is_row(row, VAL_ROW) or is_row(row, GENERATION_ROW):
            val.append(row)
        elif line.strip():
            skipped += 1
    if skipped:
        log(f"{path}: skipped {skipped} lines that are not metrics rows")
    if not train:
        fail(f"{path}: no training steps yet")
    return train, val


def named_keys(rows: list[dict], prefix: str) -> list[str]:
    """The keys starting with `prefix` (loss/NAME, val_loss/NAME) in the rows, in the order they first appear."""
    return list(dict.fromkeys(k for r in rows for k in r if k.startswith(prefix)))


def plot(output_dir: Path) -> Path:
    """Draw loss and val_loss, lr, grad norm and tokens/s against steps into OUTPUT_DIR/training_curves.png; with
    several sources and validation sets, a loss curve for each."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state; PNGs render with Agg
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    except ImportError:
        fail("plotting needs matplotlib: pip install matplotlib (or the plot extra: pip install -e '.[plot]')")
    train, val = read_metrics(output_dir)
    val = [r for r in val if is_number(r.get("val_loss"))]  # not the rows of generation samples alone
    steps = [r["step"] for r in train]
    fig = Figure(figsize=(12, 7.5), layout="constrained")
    (loss_ax, lr_ax), (norm_ax, speed_ax) = fig.subplots(2, 2, sharex=True)
    panels = [
        (loss_ax, "loss", "loss (per-token cross-entropy)"),
        (lr_ax, "lr", "learning rate"),
        (norm_ax, "grad_norm", "gradient norm (before clipping)"),
        (speed_ax, "tokens_per_second", "tokens / s"),
    ]
    for ax, key, title in panels:
        ax.plot(steps, [r[key] for r in train], lw=1, label=key, marker="." if len(steps) < 50 else None)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    # Several sources and sets: one curve each (loss/NAME over the steps that drew the source; val_loss/NAME).
    curves = [(train, key, dict(lw=1, alpha=0.8)) for key in named_keys(train, "loss/")]
    curves += [(val, key, dict(lw=1.5, marker="o")) for key in named_keys(val, "val_loss/") or ["val_loss"]]
    for rows, key, style in curves:
        points = [(r["step"], r[key]) for r in rows if is_number(r.get(key))]
        if points:
            loss_ax.plot(*zip(*points), label=key, **style)
    # A loss or norm spanning a decade or more (a falling loss, a spiking norm) would flatten its late steps on a
    # linear axis: log, ticked 1-2-5 in plain numbers.
    for ax in (loss_ax, norm_ax):
        ys = [y for line in ax.get_lines() for y in line.get_ydata()]
        if min(ys) > 0 and max(ys) >= 10 * min(ys):
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(NullFormatter())
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (norm_ax, speed_ax):
        ax.set_xlabel("step")
    # Epoch starts: a loss that drops at each one is the model memorising the data.
    epoch_starts = [row["step"] for prev, row in zip(train, train[1:]) if row["epoch"] > prev["epoch"]]
    for ax, *_ in panels:
        for i, step in enumerate(epoch_starts):
            ax.axvline(step, color="0.5", lw=0.8, ls=":", label="new epoch" if i == 0 else None)
    loss_ax.legend()
    last = train[-1]
    fig.suptitle(
        f"{output_dir}: step {last['step']}, loss {last['loss']:.4f}"
        + (f", val_loss {val[-1]['val_loss']:.4f} (step {val[-1]['step']})" if val else "")
    )
    out = Path(output_dir) / PLOT_FILE
    tmp = out.with_name(f".{PLOT_FILE}.tmp-{os.getpid()}")
    try:  # written whole, then renamed: an image viewer that reloads it never sees half a PNG
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        fail(f"cannot write {out}: {e.strerror or e}")
    return out


if __name__ == "__main__":
    import typer

    from utils import exit_on_user_error

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)

    @app.callback()
    def cli():
        """Tools for a run's metrics file (training_metrics_0.jsonl)."""

    @app.command("plot")
    @exit_on_user_error
    def plot_command(output_dir: Path = typer.Argument(..., help="The run's --output-dir.")):
        """Write OUTPUT_DIR/training_curves.png: loss and val_loss, lr, grad norm and tokens/s against steps. Works
        while the run is in progress."""
        print(f"wrote {plot(output_dir)}")

    app()
