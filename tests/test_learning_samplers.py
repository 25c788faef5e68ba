"""Per-sample losses and samplers that learn from them (issue 24): each sample's loss in a packed step equals its
own forward (1 and 2 ranks, chunked and model loss); the loss-aware sampler prefers high-loss samples; a sampler
that observes is drawn only after it saw the step; its runs resume bit-exactly after SIGKILL."""

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import packing
from conftest import ROOT, cpu_env, tokenized_conversations, torchrun
from dataset import load_tokenized
from sampler import LossAwareSampler, check_state
from test_train import CAP_SMALL

BATCH = 8


@pytest.fixture(scope="module")
def data_path(qwen_dir, tmp_path_factory):
    return tokenized_conversations(tmp_path_factory.mktemp("lsamp"), qwen_dir, 40, seed=7, max_tokens=CAP_SMALL)


def flags(model, data, out, steps, *extra):
    return [
        "--model-name-or-path", model, "--data-path", data, "--output-dir", out, "--batch-size", BATCH,
        "--max-tokens-per-gpu", CAP_SMALL, "--max-steps", steps, "--learning-rate", 1e-3, "--seed", 9,
        "--sampler", "loss-aware", "--loss-aware-uniform", 0.3, *extra,
    ]  # fmt: skip


def metrics(out):
    return [json.loads(line) for line in open(out / "training_metrics_0.jsonl")]


def saved_losses(folder) -> np.ndarray:
    state = json.loads((folder / "trainer_state.json").read_text())["state"]["sampler"]
    return np.frombuffer(base64.b64decode(state["losses"]), dtype=np.float32)


# --- the sampler alone --------------------------------------------------------------------------------------------


def test_the_loss_aware_sampler_draws_in_proportion_to_loss():
    """Losses 1..10 (power 1, uniform share 0.2): each sample's draw frequency over 4,000 steps of 5 (20,000 draws
    without replacement within a step) is within 5 binomial standard deviations of what the rule gives without
    replacement's correction, and the highest-loss sample is drawn > 4x as often as the lowest."""
    n, steps, count = 10, 4000, 1
    sampler = LossAwareSampler(n, seed=1, power=1.0, uniform=0.2)
    sampler.observe(np.arange(n), np.arange(1, n + 1, dtype=np.float64) * 3, np.full(n, 3))
    expected = 0.8 * np.arange(1, n + 1) / np.arange(1, n + 1).sum() + 0.2 / n
    assert np.allclose(sampler.probabilities(), expected)
    draws = np.concatenate([sampler.next_indices(count) for _ in range(steps * 5)])
    freq = np.bincount(draws, minlength=n) / len(draws)
    sigma = np.sqrt(expected * (1 - expected) / len(draws))
    assert np.all(np.abs(freq - expected) < 5 * sigma), (freq, expected)
    assert freq[-1] > 4 * freq[0]


def test_unseen_samples_count_as_the_highest_loss_and_state_round_trips():
    sampler = LossAwareSampler(6, seed=2, power=2.0, uniform=0.0)
    assert np.allclose(sampler.probabilities(), 1 / 6)  # nothing seen: uniform
    sampler.observe(np.array([0, 1]), np.array([2.0, 8.0]), np.array([2, 4]))  # per-token 1.0 and 2.0
    p = sampler.probabilities()
    assert p[1] == pytest.approx(p[2]) and p[1] == pytest.approx(4 * p[0])  # unseen = highest (2.0), squared
    sampler.next_indices(3)
    again = LossAwareSampler(6, seed=2, power=2.0, uniform=0.0)
    again.load_state_dict(json.loads(json.dumps(sampler.state_dict())))
    assert np.array_equal(again.next_indices(4), sampler.next_indices(4))
    with pytest.raises(ValueError, match="not this run's"):
        LossAwareSampler(6, seed=3, power=2.0, uniform=0.0).load_state_dict(sampler.state_dict())
    for forged in ({"losses": "AAAA"}, {"steps": -1}, {"extra": 1}, {"kind": "other"}):
        with pytest.raises(ValueError):
            check_state(sampler.state_dict() | forged)


def test_a_sampler_that_observes_is_drawn_only_after_observing(tmp_path, qwen_dir, data_path):
    """The prefetcher draws step t+1 only once the loop says step t was observed (never ahead, whatever the thread
    timing); close() returns within ~1 s when the loop leaves early."""
    data = load_tokenized(data_path, CAP_SMALL)
    sampler = LossAwareSampler(len(data), seed=0, power=1.0, uniform=0.0)
    fetcher = packing.Prefetcher(data, sampler, iter([4, 4, 4]), CAP_SMALL, 0, 1)
    first = next(iter(fetcher))
    time.sleep(0.3)
    assert sampler.steps == 1  # not drawn ahead
    sampler.observe(first.indices, np.full(4, 1e6), np.ones(4, dtype=np.int64))  # make them the favourites
    fetcher.observed()
    deadline = time.time() + 5
    while sampler.steps < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert sampler.steps == 2
    start = time.perf_counter()
    fetcher.close()  # the loop leaves before observing step 2
    assert time.perf_counter() - start < 1.0 and not fetcher._thread.is_alive()
    assert threading.active_count() >= 1


