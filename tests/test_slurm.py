"""slurm/train.sbatch, run as SLURM would run it, faked on localhost: a fake `srun` starts the script's node task once
per "node" with SLURM's per-task variables, a fake `scontrol` names the nodes, gives their address and records a
requeue. One test trains for real (2 nodes x 1 process): a USR1 that comes before training starts reaches both
trainers, which save at their first step, and the job requeues. The others run a fake trainer in train.py's place
(it records its command line and reports an end): the script's settings and decisions, in a second or two each.
tests/test_slurm_real.py runs the script on a real SLURM cluster (CI)."""

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
# tasks as srun does, exit with the first failure. Like a real srun, it drops a USR1 that comes before its step has
# started (FAKE_SRUN_STARTS_STEP_IN seconds after it has written FAKE_SRUN_UP).
FAKE_SRUN = """#!{python}
import signal
tasks = []
signal.signal(signal.SIGUSR1, lambda *_: [t.send_signal(signal.SIGUSR1) for t in tasks])
import os, subprocess, sys, time

open(os.environ["FAKE_SRUN_UP"], "w").close()
time.sleep(float(os.environ.get("FAKE_SRUN_STARTS_STEP_IN", 0)))
args = sys.argv[1:]
while args[0].startswith("-"):
    args.pop(0)
for i in range(int(os.environ["SLURM_NNODES"])):
    env = {{**os.environ, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i), "SLURM_LOCALID": "0"}}
    tasks.append(subprocess.Popen(args, env=env))
codes = [t.wait() for t in tasks]
sys.exit(next((c for c in codes if c), 0))
"""

