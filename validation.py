"""Held-out sets: val_loss measured exactly like the training loss (packed the same way, the exact token-weighted
mean over the whole set across ranks), without gradients, every N steps and at the end."""

import contextlib
import math
import time

from utils import Timer, UserError


class Validation:
    """val_loss: the exact token-weighted mean over the whole held-out set across ranks, packed and computed like
    the training loss, without gradients. Due every `every` steps and at the end."""

    def __init__(self, data, cfg, dist, pad_id: int, num_steps: int | None, packing):
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
        from packing import collate
        from utils import all_reduce_sum

        timer, device = Timer(), self.dist.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        model.eval()
        with torch.no_grad():
            for indices in self.plan:  # every rank runs as many minibatches (some empty): FSDP's collectives line up
                loss_sum += model(**collate(self.data, indices, self.pad_id).inputs(device)).total
        model.train()
        setup_model.reshard(model)  # a no-grad forward leaves FSDP's root gathered: the optimizer needs the shards
        num_tokens = int(self.data.num_loss_counted_tokens.sum())
        val_loss = float(all_reduce_sum(loss_sum[None])[0]) / num_tokens
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
