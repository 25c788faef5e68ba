"""Held-out sets: val_loss of each measured exactly like the training loss (packed the same way, the exact
token-weighted mean over the whole set across ranks), without gradients, every N steps and at the end; the
generation samples (generation.py) on the same schedule, with or without a held-out set."""

import contextlib
import math
import time

from utils import Timer, UserError


class Validation:
    """val_loss of each held-out set: the exact token-weighted mean over the whole set across ranks, packed and
    computed like the training loss, without gradients. Due every `every` steps and at the end. `sets`: [(name,
    samples)], none without validation. One set: today's row (`val_loss`, `val_num_loss_counted_tokens`). Several:
    `val_loss/NAME` and `val_num_loss_counted_tokens/NAME` for each, and `val_loss` is the first set's. `prompts`
    (generation.Prompts, or None): samples generated at each validation, also where there is no set (a user who
    asks for samples expects them at the validation frequency)."""

    def __init__(self, sets, cfg, dist, pad_id: int, num_steps: int | None, packing, prompts=None):
        import numpy as np

        self.sets, self.dist, self.pad_id, self.prompts = list(sets), dist, pad_id, prompts
        # The held-out sets never change: pack each once, this rank's minibatches of sample indices.
        self.plans = [
            packing.plan(data, np.arange(len(data)), cfg.max_tokens_per_gpu, dist.world_size)[dist.rank]
            for _, data in self.sets
        ]
        self.every = cfg.validation_frequency or (math.ceil(num_steps / 10) if num_steps else None)
        self.last_step = None
        # The set --keep-best-checkpoint watches (--best-checkpoint-set; default: the first).
        self.watched = getattr(cfg, "best_checkpoint_set", None) or (self.sets[0][0] if self.sets else None)

    def due(self, step: int, final: bool = False) -> bool:
        if not (self.sets or self.prompts) or step == self.last_step or step == 0:
            return False
        return final or (self.every is not None and step % self.every == 0)

    def run(self, model, step: int) -> dict:
        import torch

        import setup_model
        from packing import collate
        from utils import all_reduce_sum

        timer, device = Timer(), self.dist.device
        loss_sums = torch.zeros(len(self.sets), dtype=torch.float64, device=device)
        model.eval()
        with torch.no_grad():
            for k, ((_, data), plan) in enumerate(zip(self.sets, self.plans)):
                for indices in plan:  # every rank runs as many minibatches (some empty): FSDP's collectives line up
                    loss_sums[k] += model(**collate(data, indices, self.pad_id).inputs(device)).total
        model.train()
        setup_model.reshard(model)  # a no-grad forward leaves FSDP's root gathered: the optimizer needs the shards
        loss_sums = all_reduce_sum(loss_sums)
        counts = [int(data.num_loss_counted_tokens.sum()) for _, data in self.sets]
        losses = [float(loss_sums[k]) / counts[k] for k in range(len(self.sets))]
        row = {"step": step, "val_loss": losses[0], "val_num_loss_counted_tokens": counts[0]}
        if len(self.sets) > 1:
            for (name, _), loss, count in zip(self.sets, losses, counts):
                row |= {f"val_loss/{name}": loss, f"val_num_loss_counted_tokens/{name}": count}
        return row | {"val_time": timer.elapsed(), "timestamp": time.time()}

    def watched_loss(self, row: dict) -> float:
        """The val_loss --keep-best-checkpoint compares."""
        return row["val_loss"] if len(self.sets) == 1 else row[f"val_loss/{self.watched}"]


def validate(validation, model, optimizer, state, metrics, saver):
    """Measure val_loss and generate the samples (what the run has of both), log them as one row of their own (the
    generation's time as `generation_time`), and let --keep-best-checkpoint save an improvement of the watched
    set's."""
    from generation import generate_samples

    row = validation.run(model, state.step) if validation.sets else {"step": state.step}
    if validation.prompts is not None:
        seconds = generate_samples(
            model, validation.prompts, validation.dist, state.step, saver.output_dir, metrics.trackers
        )
        row |= {"generation_time": seconds, "timestamp": time.time()}
    validation.last_step = state.step
    metrics.write_validation(row)
    if validation.sets:
        saver.note_validation(validation.watched_loss(row), model, optimizer, state, validation.watched)


def val_loss_logged(dist, output_dir, step: int) -> bool:
    """Whether the run's metrics file has a validation row for `step` (rank 0 reads it; every rank gets its
    answer)."""
    from batch_metrics import read_metrics
    from utils import any_rank

    found = False
    if dist.is_main:
        with contextlib.suppress(UserError):  # no file, or no step in it: measure again
            found = any(row["step"] == step for row in read_metrics(output_dir)[1])
    return any_rank(found, dist.device)
