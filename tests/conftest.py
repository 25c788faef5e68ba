import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per process (this one and every launch; set before torch loads): the suite runs two workers, and
# ranks and "nodes" side by side, on few cores, and torch's idle threads spin while they wait, so oversubscribed they
# burn the CPU the others need (three 1-rank runs at once on 2 cores: 71 s with the default threads, 18 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> Path:
    """The built-in tiny Qwen2 model (ChatML template), built once per session."""
    return tiny_model.build_model(tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """The built-in tiny Llama model (Llama-3 header template)."""
    return tiny_model.build_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama")


@pytest.fixture
def dist():
    """A 1-process gloo group (no torchrun), as train.py starts it."""
    from utils import destroy_distributed, init_distributed

    yield init_distributed()
    destroy_distributed()


def tokenize(messages_path: Path, model_dir: Path, out: Path, *flags) -> Path:
    """Run the real process_data CLI (asserting success) and return the tokenized file."""
    r = run_script(
        ROOT / "process_data.py",
        "--input-file",
        messages_path,
        "--output-file",
        out,
        "--model-name-or-path",
        model_dir,
        *flags,
    )
    assert r.returncode == 0, r.stderr
    return out


def tokenized_conversations(directory: Path, model_dir: Path, n: int, seed: int, max_tokens: int) -> Path:
    """n synthetic short conversations, tokenized, keeping samples of at most max_tokens tokens."""
    src = tiny_model.write_jsonl(
        directory / "messages.jsonl", tiny_model.make_conversations(n, seed=seed, max_words=40)
    )
    return tokenize(src, model_dir, directory / "data.jsonl", "--max-sample-num-tokens", max_tokens, "--num-proc", 1)


# GPU tests hand this to run_script to see the GPU the pytest process sees.
GPU_ENV = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}


def cpu_env(extra: dict | None = None) -> dict:
    """Environment for a subprocess, pinned to the CPU unless `extra` says otherwise: the exactness tests compare
    fp32 runs, and several ranks on a machine with fewer GPUs than ranks must not reach for one each. A process that
    dies of a signal prints every thread's Python stack (PYTHONFAULTHANDLER): a rare abort in CI says where it was."""
    env = {"PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", "CUDA_VISIBLE_DEVICES": ""}
    return {**os.environ, **env, **(extra or {})}


def run(cmd, cwd, env, timeout) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True, text=True), except that a timeout kills the whole process group: a hung
    torchrun's workers too, not only the launcher (they would keep the cores busy for the rest of the suite)."""
    with subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def code_at(commit: str, folder: Path) -> Path:
    """The repository's files at `commit` (git archive), unpacked into `folder`: to run the code from before a
    change. Skips, saying why, without git or that history (a tarball, a shallow clone)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs git and the history holding commit {commit} (a full clone)")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def main_in_process(capfd, *argv):
    """train.py's main in this process (fast: no interpreter start-up): (exit code, stdout, stderr)."""
    import train

    capfd.readouterr()
    code = 0
    try:
        train.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code or 0
    out, err = capfd.readouterr()
    return code, out, err


def run_script(*args, cwd=ROOT, env=None, timeout=600):
    """Run a repo script as a user would (a fresh interpreter); returns the CompletedProcess."""
    return run([sys.executable, *map(str, args)], cwd, cpu_env(env), timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, nproc=1, extra_env=None, timeout=600):
    """Run a repo script under torchrun on the CPU (gloo), `nproc` ranks on this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += ["--master-port", str(free_port()), str(script), *map(str, args)]
    return run(cmd, ROOT, cpu_env(extra_env), timeout)


def dense_targets(mb):
    """A minibatch's targets as a row like input_ids: the target where position t has one, -100 elsewhere."""
    import torch

    row = torch.full_like(mb.input_ids, -100)
    row[0, mb.target_index] = mb.target_ids
    return row


# --- the model set up as train.py does it: shared by test_setup_model.py, test_attention.py and test_probe.py ---


def setup(model_dir, dist, **flags):
    """setup_model as train.py calls it; returns (model, resolved config)."""
    import setup_model
    import train

    required = dict(
        model_name_or_path=str(model_dir), data_path="-", output_dir="-", batch_size=1, max_tokens_per_gpu=64
    )
    cfg = train.TrainConfig(**required, compute_dtype="float32", **flags)
    return setup_model.setup_model(cfg, dist, setup_model.check_model_path(str(model_dir))), cfg


@pytest.fixture(scope="module")
def qwen_data(qwen_dir, tmp_path_factory):
    return tokenized_conversations(tmp_path_factory.mktemp("probe_data"), qwen_dir, 10, seed=2, max_tokens=256)


def packed_loss(model, qwen_data):
    from dataset import load_tokenized
    from packing import collate

    data = load_tokenized(qwen_data, 10_000)
    return model(**collate(data, list(range(5))).inputs("cpu")).total


def save_arch(tmp_path, model_type, **overrides):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_model.arch_config(model_type, **overrides)).save_pretrained(tmp_path)
    return tmp_path


def per_sample_loss(model_dir, qwen_data, n=5):
    """The model's own forward, one sample at a time, eval mode: summed loss over the first n samples."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from dataset import load_tokenized
    from packing import collate

    data = load_tokenized(qwen_data, 10_000)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for i in range(n):
            mb = collate(data, [i])
            logits = lm(input_ids=mb.input_ids, use_cache=False).logits[0, mb.target_index]
            total += F.cross_entropy(logits, mb.target_ids, reduction="sum").item()
    return total


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
