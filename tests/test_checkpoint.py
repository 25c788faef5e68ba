"""checkpoint.py: HF-loadable saves, atomic publishing, exact resume after SIGKILL, resume on another world size."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, cpu_env, run_script, tokenized_conversations, torchrun
from test_train import CAP_SMALL

BATCH = 8


@pytest.fixture(scope="module")
def data_path(qwen_dir, tmp_path_factory):
    return tokenized_conversations(tmp_path_factory.mktemp("ckpt_data"), qwen_dir, 100, seed=21, max_tokens=CAP_SMALL)


def args(model, data, out, steps, *extra):
    return [
        ROOT / "train.py",
        "--model-name-or-path",
        model,
        "--data-path",
        data,
        "--output-dir",
        out,
        "--batch-size",
        BATCH,
        "--max-tokens-per-gpu",
        CAP_SMALL,
        "--max-steps",
        steps,
        "--learning-rate",
        1e-3,
        "--seed",
        5,
        *extra,
    ]


def metrics(out):
    return [json.loads(line) for line in open(out / "training_metrics_0.jsonl")]


def weights(out, samples):
    return load_file(out / "hf_format" / f"samples_{samples}" / "model.safetensors")


def names(out, kind):
    return sorted(p.name for p in (out / kind).iterdir()) if (out / kind).exists() else []


def test_sigkill_during_save_then_resume_is_exact(qwen_dir, data_path, tmp_path):
    steps = 12
    ref_out = tmp_path / "ref"
    r = run_script(*args(qwen_dir, data_path, ref_out, steps))
    assert r.returncode == 0, r.stderr
    ref_metrics, ref_weights = metrics(ref_out), weights(ref_out, steps * BATCH)

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, *map(str, args(qwen_dir, data_path, out, steps, "--min-samples-per-checkpoint", 16))],
        cwd=ROOT,
        env=cpu_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Kill the moment the second save (samples_32) is under way: poll for its temporary folder every 2 ms (a busy
    # wait took a core from the run and from the suite's other worker: 126 s instead of 30 under two workers).
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any((out / kind / ".tmp-samples_32").exists() for kind in ("full_state", "hf_format")):
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert "samples_16" in names(out, "full_state") and "samples_16" in names(out, "hf_format")
    assert "samples_96" not in names(out, "hf_format"), "the run was killed before it finished"
    state_at_kill = names(out, "full_state")

    r = run_script(*args(qwen_dir, data_path, out, steps, "--min-samples-per-checkpoint", 16, "--resume"))
    assert r.returncode == 0, r.stderr
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", r.stdout).group(1))
    assert resumed_at == (4 if "samples_32" in state_at_kill else 2), "resumed from the newest complete state"
    for kind in ("full_state", "hf_format"):
        assert not [n for n in names(out, kind) if n.startswith(".")], "leftovers of the killed save are removed"
    assert names(out, "hf_format") == names(out, "full_state"), "a state published without its model is completed"
    got = metrics(out)
    assert [m["step"] for m in got] == list(range(1, steps + 1)), "replayed steps are not logged twice"
    for m, ref in zip(got, ref_metrics):
        assert m["loss"] == pytest.approx(ref["loss"], rel=1e-6) and m["samples_seen"] == ref["samples_seen"]
    final = weights(out, steps * BATCH)
    for name, ref in ref_weights.items():
        assert (final[name] - ref).abs().max() <= 1e-6, name


def test_two_ranks_resumed_on_one_extends_a_finished_run(qwen_dir, data_path, tmp_path):
    ref_out = tmp_path / "ref"
    r = run_script(*args(qwen_dir, data_path, ref_out, 6))
    assert r.returncode == 0, r.stderr

    out = tmp_path / "run"
    r = torchrun(ROOT / "train.py", *args(qwen_dir, data_path, out, 3)[1:], nproc=2)
    assert r.returncode == 0, r.stderr
    assert names(out, "hf_format") == ["samples_24"]

    r = run_script(*args(qwen_dir, data_path, out, 6, "--resume"))  # a larger --max-steps extends it on 1 rank
    assert r.returncode == 0, r.stderr
    got, ref = metrics(out), metrics(ref_out)
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
    for m, e in zip(got, ref):
        assert m["loss"] == pytest.approx(e["loss"], rel=1e-4)
        assert m["samples_seen"] == e["samples_seen"]
    # Summation order differs between 2 and 1 ranks. Adam turns a noise-level gradient (a token seen once) into an
    # lr-sized step, so a rare embedding row may move by a fraction of lr; everything else agrees to ~1e-8.
    for name, w in weights(ref_out, 48).items():
        diff = (weights(out, 48)[name] - w).abs()
        assert diff.max() <= 2e-4 and diff.mean() <= 1e-7, name


def test_sigterm_saves_and_stops(qwen_dir, data_path, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, *map(str, args(qwen_dir, data_path, out, 100_000, "--validation-split", "0.1"))],
        cwd=ROOT,
        env=cpu_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "training_metrics_0.jsonl").exists() and len(metrics(out)) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "preemption signal received" in stdout
    assert not [m for m in metrics(out) if "val_loss" in m]  # no validation in the grace period (none was due)
    done = metrics(out)[-1]
    assert names(out, "hf_format") == [f"samples_{done['samples_seen']}"]
    assert names(out, "full_state") == [f"samples_{done['samples_seen']}"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_checkpoint_loads_and_generates_without_leantrain(qwen_dir, data_path, tmp_path, dtype):
    out = tmp_path / "run"
    r = run_script(*args(qwen_dir, data_path, out, 2, "--save-dtype", dtype))
    assert r.returncode == 0, r.stderr
    hf = out / "hf_format" / "samples_16"
    assert json.loads((hf / "config.json").read_text())["dtype"] == dtype
    assert all(t.dtype == getattr(torch, dtype) for t in load_file(hf / "model.safetensors").values())
    assert (hf / "generation_config.json").is_file()
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        f"assert m.dtype == torch.{dtype}, m.dtype\n"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True,"
        " return_tensors='pt', return_dict=True)\n"
        "out = m.generate(**ids, max_new_tokens=5, do_sample=False)\n"
        "print('generated', out.shape[1] - ids['input_ids'].shape[1])\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(hf)], cwd="/", env=cpu_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "generated" in r.stdout


def test_pruning_keeps_the_newest(qwen_dir, data_path, tmp_path):
    out = tmp_path / "run"
    r = run_script(*args(qwen_dir, data_path, out, 5, "--min-samples-per-checkpoint", 8, "--keep-last-checkpoints", 2))
    assert r.returncode == 0, r.stderr
    assert names(out, "hf_format") == ["samples_32", "samples_40"]
    assert names(out, "full_state") == ["samples_32", "samples_40"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_run_grown_by_max_epochs_announces_and_schedules_the_steps_it_runs(qwen_dir, data_path, tmp_path, nproc):
    """10 samples, batch 8: one epoch is a step of 8 and one of 2. Grown to 2 epochs on resume it runs 2 more steps
    (4 in all, where a count from 0 says 3): the announced steps, the progress line, the linear schedule's end and
    the epoch field agree with the steps that run."""
    small = tmp_path / "ten.jsonl"
    small.write_text("".join(open(data_path).readlines()[:10]))
    out = tmp_path / "run"

    def launch(epochs, *extra):
        flags = [*args(qwen_dir, small, out, 1)[1:], "--lr-scheduler", "linear"]
        flags[flags.index("--max-steps") : flags.index("--max-steps") + 2] = ["--max-epochs", epochs]
        return torchrun(ROOT / "train.py", *flags, *extra, nproc=nproc)

    r = launch(1)
    assert r.returncode == 0, r.stderr
    assert [m["samples_seen"] for m in metrics(out)] == [8, 10]
    r = launch(2, "--resume")
    assert r.returncode == 0, r.stderr
    assert "steps: 4" in r.stdout and "step 4/4" in r.stdout and "4/3" not in r.stdout
    rows = metrics(out)
    assert [(m["step"], m["samples_seen"], m["epoch"]) for m in rows] == [(1, 8, 0), (2, 10, 0), (3, 18, 1), (4, 20, 1)]
    assert [m["lr"] for m in rows[2:]] == pytest.approx([1e-3 * 2 / 4, 1e-3 * 1 / 4])  # linear: 0 after step 4
    if nproc == 1:  # decided before any training, alike on any number of ranks
        r = launch(2, "--resume")
        assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr
        r = launch(1, "--resume")
        assert r.returncode != 0 and "--max-epochs 1 draws 10 samples, and the checkpoint has drawn 20" in r.stderr
