"""Checkpoints and output folders under attack: forged pickles, damaged files, the publish gap, a full disk, two runs
on one folder, a fresh run into a used folder, changed settings on resume. One trained folder is shared and copied
per case; runs go through train.py's own main in-process (fast) except where a second process is the point."""

import errno
import functools
import json
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

import checkpoint
import integrity
import run_folder
import tiny_model
from conftest import ROOT, cpu_env, main_in_process, tokenized_conversations
from test_train import CAP_SMALL
from utils import Dist, UserError

BATCH, STEPS, LR = 8, 3, 1e-3


def argv(model, data, out, *extra, steps=STEPS):
    return [
        "--model-name-or-path", model, "--data-path", data, "--output-dir", out, "--batch-size", BATCH,
        "--max-tokens-per-gpu", CAP_SMALL, "--max-steps", steps, "--learning-rate", LR, "--seed", 5,
        "--lr-scheduler", "cosine", "--min-samples-per-checkpoint", BATCH, *extra,
    ]  # fmt: skip


@pytest.fixture
def run(capfd):
    """train.py's main in this process: run(*argv) -> (exit code, stdout, stderr)."""
    return functools.partial(main_in_process, capfd)


@pytest.fixture(scope="module")
def data_path(qwen_dir, tmp_path_factory):
    return tokenized_conversations(tmp_path_factory.mktemp("trust_data"), qwen_dir, 60, seed=3, max_tokens=CAP_SMALL)


@pytest.fixture(scope="module")
def trained(qwen_dir, data_path, tmp_path_factory):
    """A finished 3-step cosine run with checkpoints at samples 8, 16 and 24."""
    import train

    out = tmp_path_factory.mktemp("trained") / "run"
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in argv(qwen_dir, data_path, out)])
    assert e.value.code in (0, None)
    return out


