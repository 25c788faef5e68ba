"""train.py with FSDP2's `fully_shard` replaced by nothing: the baseline for "FSDP2 on one rank costs nothing".

    python benchmarks/unsharded.py TRAIN_FLAGS... --no-save-final-checkpoint     # one process, no torchrun

The same loop, model, flags and data order; only the wrapping differs. FSDP's mixed precision (compute in
--compute-dtype over fp32 master weights) comes from torch.autocast instead, as in a plain PyTorch loop, and the
model is moved to the device that FSDP would have moved it to. Checkpoints need FSDP's state dicts: do not save.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def no_shard(module, mp_policy=None, **kwargs):
    """Stands in for fully_shard: the root (the LossModel) goes to the device and runs under autocast."""
    import torch

    import setup_model

    if not isinstance(module, setup_model.LossModel):
        return module
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    module.to(device)
    dtype, forward = mp_policy.param_dtype, module.forward

    def autocast_forward(*args, **kw):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return forward(*args, **kw)

    module.forward = autocast_forward
    return module


if __name__ == "__main__":
    import torch.distributed.fsdp

    import train

    torch.distributed.fsdp.fully_shard = no_shard  # setup_model imports it when it shards
    train.main()