# scontrol: the job's node names, a node's address (FAKE_NODE_ADDR, or NodeAddr = its name as SLURM's default),
# every call recorded.
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_SCONTROL_LOG"
if [[ $1 == show && $2 == hostnames ]]; then echo "$3"; fi
if [[ $1 == show && $2 == node ]]; then echo "NodeName=$4 Arch=x86_64 NodeAddr=${FAKE_NODE_ADDR:-$4} NodeHostName=$4"; fi
"""

# train.py's place, run as `$PYTHON -m torch.distributed.run ... train.py ...`: records its command line per node,
# stays until FAKE_RELEASE exists (if set), reports FAKE_END from node 0 as rank 0 does, exits FAKE_EXIT (torchrun
# exits 1 whatever train.py's code).
FAKE_TRAINER = """#!/bin/bash
echo "$*" > "$FAKE_DIR/args-$SLURM_NODEID"
while [[ -n ${FAKE_RELEASE:-} && ! -e $FAKE_RELEASE ]]; do sleep 0.05; done
if [[ $SLURM_NODEID == 0 && -n ${FAKE_END:-} ]]; then echo "$FAKE_END" > "$LEANTRAIN_STATUS_FILE"; fi
exit "${FAKE_EXIT:-0}"
"""


@pytest.fixture(scope="module")
def data_path(qwen_dir, tmp_path_factory):
    return tokenized_conversations(tmp_path_factory.mktemp("slurm_data"), qwen_dir, 64, seed=8, max_tokens=256)


def slurm_env(tmp_path, model, data, out, flags, **settings):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "python").write_text(FAKE_TRAINER)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = cpu_env(
        {
            "PATH": f"{bin_dir}:{cpu_env()['PATH']}",
            "FAKE_SCONTROL_LOG": str(tmp_path / "scontrol.log"),
            "FAKE_SRUN_UP": str(tmp_path / "srun-up"),
            "FAKE_DIR": str(tmp_path),
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
    env.update(settings)
    return {k: v for k, v in env.items() if v is not None}  # a setting given as None: unset


def sbatch(env):
    return subprocess.Popen(
        ["bash", str(SBATCH)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def steps(out):
    return [json.loads(line)["step"] for line in open(out / "training_metrics_0.jsonl")]


def wait_for(path, job, timeout=60):
    deadline = time.time() + timeout
    while not path.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"{path} never appeared"


def test_sbatch_two_nodes_signal_before_training_saves_at_first_step_and_requeues(qwen_dir, data_path, tmp_path):
    out = tmp_path / "run"
    # 60 steps take ~20 s: a signal that never reached the trainers ends the run at step 60, not in a timeout.
    job = sbatch(slurm_env(tmp_path, qwen_dir, data_path, out, "--max-steps 60", FAKE_SRUN_STARTS_STEP_IN="1"))
    wait_for(tmp_path / "srun-up", job)
    # What --signal=B:USR1@300 sends the batch script near the time limit, here before srun's step has started
    # (srun drops it: the script sends it again) and before the trainers can take it (train.py keeps it).
    job.send_signal(signal.SIGUSR1)
    log, _ = job.communicate(timeout=180)
    assert job.returncode == 0, log
    assert steps(out) == [1], log
    assert (out / "full_state" / f"samples_{BATCH}").is_dir(), log
    assert json.loads((out / "training_params.json").read_text())["world_size"] == 2
    assert "preemption signal received: checkpoint saved" in log
    assert "--resume: no checkpoint in" in log  # always passed: the requeued job continues from the checkpoint
    assert "leantrain: checkpoint saved before the time limit: requeueing job 4242 (it resumes)" in log
    calls = (tmp_path / "scontrol.log").read_text().splitlines()
    assert calls == ["show hostnames localhost", "show node -o localhost", "requeue 4242"]
    assert not list(out.glob(".leantrain-status-*"))  # read and removed


def fake_job(tmp_path, signal_batch_script=False, **settings):
    """The script with the fake trainer: (exit code, log, each node's trainer command line, scontrol's calls)."""
    fake_python = str(tmp_path / "bin" / "python")
    release = {"FAKE_RELEASE": str(tmp_path / "release")} if signal_batch_script else {}
    job = sbatch(
        slurm_env(tmp_path, "model", "data.jsonl", tmp_path / "out", "", PYTHON=fake_python, **release, **settings)
    )
    if signal_batch_script:
        for node in (0, 1):  # both trainers run (a task still starting would die of the USR1 before its trap)
            wait_for(tmp_path / f"args-{node}", job)
        job.send_signal(signal.SIGUSR1)
        time.sleep(1.5)  # the script sends it on again every second: a trainer that ignores it stays
        (tmp_path / "release").touch()
    log, _ = job.communicate(timeout=60)
    args = [(tmp_path / f"args-{i}").read_text().split() for i in range(2) if (tmp_path / f"args-{i}").exists()]
    calls = (tmp_path / "scontrol.log").read_text().splitlines() if (tmp_path / "scontrol.log").exists() else []
    return job.returncode, log, args, calls


def flag(args, name):
    return args[args.index(name) + 1]


def test_rendezvous_port_per_job_and_host_by_address(tmp_path):
    """Two jobs whose first node is the same must not share a rendezvous (the second joins the first's and fails
    when it ends): the port comes from the job id. The host is the first node's address (NodeAddr): a node name
    need not resolve."""
    code, log, args, calls = fake_job(
        tmp_path,
        FAKE_END="finished",
        SLURM_JOB_NODELIST="n1",
        SLURM_JOB_ID="4242",
        FAKE_NODE_ADDR="127.0.0.1",
        PORT=None,
    )
    assert code == 0, log
    assert len(args) == 2 and args[0] == args[1], log
    assert flag(args[0], "--rdzv-endpoint") == f"127.0.0.1:{29500 + 4242 % 3000}"
    assert flag(args[0], "--rdzv-id") == "4242"
    assert "rendezvous 127.0.0.1:30742, output" in log
    assert "show node -o n1" in calls


def test_rendezvous_settings_override(tmp_path):
    code, log, args, _ = fake_job(tmp_path, FAKE_END="finished", PORT="31111", RDZV_HOST="head.example")
    assert code == 0, log
    assert flag(args[0], "--rdzv-endpoint") == "head.example:31111"


def test_first_node_without_address_is_one_line_error(tmp_path):
    code, log, args, calls = fake_job(tmp_path, SLURM_JOB_NODELIST="n1", FAKE_NODE_ADDR="n1.invalid")
    assert code == 2 and not args, log
    assert log.splitlines() == [
        "error: the first node, n1, has no address that resolves here (NodeAddr n1.invalid): set RDZV_HOST to an "
        "address of it that every node reaches"
    ]


@pytest.mark.parametrize(
    "slurm_gpus, setting, expected",
    [("h100:8", None, "8"), ("0", "2", "2"), (None, "1", "1"), ("0", None, None), (None, None, None), ("8", "0", None)],
)
def test_processes_per_node(tmp_path, slurm_gpus, setting, expected):
    """GPUS_PER_NODE, or the GPUs of --gpus-per-node; CPU-only nodes (--gpus-per-node=0 or none) set GPUS_PER_NODE.
    No processes at all is a one-line error before anything starts."""
    code, log, args, _ = fake_job(tmp_path, FAKE_END="finished", SLURM_GPUS_PER_NODE=slurm_gpus, GPUS_PER_NODE=setting)
    if expected is None:
        assert code == 2 and not args, log
        assert len(log.splitlines()) == 1 and log.startswith("error: ") and "set GPUS_PER_NODE" in log, log
    else:
        assert code == 0, log
        assert flag(args[0], "--nproc-per-node") == expected
        assert f"2 node(s) x {expected} process(es)" in log


@pytest.mark.parametrize(
    "end, train_exit, signal_batch_script, job_exit, requeued",
    [
        # USR1 came, but the run finished first (the signal too late, or lost at start-up): not requeued.
        ("finished", 0, True, 0, False),
        # Saved on a USR1 the script never saw (scancel --signal=USR1 without --batch: every step's processes).
        ("saved-on-signal", 0, False, 0, True),
        ("saved-on-signal", 0, True, 0, True),
        # train.py's exit code is the job's (torchrun reports any failure as 1); a failed run is not requeued.
        ("error 2", 1, False, 2, False),
        ("error 2", 1, True, 2, False),
        (None, 1, False, 1, False),  # killed before it could report
    ],
)
def test_requeue_and_exit_code_follow_what_the_trainer_reports(
    tmp_path, end, train_exit, signal_batch_script, job_exit, requeued
):
    code, log, args, calls = fake_job(tmp_path, signal_batch_script, FAKE_END=end, FAKE_EXIT=str(train_exit))
    assert len(args) == 2, log
    assert code == job_exit, log
    assert ("requeue 4242" in calls) == requeued, log
    assert ("leantrain: checkpoint saved before the time limit: requeueing job 4242 (it resumes)" in log) == requeued
    if signal_batch_script and not requeued:
        assert "not requeued" in log
    assert not list((tmp_path / "out").glob(".leantrain-status-*"))


def train_argv(model, data, out, *flags):
    argv = [sys.executable, ROOT / "train.py", "--model-name-or-path", model, "--data-path", data, "--output-dir", out]
    return [str(a) for a in [*argv, "--batch-size", BATCH, "--max-tokens-per-gpu", 256, *flags]]


def test_train_keeps_a_usr1_from_start_up_and_reports_it(qwen_dir, data_path, tmp_path):
    """train.py takes USR1 from its start: one that comes while it loads stops the run at its first step (USR1's
    default would kill it; under torchrun, started with USR1 ignored, it would be lost), and rank 0 reports
    saved-on-signal in LEANTRAIN_STATUS_FILE."""
    out, status = tmp_path / "run", tmp_path / "status"
    argv = train_argv(qwen_dir, data_path, out, "--max-steps", 60)
    env = cpu_env({"LEANTRAIN_STATUS_FILE": str(status), "OMP_NUM_THREADS": "1"})
    run = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = run.stdout.read(1)  # its first output (loading the model): long before training takes signals
    assert not (out / "training_metrics_0.jsonl").exists()
    run.send_signal(signal.SIGUSR1)
    log, _ = run.communicate(timeout=120)
    log = first + log
    assert run.returncode == 0, log
    assert steps(out) == [1], log
    assert (out / "full_state" / f"samples_{BATCH}").is_dir(), log
    assert status.read_text() == "saved-on-signal\n"


def test_train_reports_its_exit_code_from_rank_0_only(tmp_path):
    argv = train_argv(tmp_path / "none", tmp_path / "none.jsonl", tmp_path / "out", "--max-steps", 1)
    runs = {}
    for rank in "0", "1":  # side by side
        env = cpu_env({"LEANTRAIN_STATUS_FILE": str(tmp_path / f"status-{rank}"), "RANK": rank})
        runs[rank] = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    for rank, run in runs.items():
        _, err = run.communicate(timeout=120)
        assert run.returncode == 2, err
        assert (tmp_path / f"status-{rank}").exists() == (rank == "0")
    assert (tmp_path / "status-0").read_text() == "error 2\n"