# --- per-sample losses in training --------------------------------------------------------------------------------


def test_a_loss_without_per_sample_losses_is_refused(qwen_dir, data_path, tmp_path, monkeypatch):
    """--loss liger gives only the step's summed loss: a sampler that observes is refused in one line before the
    model loads (`auto` runs chunked or model, which give them: the runs below use it)."""
    import train
    from utils import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = train.TrainConfig(
        model_name_or_path=str(qwen_dir), data_path=str(data_path), output_dir=str(tmp_path / "run"), batch_size=BATCH,
        max_tokens_per_gpu=CAP_SMALL, max_steps=2, sampler="loss-aware", loss="liger",
    )  # fmt: skip
    with pytest.raises(UserError, match=r"^--sampler loss-aware .* per-sample losses, which --loss liger does not"):
        train.train(cfg)
    assert not (tmp_path / "run").exists()


# Both loss paths and both rank counts, each once: the per-sample sums and their all-reduce are the same code for both.
@pytest.mark.parametrize("nproc, loss", [(1, "model"), (2, "chunked")])
def test_per_sample_losses_equal_separate_forwards(qwen_dir, data_path, tmp_path, nproc, loss):
    """One step of a loss-aware run: the per-token loss it saved for each sample of the step (the sampler's state)
    equals that sample's own forward through the model as loaded (fp32, rel 1e-5); the rest stay unseen."""
    out = tmp_path / "run"
    r = torchrun(ROOT / "train.py", *flags(qwen_dir, data_path, out, 1, "--loss", loss), nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    (state_dir,) = (out / "full_state").iterdir()
    losses = saved_losses(state_dir)
    data = load_tokenized(data_path, CAP_SMALL)
    drawn = LossAwareSampler(len(data), seed=9, power=1.0, uniform=0.3).next_indices(BATCH)  # the same first draw
    assert set(np.flatnonzero(~np.isnan(losses))) == set(drawn.tolist())
    lm = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32)
    with torch.no_grad():
        for i in drawn:
            mb = packing.collate(data, [int(i)])
            logits = lm(input_ids=mb.input_ids, use_cache=False).logits[0, mb.target_index]
            ref = torch.nn.functional.cross_entropy(logits, mb.target_ids).item()
            assert losses[i] == pytest.approx(ref, rel=1e-5), i


# --- exact resume -------------------------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (torchrun's workers run in sessions of their own: a process group kill misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found += (kids := children.get(todo.pop(), []))
        todo += kids
    return found


def kill_all(proc):
    """SIGKILL torchrun and its workers, and wait until they are gone (a dying worker still holds the folder's lock)."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(alive(pid) for pid in pids[1:]):
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie holds nothing
    except OSError:
        return False


def start(args, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone"]
    return subprocess.Popen(
        [*cmd, str(ROOT / "train.py"), *map(str, args)],
        cwd=ROOT,
        env=cpu_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_loss_aware_run_resumes_bit_exactly_after_sigkill(qwen_dir, data_path, tmp_path):
    """6 steps straight, against a run SIGKILLed once its checkpoint at step 2 is published and resumed on the same
    world size (2 ranks: every rank's state is saved and restored): every step's loss and grad norm, and the
    sampler's saved state, bit-identical. A 2-rank checkpoint resumed on 1 rank runs on (float sums may differ in the
    last bits there: rel 1e-5)."""
    steps, every = ("--min-samples-per-checkpoint", 2 * BATCH), 6
    straight, killed, nproc = tmp_path / "straight", tmp_path / "killed", 2
    r = torchrun(ROOT / "train.py", *flags(qwen_dir, data_path, straight, every, *steps), nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = start(flags(qwen_dir, data_path, killed, every, *steps), nproc)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "full_state" / f"samples_{2 * BATCH}").exists():
        time.sleep(0.05)
    kill_all(proc)
    assert (killed / "full_state" / f"samples_{2 * BATCH}").exists()
    r = torchrun(ROOT / "train.py", *flags(qwen_dir, data_path, killed, every, *steps, "--resume"), nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(m["loss"], m["grad_norm"]) for m in metrics(killed)] == [
        (m["loss"], m["grad_norm"]) for m in metrics(straight)
    ]
    final = f"full_state/samples_{every * BATCH}"
    assert np.array_equal(saved_losses(killed / final), saved_losses(straight / final), equal_nan=True)
    other = tmp_path / "one_rank"
    args = flags(qwen_dir, data_path, other, every, "--resume-from", straight / f"full_state/samples_{2 * BATCH}")
    r = torchrun(ROOT / "train.py", *args, nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    for a, b in zip(metrics(other), metrics(straight)[2:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
