"""slurm/train.sbatch on a real SLURM cluster built on this machine for the test: munged, slurmctld and two slurmd
(nodes n1 and n2, names that do not resolve, NodeAddr=127.0.0.1), from a throwaway slurm.conf in a temp folder
(SLURM_CONF), on free ports; no system file is touched. The script is configured only through its documented
settings (environment) and sbatch's own options for CPU-only nodes. Two cases: a USR1 to the batch script mid-run
(what the time-limit warning sends) checkpoints, requeues under the same job id and resumes, every step exactly
once, losses equal to an uninterrupted run; two jobs on the same first node both finish.

Marked `slurm`: `./dev.sh test` deselects it (pyproject.toml's addopts). It needs root, and installs slurm-wlm and
munge with apt-get where missing: without them it skips, saying why, unless LEANTRAIN_REQUIRE_SLURM=1 (.ci/run),
which makes that a failure. Whatever happens, it cancels its jobs and stops every process it started, by pid,
trainers that outlived their slurmd included. About 3 minutes on 2 CPU cores (a requeue waits ~30 s: the
credential expiry, AuthInfo=cred_expire=30)."""

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, cpu_env, free_port, tokenized_conversations

pytestmark = pytest.mark.slurm

SBATCH = ROOT / "slurm" / "train.sbatch"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
BATCH = 8
FLAGS = f"--batch-size {BATCH} --max-tokens-per-gpu 256 --learning-rate 1e-3 --seed 5"
# CPU-only nodes (docs/SLURM.md): no GPUs, one CPU per node's task, processes per node from GPUS_PER_NODE.
CPU_ONLY = ["--gpus-per-node=0", "--cpus-per-task=1"]
FIRST_STEPS, SECOND_STEPS = 60, 60  # two jobs on one first node; the second starts training ~35 steps later


def unavailable(why: str):
    if os.environ.get("LEANTRAIN_REQUIRE_SLURM") == "1":
        pytest.fail(f"LEANTRAIN_REQUIRE_SLURM=1: {why}", pytrace=False)
    pytest.skip(why)


