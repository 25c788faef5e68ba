"""Optional trackers: a wandb offline run (no key, no network) and TensorBoard events hold every metric, val_loss
included; a resumed run continues the same wandb run and TensorBoard drops the replayed steps."""

import json
import shutil
import struct

import pytest

from conftest import tokenized_conversations
from test_train import CAP_SMALL

wandb = pytest.importorskip("wandb")
pytest.importorskip("tensorboard")


def wandb_history(run_file) -> list[dict]:
    """History rows of an offline .wandb file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf, rows = run_file.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: float(i.value_json) for i in record.history.item})
        elif length == 0:
            break
    return rows


def test_wandb_offline_and_tensorboard_get_every_metric_and_continue_on_resume(qwen_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no key anywhere
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = tokenized_conversations(tmp_path, qwen_dir, 30, seed=4, max_tokens=CAP_SMALL)
    out, board = tmp_path / "run", tmp_path / "board"
    argv = [
        "--model-name-or-path", qwen_dir, "--data-path", data, "--output-dir", out, "--batch-size", 8,
        "--max-tokens-per-gpu", CAP_SMALL, "--max-steps", 4, "--min-samples-per-checkpoint", 16,
        "--validation-split", 0.2, "--validation-frequency", 2, "--wandb-project", "leantrain-test",
        "--tensorboard-dir", board,
    ]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in argv])
    assert e.value.code in (0, None)
    # Resume from step 2 as after a crash: steps 3 and 4 are replayed.
    for kind in ("full_state", "hf_format"):
        shutil.rmtree(out / kind / "samples_32")
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in [*argv, "--resume"]])
    assert e.value.code in (0, None)

    runs = sorted((out / "wandb").glob("offline-run-*"))
    run_id = (out / "wandb" / "leantrain_run_id").read_text().strip()
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs), "the resumed launch continues the run"
    first = wandb_history(next(runs[0].glob("*.wandb")))
    assert [row["_step"] for row in first if "loss" in row] == [1, 2, 3, 4]
    assert all({"lr", "grad_norm", "tokens_per_second"} <= set(row) for row in first if "loss" in row)
    assert any("val_loss" in row for row in first)

    events = EventAccumulator(str(board))
    events.Reload()
    assert [s.step for s in events.Scalars("loss")] == [1, 2, 3, 4], "replayed steps are not doubled"
    assert [s.step for s in events.Scalars("val_loss")] == [2, 4]

    # --overwrite starts over; the old events stay in a --tensorboard-dir outside the folder but are not shown.
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in [*argv, "--overwrite", "--max-steps", 2, "--seed", 7]])
    assert e.value.code in (0, None)
    events = EventAccumulator(str(board))
    events.Reload()
    losses = [m["loss"] for m in map(json.loads, open(out / "training_metrics_0.jsonl")) if "loss" in m]
    assert [(s.step, round(s.value, 5)) for s in events.Scalars("loss")] == [
        (1, round(losses[0], 5)),
        (2, round(losses[1], 5)),
    ]


def test_a_fresh_run_that_fails_in_its_first_step_leaves_no_tracker_folder(qwen_dir, tmp_path, monkeypatch):
    """Else the next fresh run into the folder would continue the failed run's wandb run (its id file stayed)."""
    import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = tokenized_conversations(tmp_path, qwen_dir, 10, seed=4, max_tokens=CAP_SMALL)
    out = tmp_path / "run"

    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(train, "train_minibatch", out_of_memory)
    argv = [
        "--model-name-or-path", qwen_dir, "--data-path", data, "--output-dir", out, "--batch-size", 4,
        "--max-tokens-per-gpu", CAP_SMALL, "--max-steps", 2, "--wandb-project", "leantrain-test",
        "--tensorboard-dir", out / "tensorboard",
    ]  # fmt: skip
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        train.main([str(a) for a in argv])
    assert not out.exists()


@pytest.mark.parametrize("content", [None, b"", b"\x00\x00garbage\n", b"0123456789ab\n"])
def test_wandb_run_id_file(content, tmp_path, monkeypatch, capsys):
    """The run id survives a resume; a missing, empty (a kill mid-write) or damaged id file starts a new run
    (said once) and is rewritten whole."""
    from batch_metrics import Trackers

    started = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: started.append(kwargs["id"]))
    monkeypatch.setenv("WANDB_MODE", "offline")
    id_file = tmp_path / "wandb" / "leantrain_run_id"
    if content is not None:
        id_file.parent.mkdir()
        id_file.write_bytes(content)
    Trackers._start_wandb("p", tmp_path, {})
    kept = content == b"0123456789ab\n"
    assert started[0] == "0123456789ab" if kept else len(started[0]) == 12 and started[0] != "0123456789ab"
    assert id_file.read_text() == started[0] + "\n"
    assert ("not a run id written by leantrain" in capsys.readouterr().out) == (
        content not in (None, b"0123456789ab\n")
    )


@pytest.mark.parametrize("blocked", ["folder at the id file", "file at the wandb folder", "wandb refuses"])
def test_trackers_that_cannot_start_stop_every_rank_in_one_line(blocked, tmp_path, monkeypatch, dist):
    """Something else where the id file or its folder belongs, or wandb raising: one line naming it, agreed across
    ranks (here a 1-process group), not a traceback."""
    from types import SimpleNamespace

    from batch_metrics import tracking
    from utils import UserError

    def refuse(**kwargs):
        raise ValueError("invalid project name\nmore detail")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", refuse)
    expected = {
        "folder at the id file": r"leantrain_run_id: not a file",
        "file at the wandb folder": r"^--wandb-project: .*wandb is a file, not a folder$",
        "wandb refuses": r"^could not start the trackers: ValueError: invalid project name$",
    }[blocked]
    if blocked == "folder at the id file":
        (tmp_path / "wandb" / "leantrain_run_id").mkdir(parents=True)
    elif blocked == "file at the wandb folder":
        (tmp_path / "wandb").write_text("")
    cfg = SimpleNamespace(wandb_project="p", tensorboard_dir=None)
    with pytest.raises(UserError, match=expected), tracking(cfg, tmp_path, {}, 0, is_main=True):
        pytest.fail("trackers started")
