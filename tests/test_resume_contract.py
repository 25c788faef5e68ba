"""The resume contract (issue 23): each flag's rule lives on the flag; a checkpoint saved before a setting existed
resumes with the behaviour from before it; each component checks its own saved state; an optimizer's plain
numbers resume exactly; damaged and unsupported are told apart."""

import json
import pickle
import shutil
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
from test_checkpoint_trust import (  # noqa: F401, F811  (fixtures: run, data_path, trained, run_dir)
    NEWEST,
    argv,
    data_path,
    forge_manifest,
    metrics,
    one_error_line,
    run,
    run_dir,
    trained,
)

import config
import integrity
from conftest import ROOT, code_at, cpu_env

# The last commit before the resume rules moved onto the flags: its checkpoints must resume after the change.
BEFORE_RULES = "bbe4d4e"


def test_every_flag_declares_its_resume_rule():
    """A field added to TrainConfig without a rule fails here (option() also requires one)."""
    for f in fields(config.TrainConfig):
        assert f.metadata.get("resume") in (config.MATCH, config.FREE), f.name
    assert set(config.SETTINGS_BEFORE) == {
        f.name for f in fields(config.TrainConfig) if f.metadata["resume"] == "must match"
    }
    with pytest.raises(TypeError):
        config.option(1, "a flag without a rule")


def rewrite_settings(folder, edit):
    path = folder / "trainer_state.json"
    meta = json.loads(path.read_text())
    edit(meta["settings"])
    path.write_text(json.dumps(meta))
    forge_manifest(folder)  # intact by its manifest: as the older code would have written it


def test_a_checkpoint_without_a_setting_resumes_with_the_behaviour_from_before_it(
    run, qwen_dir, data_path, run_dir, monkeypatch
):
    """validation_split stands for a setting added after the checkpoint was saved: absent, it is compared with the
    value that reproduces the old behaviour (its `before`), not refused as `None`."""
    for n in (8, 16, 24):
        rewrite_settings(run_dir / f"full_state/samples_{n}", lambda s: s.pop("validation_split"))
    params = (run_dir / "training_params.json").read_bytes()
    monkeypatch.setitem(config.SETTINGS_BEFORE, "validation_split", 0.25)  # as if it had behaved like 0.25 before
    code, out, err = run(*argv(qwen_dir, data_path, run_dir, "--resume", steps=4))
    assert code == 2 and "--validation-split None (checkpoint: 0.25)" in one_error_line(err)
    assert (run_dir / "training_params.json").read_bytes() == params
    monkeypatch.setitem(config.SETTINGS_BEFORE, "validation_split", None)  # its real old behaviour: no split
    code, out, err = run(*argv(qwen_dir, data_path, run_dir, "--resume", steps=4))
    assert code == 0, err
    assert f"resumed from {run_dir / NEWEST} at step 3" in out and [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4]


def test_a_checkpoint_written_before_the_change_resumes(qwen_dir, data_path, tmp_path):
    """The code of BEFORE_RULES (from git) trains 4 steps straight, and 2 steps then stops; today's code resumes
    the stopped run from its checkpoint and ends where the old code's straight run ended (a constant lr: the
    schedule follows each launch's length)."""
    old = code_at(BEFORE_RULES, tmp_path / "old")

    def train_with(code_dir, out, steps, *extra):
        cmd = [
            sys.executable,
            str(code_dir / "train.py"),
            *map(str, argv(qwen_dir, data_path, out, "--lr-scheduler", "constant", *extra, steps=steps)),
        ]
        r = subprocess.run(cmd, cwd=code_dir, env=cpu_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    train_with(old, tmp_path / "straight", 4)
    train_with(old, tmp_path / "run", 2)
    r = train_with(ROOT, tmp_path / "run", 4, "--resume")
    assert f"resumed from {tmp_path / 'run/full_state/samples_16'} at step 2" in r.stdout
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "run")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed, strict=True):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])  # exact: same data, same state, same math


class CountingAdamW(torch.optim.AdamW):
    """AdamW that also keeps plain numbers in its state (an int count and a float), as some optimizers do."""

    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["count"] = state.get("count", 0) + 1
                state["last_lr"] = float(group["lr"])
        return loss


def test_plain_number_optimizer_state_resumes_exactly(run, qwen_dir, data_path, tmp_path, monkeypatch):
    import optimizers

    def build(cfg, model, device):
        return CountingAdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)

    monkeypatch.setattr(optimizers, "build_optimizer", build)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, out, err = run(*argv(qwen_dir, data_path, straight, steps=3))
    assert code == 0, err
    numbers = json.loads((straight / NEWEST / integrity.OPTIMIZER_NUMBERS).read_text())
    assert numbers and all(entries["count"] == 3 for entries in numbers.values())
    code, out, err = run(*argv(qwen_dir, data_path, resumed, "--resume-from", straight / "full_state/samples_16"))
    assert code == 0, err
    assert json.loads((resumed / NEWEST / integrity.OPTIMIZER_NUMBERS).read_text()) == numbers  # 2 saved + 1
    assert (resumed / NEWEST / "dcp/.metadata").read_bytes().count(b"BytesStorageMetadata") == 0  # never pickled
    assert [m["loss"] for m in metrics(resumed)] == [m["loss"] for m in metrics(straight)][2:]


def test_an_unknown_storage_kind_is_unsupported_and_a_planted_pickle_damaged(run, qwen_dir, data_path, run_dir):
    """A DCP index naming a storage kind leantrain does not read is refused in one line as unsupported, with no
    fallback to an older checkpoint; a pickle naming anything else (a callable) is damaged and skipped."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    index_path = run_dir / NEWEST / "dcp/.metadata"
    index = pickle.loads(index_path.read_bytes())  # the test's own file: the full unpickler is fine here
    index.state_dict_metadata["optim.extra"] = BytesStorageMetadata()
    index_path.write_bytes(pickle.dumps(index))
    forge_manifest(run_dir / NEWEST)
    code, out, err = run(*argv(qwen_dir, data_path, run_dir, "--resume", steps=4))
    line = one_error_line(err)
    assert code == 2 and "DCP storage kind BytesStorageMetadata" in line and "unsupported" in line
    assert "resumed from" not in out and "skipping damaged" not in out

    planted = run_dir / "full_state/samples_16/dcp/.metadata"
    planted.write_bytes(pickle.dumps(shutil.rmtree))  # a callable: never a DCP index class
    forge_manifest(run_dir / "full_state/samples_16")
    shutil.rmtree(run_dir / NEWEST)
    code, out, err = run(*argv(qwen_dir, data_path, run_dir, "--resume", steps=4))
    assert code == 0, err
    assert f"skipping damaged checkpoint {run_dir / 'full_state/samples_16'}" in out
    assert f"resumed from {run_dir / 'full_state/samples_8'} at step 1" in out
