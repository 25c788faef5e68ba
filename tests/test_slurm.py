"""slurm/train.sbatch, run as SLURM would run it on 2 nodes, faked on localhost: a fake `srun` starts the script's
node task once per "node" with SLURM's per-task variables, a fake `scontrol` names the nodes and records a requeue.
USR1 near the time limit reaches both trainers through the script, which save a checkpoint, exit 0 and requeue.
(The resume itself is checkpoint.py's, tested in test_checkpoint.py: a second launch here would double the time.)"""

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, cpu_env, free_port, tokenized_conversations

SBATCH = ROOT / "slurm" / "train.sbatch"
BATCH = 8

# srun: run the command once per node (SLURM_NNODES of them), each with its node and task ids, pass USR1 on to the
# tasks as srun does, exit with the first failure.
FAKE_SRUN = """#!{python}
import os, signal, subprocess, sys

args = sys.argv[1:]
while args[0].startswith("-"):
    args.pop(0)
tasks = [
    subprocess.Popen(args, env={{**os.environ, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i), "SLURM_LOCALID": "0"}})
    for i in range(int(os.environ["SLURM_NNODES"]))
]
signal.signal(signal.SIGUSR1, lambda *_: [t.send_signal(signal.SIGUSR1) for t in tasks])
codes = [t.wait() for t in tasks]
sys.exit(next((c for c in codes if c), 0))
"""

FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_SCONTROL_LOG"
if [[ $1 == show && $2 == hostnames ]]; then echo "$3"; fi
"""


@pytest.fixture(scope="module")
def data_path(qwen_dir, tmp_path_factory):
    return tokenized_conversations(tmp_path_factory.mktemp("slurm_data"), qwen_dir, 64, seed=8, max_tokens=256)


def slurm_env(tmp_path, model, data, out, flags):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return cpu_env(
        {
            "PATH": f"{bin_dir}:{cpu_env()['PATH']}",
            "FAKE_SCONTROL_LOG": str(tmp_path / "scontrol.log"),
            # What SLURM sets in the batch script's environment.
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "leantrain",
            "SLURM_NNODES": "2",
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_SUBMIT_DIR": str(ROOT),
            "SLURM_CPUS_PER_TASK": "1",
            # The settings at the top of the script.
            "PYTHON": sys.executable,
            "MODEL": str(model),
            "DATA": str(data),
            "OUT": str(out),
            "GPUS_PER_NODE": "1",
            "PORT": str(free_port()),
            "FLAGS": f"--batch-size {BATCH} --max-tokens-per-gpu 256 --learning-rate 1e-3 --seed 5 {flags}",
            "OMP_NUM_THREADS": "1",  # two "nodes" share this machine's cores
        }
    )


def sbatch(env):
    return subprocess.Popen(
        ["bash", str(SBATCH)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def steps(out):
    return [json.loads(line)["step"] for line in open(out / "training_metrics_0.jsonl")]


def test_sbatch_two_nodes_time_limit_saves_and_requeues(qwen_dir, data_path, tmp_path):
    out = tmp_path / "run"
    # 60 steps take ~20 s: a signal that never reached the trainers ends the run at step 60, not in a timeout.
    job = sbatch(slurm_env(tmp_path, qwen_dir, data_path, out, "--max-steps 60"))
    metrics = out / "training_metrics_0.jsonl"
    deadline = time.time() + 120
    while job.poll() is None and time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n")):
        time.sleep(0.1)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends the batch script near the time limit
    log, _ = job.communicate(timeout=180)
    assert job.returncode == 0, log
    stopped = steps(out)[-1]
    assert 0 < stopped < 60 and steps(out) == list(range(1, stopped + 1)), log
    assert (out / "full_state" / f"samples_{stopped * BATCH}").is_dir(), log
    assert json.loads((out / "training_params.json").read_text())["world_size"] == 2
    assert "preemption signal received: checkpoint saved" in log
    assert "--resume: no checkpoint in" in log  # always passed: the requeued job continues from the checkpoint
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["show hostnames localhost", "requeue 4242"]
