"""train.py with FSDP2's `fully_shard` replaced by nothing: the baseline for "FSDP2 on one rank costs nothing".

    python benchmarks/unsharded.py TRAIN_FLAGS... --no-save-final-checkpoint     # one process, no torchrun

The same loop, model, flags and data order; only the wrapping differs: the model is moved to the device that FSDP
would have moved it to, and nothing else happens around its layers. Without FSDP nothing casts parameters to the
compute dtype, so --train-dtype must equal it (e.g. `--train-dtype bfloat16` on CUDA; compare with train.py run
with the same flags). Checkpoints need FSDP's state dicts: do not save.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def no_shard(module, mp_policy=None, **kwargs):
    """Stands in for fully_shard: the root (the LossModel) goes to the device; the layers stay as they are."""
    import torch

    import setup_model
    from utils import fail

    if not isinstance(module, setup_model.LossModel):
        return module
    dtype = next(module.parameters()).dtype
    if mp_policy.param_dtype != dtype:
        fail(f"unsharded.py: --train-dtype ({dtype}) must equal the compute dtype ({mp_policy.param_dtype})")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return module.to(device)


if __name__ == "__main__":
    import torch.distributed.fsdp

    import train

    torch.distributed.fsdp.fully_shard = no_shard  # setup_model imports it when it shards
    train.main()