@pytest.fixture
def run_dir(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def metrics(out):
    return [json.loads(line) for line in open(out / "training_metrics_0.jsonl")]


def one_error_line(err: str) -> str:
    """The run's one `error:` line, its last on stderr (transformers' loading progress bars may come before)."""
    lines = err.strip().splitlines()
    assert [line for line in lines if "error" in line.lower()] == lines[-1:], err
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    return lines[-1]


class Payload:
    """A pickle that, if ever unpickled with the full unpickler, creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def forge_manifest(folder):
    """Rewrite manifest.json to match the folder as it is now (an attacker who forges everything together)."""
    (folder / "manifest.json").unlink()
    integrity.write_manifest(folder, {})


NEWEST = "full_state/samples_24"
NO_SAVES = ("--no-save-final-checkpoint", "--min-samples-per-checkpoint", 10**6)  # resumes that only show the pick
ONE_RANK = Dist(0, 0, 1, None)
DISTCP = f"{NEWEST}/dcp/__0_0.distcp"


@pytest.mark.parametrize("forged", [False, True], ids=["manifest_kept", "manifest_forged"])
@pytest.mark.parametrize("target", ["dcp/.metadata", "dcp/__0_0.distcp", "rng_0.safetensors", "trainer_state.json"])
def test_a_malicious_pickle_never_runs(run, qwen_dir, data_path, run_dir, tmp_path, target, forged):
    marker = tmp_path / "pwned"
    path = run_dir / NEWEST / target
    payload = pickle.dumps(Payload(marker))
    if target.endswith(".distcp"):  # written over the start of the file, the rest left as it was
        data = bytearray(path.read_bytes())
        data[: len(payload)] = payload
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(payload)
    if forged:
        forge_manifest(run_dir / NEWEST)
    code, out, err = run(*argv(qwen_dir, data_path, run_dir, "--resume", *NO_SAVES))
    assert not marker.exists(), "code from a checkpoint ran"
    assert "Traceback" not in err
    if code == 0:  # detected as damaged before use: the previous checkpoint is used, saying which and why
        assert f"skipping damaged checkpoint {run_dir / NEWEST}" in out and target.split("/")[-1] in out
        assert f"resumed from {run_dir / 'full_state/samples_16'}" in out
    else:  # the hashes were forged too and the file is a tensor file: refused in one line naming it
        assert forged and code == 2
        assert str(run_dir / NEWEST) in one_error_line(err)


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_4k(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated_trainer_state": lambda d: truncate(d / "trainer_state.json"),
    "truncated_distcp": lambda d: truncate(d / "dcp/__0_0.distcp"),
    "flipped_4k_in_distcp": lambda d: flip_4k(d / "dcp/__0_0.distcp"),
    "truncated_rng": lambda d: truncate(d / "rng_0.safetensors"),
    "empty_metadata": lambda d: (d / "dcp/.metadata").write_bytes(b""),
    "deleted_file": lambda d: (d / "dcp/__0_0.distcp").unlink(),
    "no_manifest": lambda d: (d / "manifest.json").unlink(),
    "garbled_manifest": lambda d: (d / "manifest.json").write_text('{"files": {"../../etc/passwd": 1}}'),
}


@pytest.mark.parametrize(
    "newest,previous",
    [
        ("truncated_trainer_state", "truncated_distcp"),
        ("flipped_4k_in_distcp", "truncated_rng"),
        ("empty_metadata", "deleted_file"),
        ("no_manifest", "garbled_manifest"),
    ],
)
def test_damaged_checkpoints_are_reported_and_the_newest_intact_one_used(
    run, qwen_dir, data_path, run_dir, newest, previous
):
    DAMAGE[newest](run_dir / NEWEST)
    DAMAGE[previous](run_dir / "full_state/samples_16")
    code, out, err = run(*argv(qwen_dir, data_path, run_dir, "--resume", *NO_SAVES))
    assert code == 0, err
    for damaged in (NEWEST, "full_state/samples_16"):
        assert f"skipping damaged checkpoint {run_dir / damaged}" in out
    assert f"resumed from {run_dir / 'full_state/samples_8'} at step 1" in out
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3], "replayed steps replace their old rows"


@pytest.mark.parametrize(
    "forge",
    [
        lambda m: m["state"].update(extra=1),  # would reach TrainState(**state) as an unknown keyword
        lambda m: m["state"]["sampler"].update(offset=10**15),  # would make the sampler index far past its samples
        lambda m: m["state"]["sampler"].update(offset=m["state"]["sampler"]["num_samples"]),
        lambda m: m["state"]["sampler"].pop("epoch"),
        lambda m: m["state"].update(step=-1),
    ],
    ids=["unknown-key", "huge-offset", "offset-at-end", "missing-epoch", "negative-step"],
)
def test_a_forged_trainer_state_is_damaged_not_obeyed(trained, tmp_path, forge):
    """A trainer_state.json that passes the manifest (re-hashed by whoever edited it) is still checked field by
    field: every forgery is `Damaged`, never a TypeError or a runaway sampler."""
    folder = tmp_path / "ckpt"
    shutil.copytree(trained / "full_state" / "samples_24", folder)
    meta = json.loads((folder / "trainer_state.json").read_text())
    forge(meta)
    (folder / "trainer_state.json").write_text(json.dumps(meta))
    with pytest.raises(integrity.Damaged, match=r"trainer_state.json: "):
        integrity.read_trainer_state(folder, checkpoint.TrainState.checked)


def test_all_damaged_refuses_and_a_damaged_resume_from_is_refused(run, qwen_dir, data_path, run_dir):
    for n in (8, 16, 24):
        truncate(run_dir / f"full_state/samples_{n}/dcp/__0_0.distcp")
    code, out, err = run(*argv(qwen_dir, data_path, run_dir, "--resume"))
    assert code == 2 and "every checkpoint" in one_error_line(err) and "not starting from scratch" in err
    code, out, err = run(*argv(qwen_dir, data_path, run_dir / "other", "--resume-from", run_dir / NEWEST))
    assert code == 2 and "--resume-from" in one_error_line(err) and "size differs" in err
    assert not (run_dir / "other").exists()
    file = run_dir / NEWEST / "trainer_state.json"
    code, out, err = run(*argv(qwen_dir, data_path, run_dir / "other", "--resume-from", file))
    assert code == 2 and one_error_line(err) == f"error: --resume-from {file}: a file; give a checkpoint folder " + (
        "(full_state/samples_N)"
    )


def test_the_final_model_is_rebuilt_when_a_crash_hit_between_the_two_publishes(run, qwen_dir, data_path, run_dir):
    hf = run_dir / "hf_format/samples_24"
    before = load_file(hf / "model.safetensors")
    shutil.rmtree(hf)
    (run_dir / "hf_format/.tmp-samples_24").mkdir()  # what the killed save left
    (run_dir / "hf_format/.tmp-samples_24/config.json").write_text("{")
    code, out, err = run(*argv(qwen_dir, data_path, run_dir, "--resume"))
    assert code == 0, err
    assert f"rebuilding {hf}" in out and "nothing to do" in out
    assert not (run_dir / "hf_format/.tmp-samples_24").exists()
    after = load_file(hf / "model.safetensors")
    assert all((after[k] == v).all() for k, v in before.items())
    integrity.verify(hf, integrity.HF_DIR, ONE_RANK)
    assert AutoTokenizer.from_pretrained(hf).eos_token == "<|im_end|>"


def test_a_full_disk_stops_in_one_line_and_keeps_earlier_checkpoints(run, qwen_dir, data_path, tmp_path, monkeypatch):
    calls = []
    real = checkpoint.write_hf_files

    def fill_disk(full, config, dtype, tok, gen, out):
        calls.append(out)
        if len(calls) == 2:
            (out / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "model.safetensors"))
        real(full, config, dtype, tok, gen, out)

    monkeypatch.setattr(checkpoint, "write_hf_files", fill_disk)
    out = tmp_path / "run"
    code, stdout, err = run(*argv(qwen_dir, data_path, out))
    line = one_error_line(err)
    assert code == 2 and "No space left on device" in line and "samples_16" in line
    assert sorted(p.name for p in (out / "hf_format").iterdir()) == ["samples_8"], "partial folders removed"
    assert sorted(p.name for p in (out / "full_state").iterdir()) == ["samples_16", "samples_8"]
    integrity.verify(out / "hf_format/samples_8", integrity.HF_DIR, ONE_RANK)
    assert [m["step"] for m in metrics(out)] == [1, 2], "metrics of finished steps are kept"
    assert not (out / run_folder.LOCK_FILE).exists()


def test_a_second_run_on_the_folder_is_refused_while_the_first_lives(run, qwen_dir, data_path, run_dir):
    first = subprocess.Popen(
        [sys.executable, ROOT / "train.py", *map(str, argv(qwen_dir, data_path, run_dir, "--resume", steps=10**6))],
        cwd=ROOT,
        env=cpu_env({"SLURM_JOB_ID": "4242"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(metrics(run_dir)) <= STEPS:  # the first run is training
            time.sleep(0.2)
        params = (run_dir / "training_params.json").read_bytes()
        code, out, err = run(*argv(qwen_dir, data_path, run_dir, "--resume"))
        line = one_error_line(err)
        assert code == 2 and "in use by another run" in line
        assert f"host {socket.gethostname()}, pid {first.pid}, SLURM job 4242" in line
        assert (run_dir / "training_params.json").read_bytes() == params, "the refused run touches nothing"
        assert (run_dir / run_folder.LOCK_FILE).exists() and (run_dir / "full_state").is_dir()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel released the dead run's lock: its lock file still names it, but the folder is free again (this
    # run gets past the lock, to the check of its length against the dead run's newest checkpoint).
    assert (run_dir / run_folder.LOCK_FILE).exists()
    code, out, err = run(*argv(qwen_dir, data_path, run_dir, "--resume", steps=1))
    assert code == 2 and "is below the checkpoint's step" in one_error_line(err)


def test_a_fresh_run_into_a_used_folder_is_refused_and_overwrite_removes_only_runs(run, qwen_dir, data_path, run_dir):
    code, out, err = run(*argv(qwen_dir, data_path, run_dir))
    assert code == 2 and "already holds a run" in one_error_line(err) and "--overwrite" in err
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "wandb").mkdir()
    code, out, err = run(*argv(qwen_dir, data_path, run_dir, "--overwrite", steps=1))
    assert code == 0, err
    assert (run_dir / "notes.txt").read_text() == "mine" and not (run_dir / "wandb").exists()
    assert sorted(p.name for p in (run_dir / "hf_format").iterdir()) == ["samples_8"]
    assert [m["step"] for m in metrics(run_dir)] == [1]
    assert json.loads((run_dir / "training_params.json").read_text())["launches"] == []


def test_changed_settings_are_refused_with_every_difference(run, qwen_dir, data_path, run_dir, tmp_path):
    params_before = (run_dir / "training_params.json").read_bytes()
    code, out, err = run(
        *argv(qwen_dir, data_path, run_dir, "--resume", "--learning-rate", 2e-3, "--seed", 6, "--beta2", 0.99)
    )
    line = one_error_line(err)
    assert code == 2
    for diff in ("--learning-rate 0.002 (checkpoint: 0.001)", "--seed 6 (checkpoint: 5)", "--beta2 0.99"):
        assert diff in line
    code, out, err = run(*argv(qwen_dir, data_path, run_dir, "--resume", steps=2))
    assert code == 2 and "run length (2 steps) is below the checkpoint's step 3" in one_error_line(err)

    relabelled = tmp_path / "relabelled.jsonl"  # the same ids, one label moved: other data
    rows = [json.loads(line) for line in open(data_path)]
    row = rows[0]
    first = next(i for i, label in enumerate(row["labels"]) if label != -100)
    row["labels"][first], row["labels"][first - 1] = -100, row["input_ids"][first - 1]
    tiny_model.write_jsonl(relabelled, rows)
    code, out, err = run(*argv(qwen_dir, relabelled, run_dir, "--resume"))
    assert code == 2 and "--data-path holds other data" in one_error_line(err)
    wider = tiny_model.build_model(tmp_path / "wider", hidden_size=64, intermediate_size=128)
    code, out, err = run(*argv(wider, data_path, run_dir, "--resume"))
    assert code == 2 and "--model-name-or-path is another model architecture" in one_error_line(err)
    assert (run_dir / "training_params.json").read_bytes() == params_before, "a refused resume changes nothing"
    assert not (run_dir / run_folder.LOCK_FILE).exists()


def test_a_longer_cosine_run_follows_the_new_schedule_from_the_resume_point(run, qwen_dir, data_path, run_dir):
    code, out, err = run(
        *argv(qwen_dir, data_path, run_dir, "--resume", "--max-tokens-per-gpu", 2 * CAP_SMALL, steps=6)
    )
    assert code == 0, err
    assert "the run length changed (3 -> 6 steps)" in out
    rows = metrics(run_dir)
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5, 6]
    for m in rows[3:]:  # step t uses the 6-step cosine at t - 1 finished steps
        assert m["lr"] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * (m["step"] - 1) / 6)), rel=1e-9)
    params = json.loads((run_dir / "training_params.json").read_text())
    assert params["max_steps"] == 6 and params["max_tokens_per_gpu"] == 2 * CAP_SMALL
    assert [launch["max_steps"] for launch in params["launches"]] == [STEPS]


def test_an_unwritable_params_file_on_resume_is_one_line_and_leaves_no_lock(run, qwen_dir, data_path, run_dir):
    (run_dir / "training_params.json").unlink()
    (run_dir / "training_params.json").mkdir()
    code, out, err = run(*argv(qwen_dir, data_path, run_dir, "--resume", steps=STEPS + 1))
    assert code == 2 and one_error_line(err).startswith(f"error: cannot write in --output-dir {run_dir}")
    assert not (run_dir / "leantrain.lock").exists() and not list(run_dir.glob(".training_params.json.tmp-*"))


def test_resume_in_an_empty_folder_starts_from_scratch(run, qwen_dir, data_path, tmp_path):
    code, out, err = run(*argv(qwen_dir, data_path, tmp_path / "run", "--resume", *NO_SAVES, steps=1))
    assert code == 0, err
    assert "no checkpoint" in out and "starting from scratch" in out


def test_a_failure_before_the_first_step_leaves_nothing(run, qwen_dir, data_path, tmp_path, monkeypatch):
    import train
    from utils import fail

    def broken(*args):
        fail("simulated failure in the first step")

    monkeypatch.setattr(train, "train_minibatch", broken)
    out = tmp_path / "new" / "run"
    code, stdout, err = run(*argv(qwen_dir, data_path, out))
    assert code == 2 and "simulated failure" in one_error_line(err)
    assert not (tmp_path / "new").exists(), "the folders this run made are gone"


def test_without_flock_the_lock_file_decides(tmp_path, monkeypatch, capfd):
    import fcntl
    from types import SimpleNamespace

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    cfg = SimpleNamespace(output_dir=str(tmp_path), resume=True, resume_from=None, overwrite=False)
    lock = tmp_path / run_folder.LOCK_FILE
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "slurm_job_id": None}))

    with pytest.raises(UserError, match=f"may be in use by another run \\(host {socket.gethostname()}, pid"):
        run_folder.OutputDir(tmp_path, True).take(cfg)
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "slurm_job_id": None}))
    held = run_folder.OutputDir(tmp_path, True)
    held.take(cfg)  # a stale holder on this host: taken over
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "no flock" in capfd.readouterr().out
    held.release(failed=False)
    assert not lock.exists()


def test_a_run_resumed_from_an_earlier_checkpoint_replaces_the_later_ones(run, qwen_dir, data_path, run_dir):
    """--resume-from samples_8 in a folder holding 16 and 24: once the run finishes a step, those are the history
    it replaced (as its metrics rows were); its own saves are kept, even with --keep-last-checkpoints 1, and a later
    --resume continues from them."""
    resume_from = ("--resume-from", run_dir / "full_state/samples_8", "--keep-last-checkpoints", 1)
    code, out, err = run(*argv(qwen_dir, data_path, run_dir, *resume_from, steps=2))
    assert code == 0, err
    for kind in ("full_state", "hf_format"):
        assert sorted(p.name for p in (run_dir / kind).iterdir()) == ["samples_16"]
    assert [m["step"] for m in metrics(run_dir)] == [1, 2]
    code, out, err = run(*argv(qwen_dir, data_path, run_dir, "--resume"))
    assert code == 0, err
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3]


def test_a_launch_that_fails_before_its_first_step_leaves_the_folder_as_it_was(run, qwen_dir, data_path, run_dir):
    """--resume-from samples_8 trims the metrics rows past step 1 at launch; the trackers then fail to start (the
    TensorBoard folder is a file): the rows, training_params.json and every checkpoint are as before."""
    files = {name: (run_dir / name).read_bytes() for name in ("training_metrics_0.jsonl", "training_params.json")}
    blocker = run_dir.parent / "not_a_folder"
    blocker.write_text("")
    flags = ("--resume-from", run_dir / "full_state/samples_8", "--tensorboard-dir", blocker)
    code, out, err = run(*argv(qwen_dir, data_path, run_dir, *flags))
    assert code == 2 and "could not start the trackers" in one_error_line(err)
    assert "removed 2 rows past the resumed step 1" in out
    assert {name: (run_dir / name).read_bytes() for name in files} == files
    for kind in ("full_state", "hf_format"):
        assert sorted(p.name for p in (run_dir / kind).iterdir()) == ["samples_16", "samples_24", "samples_8"]


def test_resume_from_another_folder_into_a_folder_holding_a_run_is_refused(run, qwen_dir, data_path, run_dir):
    """The two runs' metrics rows and checkpoints would mix: refused before anything is touched."""
    other = run_dir.parent / "other"
    shutil.copytree(run_dir, other)
    before = sorted(str(p.relative_to(other)) for p in other.rglob("*"))
    code, out, err = run(*argv(qwen_dir, data_path, other, "--resume-from", run_dir / "full_state/samples_8"))
    assert code == 2 and "is not a checkpoint of --output-dir" in one_error_line(err)
    assert sorted(str(p.relative_to(other)) for p in other.rglob("*")) == before


def test_overwrite_keeps_the_folder_when_the_resume_from_checkpoint_is_refused(run, qwen_dir, data_path, run_dir):
    """--overwrite --resume-from a damaged checkpoint elsewhere: refused before --overwrite deletes anything."""
    other = run_dir.parent / "other"
    shutil.copytree(run_dir, other)
    (run_dir / NEWEST / "trainer_state.json").write_text("{}")
    before = sorted(str(p.relative_to(other)) for p in other.rglob("*"))
    code, out, err = run(*argv(qwen_dir, data_path, other, "--overwrite", "--resume-from", run_dir / NEWEST))
    assert code == 2 and one_error_line(err).startswith(f"error: --resume-from {run_dir / NEWEST}")
    assert sorted(str(p.relative_to(other)) for p in other.rglob("*")) == before
