"""Per-step metrics: one JSON line per optimizer step in output_dir/training_metrics_0.jsonl (rank 0), and one
human line on the console.

Every count here is global (all ranks) and real: `num_total_tokens` counts the tokens of the samples in the
step, no padding and no dummy rows; `time_per_step` is the step's whole wall time, waiting for data included.
"""

import json
import resource
import time
from pathlib import Path

from utils import fail, format_duration, log

METRICS_FILE = "training_metrics_0.jsonl"


def peak_memory_gb(device) -> float:
    """Peak GPU memory allocated on CUDA; peak resident memory of this process on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def step_metrics(*, step, batch, lr, loss, grad_norm, time_per_step, state, device) -> dict:
    return {
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


class MetricsLog:
    """Appends metrics to the JSONL (rank 0 only) and prints the console line with an ETA when the length is known."""

    def __init__(self, output_dir: Path, is_main: bool, total_steps: int | None):
        self.path = Path(output_dir) / METRICS_FILE
        self.is_main, self.total_steps = is_main, total_steps
        self.recent: list[float] = []  # step times after the first, for the ETA
        self.written = 0

    def append(self, row: dict):
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a full disk or a vanished folder: the user's to fix, so one line
            fail(f"cannot write {self.path}: {e.strerror or e}")

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
            eta = f" | ETA {format_duration(sum(recent) / len(recent) * (self.total_steps - metrics['step']))}"
        of = f"/{self.total_steps}" if self.total_steps else ""
        log(
            f"step {metrics['step']}{of} | loss {metrics['loss']:.4f} | grad_norm {metrics['grad_norm']:.3f} | "
            f"lr {metrics['lr']:.2e} | {metrics['tokens_per_second']:,.0f} tok/s | "
            f"{metrics['num_minibatches']} mb{eta}"
        )

    def write_validation(self, row: dict):
        """A validation row of its own (no `loss` key: training rows are exactly those with one)."""
        if not self.is_main:
            return
        self.append(row)
        log(
            f"step {row['step']} | val_loss {row['val_loss']:.4f} | {row['val_num_loss_counted_tokens']:,} tokens "
            f"in {row['val_time']:.1f} s"
        )
