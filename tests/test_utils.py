"""utils: the one-line error for more local ranks than GPUs, raised before any process group or CUDA work."""

import pytest
import torch

import utils


def test_more_local_ranks_than_gpus_is_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("touched CUDA before the check"))
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(utils.UserError, match=r"^2 processes per node but 1 visible GPU\(s\): set --nproc-per-node"):
        utils.init_distributed()