def install_slurm():
    if all(shutil.which(tool) for tool in DAEMONS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        unavailable("the real-SLURM test needs slurm-wlm and munge, or root and apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            unavailable(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-500:]}")
    missing = [tool for tool in DAEMONS if not shutil.which(tool)]
    if missing:
        unavailable(f"slurm-wlm and munge installed, but {', '.join(missing)} not found")


SLURM_CONF = """\
ClusterName=leantrain-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge/socket,cred_expire=30
StateSaveLocation={dir}/ctld
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={dir}/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=600
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname={host} Port={n1_port} CPUs=2
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname={host} Port={n2_port} CPUs=2
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """munged, slurmctld and slurmd n1 / n2, each a child of this process (foreground: its pid is the daemon's)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="leantrain-slurm-"))
        self.dir.chmod(0o755)  # munged (user munge) reaches its socket folder through it
        self.conf = self.dir / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.jobs: list[str] = []
        # Every process of the cluster, jobs included, carries SLURM_CONF=self.conf: what stop() reaps by.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
        self.env = {**env, "SLURM_CONF": str(self.conf)}

    def start(self):
        munge = pwd.getpwnam("munge")
        for sub, mode in (("munge", 0o755), ("munge-key", 0o700)):
            (self.dir / sub).mkdir(mode=mode)
            os.chown(self.dir / sub, munge.pw_uid, munge.pw_gid)
        key = self.dir / "munge-key" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        (self.dir / "ctld").mkdir()
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(
            SLURM_CONF.format(host=host, dir=self.dir, ctld_port=free_port(), n1_port=free_port(), n2_port=free_port())
        )
        m = self.dir / "munge"
        munged = ["munged", "-F", f"--socket={m}/socket", f"--key-file={key}", f"--pid-file={m}/pid"]
        munged += [f"--log-file={m}/log", f"--seed-file={m}/seed"]
        self.spawn(munged, user=munge.pw_uid, group=munge.pw_gid)
        self.wait_until(lambda: (m / "socket").exists(), 10, "munged's socket")
        self.spawn(["slurmctld", "-D", "-f", str(self.conf)])
        for node in ("n1", "n2"):
            self.spawn(["slurmd", "-D", "-f", str(self.conf), "-N", node])
        self.wait_until(self.nodes_idle, 60, "nodes n1 and n2 idle")

    def spawn(self, cmd, **kwargs):
        log = open(self.dir / f"{Path(cmd[0]).name}-{len(self.procs)}.stderr", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, **kwargs))
        log.close()

    def wait_until(self, ready, timeout, what):
        deadline = time.time() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.time() > deadline:
                raise AssertionError(
                    f"waiting for {what}: {'exited: ' + ', '.join(dead) if dead else 'timed out'}\n" + self.logs()
                )
            time.sleep(0.2)

    def nodes_idle(self):
        r = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        return r.returncode == 0 and sorted(r.stdout.split()) == ["idle", "idle", "n1", "n2"]

    def run(self, *cmd, check=True, env=None, cwd=None):
        r = subprocess.run(cmd, env=env or self.env, cwd=cwd, capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
        return r

    def sbatch(self, settings: dict, *options, cwd: Path) -> str:
        """Submit slurm/train.sbatch as documented: its settings from the environment, sbatch's own options."""
        env = {**cpu_env(self.env), "OMP_NUM_THREADS": "1", **settings}
        r = self.run("sbatch", "--parsable", *CPU_ONLY, *options, str(SBATCH), env=env, cwd=cwd)
        job = r.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for_end(self, job: str, timeout: float) -> dict:
        deadline = time.time() + timeout
        while (info := self.job(job))["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            assert time.time() < deadline, f"job {job} still {info['JobState']} after {timeout} s\n{self.logs()}"
            time.sleep(0.5)
        return info

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd-n1.log", "slurmd-n2.log", "jobcomp.txt"):
            path = self.dir / name
            if path.exists():
                parts.append(f"--- {name} (end)\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self):
        """Cancel the jobs, stop the daemons, then kill whatever of the cluster is left (trainers that outlived
        their slurmd: proctrack/linuxproc does not hold them), all by pid; the temp folder goes."""
        if self.jobs:
            self.run("scancel", *self.jobs, check=False)
            deadline = time.time() + 15
            while time.time() < deadline and self.run("squeue", "-h", "-j", ",".join(self.jobs), check=False).stdout:
                time.sleep(0.5)
        for p in reversed(self.procs):  # slurmd, slurmctld, then munged
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def leftovers(self) -> list[int]:
        """Processes whose environment holds this cluster's SLURM_CONF: its slurmstepd, job scripts, trainers."""
        mark = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if mark in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        unavailable("the real-SLURM test needs root (it starts munged, slurmctld and slurmd)")
    install_slurm()
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()
        assert not c.leftovers()


@pytest.fixture(scope="module")
def data_path(qwen_dir, tmp_path_factory):
    return tokenized_conversations(tmp_path_factory.mktemp("slurm_real_data"), qwen_dir, 64, seed=8, max_tokens=256)


def settings(model, data, out, flags) -> dict:
    """The script's documented settings, from the environment."""
    return {
        "MODEL": str(model),
        "DATA": str(data),
        "OUT": str(out),
        "FLAGS": f"{FLAGS} {flags}",
        "PYTHON": sys.executable,
        "LEANTRAIN": str(ROOT),
        "GPUS_PER_NODE": "1",
    }


def metrics(out: Path) -> list[dict]:
    path = out / "training_metrics_0.jsonl"
    return [json.loads(line) for line in open(path)] if path.exists() else []


def job_log(cwd: Path, job: str) -> str:
    path = cwd / f"leantrain-{job}.out"  # #SBATCH --output=%x-%j.out, in the folder sbatch was called from
    return path.read_text() if path.exists() else ""


def wait_for_a_step(cluster, job, out, cwd, timeout=120):
    deadline = time.time() + timeout
    while not metrics(out):
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), job_log(cwd, job) + cluster.logs()
        assert time.time() < deadline, job_log(cwd, job) + cluster.logs()
        time.sleep(0.2)


def test_usr1_checkpoints_requeues_and_resumes_exactly(cluster, qwen_dir, data_path, tmp_path):
    steps = 30
    out = tmp_path / "run"
    job = cluster.sbatch(settings(qwen_dir, data_path, out, f"--max-steps {steps}"), "--nodes=2", cwd=tmp_path)
    deadline = time.time() + 120
    while len(metrics(out)) < 3:  # mid-run
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), job_log(tmp_path, job) + cluster.logs()
        assert time.time() < deadline, job_log(tmp_path, job) + cluster.logs()
        time.sleep(0.2)
    # What --signal=B:USR1@300 sends near the time limit, by hand.
    cluster.run("scancel", "--signal=USR1", "--batch", job)

    # While the requeued job waits out the credential expiry: the same run, uninterrupted, 1 node x 2 processes.
    deadline = time.time() + 120
    while cluster.job(job)["Restarts"] == "0":
        assert time.time() < deadline, job_log(tmp_path, job) + cluster.logs()
        time.sleep(0.2)
    ref = tmp_path / "reference"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(ROOT / "train.py"),
    ]
    cmd += ["--model-name-or-path", str(qwen_dir), "--data-path", str(data_path), "--output-dir", str(ref)]
    cmd += [*FLAGS.split(), "--max-steps", str(steps)]
    r = subprocess.run(
        cmd, cwd=ROOT, env=cpu_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    info = cluster.wait_for_end(job, 240)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", log
    assert "start 1, 2 node(s) x 1 process(es)" in log and "start 2, 2 node(s) x 1 process(es)" in log, log
    assert f"rendezvous 127.0.0.1:{29500 + int(job) % 3000}" in log, log
    assert "preemption signal received: checkpoint saved" in log, log
    assert f"leantrain: checkpoint saved before the time limit: requeueing job {job} (it resumes)" in log, log
    got, want = metrics(out), metrics(ref)
    assert [m["step"] for m in got] == list(range(1, steps + 1)), log  # every step exactly once
    assert [m["step"] for m in want] == list(range(1, steps + 1))
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), (g, w)
    assert not list(out.glob(".leantrain-status-*"))


def test_two_jobs_on_the_same_first_node_both_finish(cluster, qwen_dir, data_path, tmp_path):
    """With one rendezvous port for all, the second job joins the first one's rendezvous and fails when it ends."""
    first, second = tmp_path / "first", tmp_path / "second"
    on_n1 = ("--nodes=1", "--nodelist=n1")
    a = cluster.sbatch(settings(qwen_dir, data_path, first, f"--max-steps {FIRST_STEPS}"), *on_n1, cwd=tmp_path)
    wait_for_a_step(cluster, a, first, tmp_path)  # its rendezvous is up
    b = cluster.sbatch(settings(qwen_dir, data_path, second, f"--max-steps {SECOND_STEPS}"), *on_n1, cwd=tmp_path)
    wait_for_a_step(cluster, b, second, tmp_path)
    # Not vacuous: the first job still runs (and holds its rendezvous) once the second has started training.
    progress = f"first job at step {len(metrics(first))} of {FIRST_STEPS} when the second trained its first step"
    print(progress)
    assert cluster.job(a)["JobState"] == "RUNNING", progress
    end_a = cluster.wait_for_end(a, 180)
    progress += f"; the second at step {len(metrics(second))} of {SECOND_STEPS} when the first ended"
    print(progress)
    assert len(metrics(second)) < SECOND_STEPS, progress  # the second was still training
    end_b = cluster.wait_for_end(b, 180)
    # Both finish at their first start. (Without a port of its own the second one's torchrun fails with the first
    # one's rendezvous; its trainer, told to stop, saves, and the job requeues and finishes later.)
    assert (end_a["JobState"], end_a["Restarts"]) == ("COMPLETED", "0"), job_log(tmp_path, a)
    assert (end_b["JobState"], end_b["Restarts"]) == ("COMPLETED", "0"), job_log(tmp_path, b) + "\n" + progress
    assert end_a["NodeList"] == end_b["NodeList"] == "n1"
    assert end_a["EndTime"] <= end_b["EndTime"]
    assert [m["step"] for m in metrics(second)] == list(range(1, SECOND_STEPS + 1))
