"""Validation (val_loss rows, the split, --keep-best-checkpoint) and the Python API (train.train, train.launch)."""

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import checkpoint
import integrity
import run_folder
import train
from conftest import tokenized_conversations
from test_train import CAP_SMALL
from utils import UserError


@pytest.fixture(scope="module")
def data_paths(qwen_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("val_data")
    (folder / "train").mkdir()
    (folder / "val").mkdir()
    train_path = tokenized_conversations(folder / "train", qwen_dir, 40, seed=11, max_tokens=CAP_SMALL)
    val_path = tokenized_conversations(folder / "val", qwen_dir, 13, seed=12, max_tokens=CAP_SMALL)
    return train_path, val_path


def config(model, data, out, **overrides) -> train.TrainConfig:
    values = dict(
        model_name_or_path=str(model), data_path=str(data), output_dir=str(out), batch_size=8,
        max_tokens_per_gpu=CAP_SMALL, max_steps=5, learning_rate=3e-3, seed=5,
    ) | overrides  # fmt: skip
    return train.TrainConfig(**values)


def rows(out):
    return [json.loads(line) for line in open(Path(out) / "training_metrics_0.jsonl")]


def direct_val_loss(model_dir: Path, data_path: Path) -> float:
    """Each validation sample alone through plain transformers: summed token losses over the summed count."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for line in open(data_path):
            sample = json.loads(line)
            ids, labels = torch.tensor([sample["input_ids"]]), torch.tensor(sample["labels"])
            logits = model(input_ids=ids).logits[0, :-1]
            targets = labels[1:]
            keep = targets != -100
            total += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def check_val_rows(out, data_paths, steps: list[int]):
    got = rows(out)
    assert [r["step"] for r in got if "loss" in r] == [1, 2, 3, 4, 5]
    val = [r for r in got if "loss" not in r]
    assert [r["step"] for r in val] == steps
    assert all(set(r) == {"step", "val_loss", "val_num_loss_counted_tokens", "val_time", "timestamp"} for r in val)
    expected = direct_val_loss(Path(out) / "hf_format/samples_40", data_paths[1])
    assert val[-1]["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert val[0]["val_loss"] > val[-1]["val_loss"]


def test_val_loss_is_the_exact_mean_on_one_rank_from_a_thread(qwen_dir, data_paths, tmp_path):
    """The Python API from a notebook-like thread (no signal handlers there): val_loss every 2 steps and at the end,
    equal to a direct per-sample computation on the final checkpoint."""
    out, errors = tmp_path / "run", []
    cfg = config(qwen_dir, data_paths[0], out, validation_data_path=str(data_paths[1]), validation_frequency=2)
    worker = threading.Thread(target=lambda: errors.append(train.train(cfg)))
    worker.start()
    worker.join()
    assert errors == ["finished"]  # how the run ended (train() returns it)
    check_val_rows(out, data_paths, [2, 4, 5])
    assert not (out / run_folder.LOCK_FILE).exists()
    cfg.resume = True  # nothing left to do: no step and no val_loss row twice
    train.train(cfg)
    check_val_rows(out, data_paths, [2, 4, 5])
    metrics = out / "training_metrics_0.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    assert json.loads(lines[-1]).keys() >= {"step", "val_loss"} and json.loads(lines[-1])["step"] == 5
    metrics.write_text("".join(lines[:-1]))  # as if killed after its last save, before measuring the last val_loss
    train.train(cfg)  # the resume at the end measures it
    check_val_rows(out, data_paths, [2, 4, 5])


def test_val_loss_on_two_ranks_through_launch(qwen_dir, data_paths, tmp_path):
    out = tmp_path / "run"
    cfg = config(qwen_dir, data_paths[0], out, validation_data_path=str(data_paths[1]), keep_best_checkpoint=True)
    seen = []  # each line, and whether the run had saved its final checkpoint when the line arrived

    def on_output(line):
        seen.append((line, (out / "hf_format" / f"samples_{5 * cfg.batch_size}").exists()))

    done = train.launch(cfg, nproc_per_node=2, on_output=on_output)
    assert done.stdout == "".join(line for line, _ in seen)
    first_step = next(i for i, (line, _) in enumerate(seen) if "step 1/5" in line)
    assert not seen[first_step][1], "launch streams: step 1's line arrives while the run goes on"
    check_val_rows(out, data_paths, [1, 2, 3, 4, 5])  # the default: every 10% of 5 steps
    params = json.loads((out / "training_params.json").read_text())
    assert params["world_size"] == 2 and params["keep_best_checkpoint"] is True
    with pytest.raises(UserError, match="already holds a run"):  # the failed job's own error line
        train.launch(cfg, nproc_per_node=2)


def test_the_split_is_held_out_by_seed_and_errors_raise(qwen_dir, data_paths, tmp_path):
    cfg = config(qwen_dir, data_paths[0], tmp_path / "o", validation_split=0.25, max_steps=1)
    data, [(name, val)], _ = train.load_data(cfg, SimpleNamespace(vocab_size=4000, get_text_config=lambda: None))
    assert name == "data"  # the held-out set is named by its source (the file's stem)
    everything = len(data) + len(val)
    assert len(val) == round(0.25 * everything) and int(data.lengths.sum() + val.lengths.sum()) == sum(
        len(json.loads(line)["input_ids"]) for line in open(data_paths[0]) if json.loads(line)["len"] <= CAP_SMALL
    )
    again, [(_, val_again)], _ = train.load_data(cfg, SimpleNamespace(vocab_size=4000, get_text_config=lambda: None))
    assert (val_again.input_ids == val.input_ids).all() and data.fingerprint() == again.fingerprint()
    with pytest.raises(UserError, match="--validation-data-path and --validation-split conflict"):
        train.train(config(qwen_dir, data_paths[0], tmp_path / "o", validation_split=0.2, validation_data_path="x"))
    with pytest.raises(UserError, match="--keep-best-checkpoint needs --validation-data-path or --validation-split"):
        train.train(config(qwen_dir, data_paths[0], tmp_path / "o", keep_best_checkpoint=True))
    with pytest.raises(UserError, match="leaves no training sample"):
        train.train(config(qwen_dir, data_paths[0], tmp_path / "o", validation_split=0.999))
    assert not (tmp_path / "o").exists()


def test_pruning_keeps_the_best_checkpoint(tmp_path):
    for samples in (8, 16, 24, 32):
        for kind in (integrity.STATE_DIR, integrity.HF_DIR):
            (tmp_path / kind / f"samples_{samples}").mkdir(parents=True)
    saver = checkpoint.Saver.__new__(checkpoint.Saver)
    saver.cfg, saver.output_dir = SimpleNamespace(keep_last_checkpoints=1), tmp_path
    saver.best = {"val_loss": 1.5, "samples": 16}
    saver.prune()
    for kind in (integrity.STATE_DIR, integrity.HF_DIR):
        assert sorted(p.name for p in (tmp_path / kind).iterdir()) == ["samples_16", "samples_32"]
