"""utils: the one-line error for more local ranks than GPUs, raised before any process group or CUDA work."""

import contextlib
import json
import time
from pathlib import Path

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


@pytest.mark.parametrize("text", ["[" * 100_000, "[" + "9" * 5000 + "]", '{"a": 1', b"\xff"])
def test_parse_json_raises_only_value_error(text):
    """Every file leantrain reads may be damaged: deep nesting (RecursionError in json) and integers of thousands
    of digits are plain ValueErrors, caught where the file is read."""
    with pytest.raises(ValueError):
        utils.parse_json(text)


def test_trim_rows_drops_unreadable_lines(tmp_path, capsys):
    import run_folder

    path = tmp_path / "training_metrics_0.jsonl"
    rows = [{"step": 1}, {"step": 2}, {"step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "[" * 100_000 + "\n" + '{"step": "2"}\n')
    assert run_folder.trim_rows(path, 2) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert "removed 2 rows past the resumed step 2 and 1 unreadable line (a write" in capsys.readouterr().out


def test_a_full_disk_is_named_behind_wrapping_errors():
    import checkpoint

    try:
        try:
            raise OSError(28, "No space left on device", "/out/dcp/__0_0.distcp")
        except OSError as e:
            raise RuntimeError("writer thread failed") from e
    except RuntimeError as e:
        assert checkpoint.describe_error(e) == "No space left on device (/out/dcp/__0_0.distcp)"
    rust = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert checkpoint.describe_error(rust) == "No space left on device (safetensors)"
    assert checkpoint.describe_error(ValueError("bad\nmore")) == "ValueError: bad"


def test_destroying_the_process_group_ends_its_threads(monkeypatch):
    """After FSDP2 the group's gloo threads used to outlive destroy_process_group (a DeviceMesh kept in DTensor's
    caches holds the group) and now and then aborted the process as the interpreter tore down. A CPU group and mesh
    on any machine (on a GPU one init_distributed would start NCCL)."""
    import os

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def gloo_threads():
        names = []
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
        return sorted(n for n in names if "gloo" in n)

    before = gloo_threads()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    utils.init_distributed()
    try:
        # the group's own (so the check below can fail); a new thread names itself once it runs, which under load
        # can come after init_process_group returns
        deadline = time.monotonic() + 30
        while len(gloo_threads()) <= len(before) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(gloo_threads()) > len(before)
        model = fully_shard(torch.nn.Sequential(torch.nn.Linear(4, 4)), mesh=init_device_mesh("cpu", (1,)))
        model(torch.ones(2, 4)).sum().backward()
        del model
    finally:
        utils.destroy_distributed()
    assert gloo_threads() == before


def test_the_process_group_gives_back_the_excepthook():
    """init_process_group installs a hook that prefixes uncaught errors with the rank; a notebook that called
    train.train() gets its own hook back."""
    import sys

    def mine(*args):
        return None

    before = sys.excepthook
    sys.excepthook = mine
    try:
        utils.init_distributed()
        assert sys.excepthook is not mine  # torch's
        utils.destroy_distributed()
        assert sys.excepthook is mine
    finally:
        sys.excepthook = before
