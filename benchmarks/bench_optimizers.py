"""Muon vs AdamW (`--optimizer`) on the built-in tiny Qwen2: loss at equal steps, time per step. CPU, fp32.

    python benchmarks/bench_optimizers.py compare      # --steps 60 --batch-size 8 --conversations 400 --lrs 1e-3,3e-3

The same tiny Qwen2 (random init: hidden 128, 2 layers, vocab 4000, 1.5M parameters), the same conversations and
data order for every run: 10% held out (`--validation-split 0.1`), `val_loss` measured every steps/4 steps; constant
lr after 5 warmup steps. Each optimizer at each peak lr (muon: `--muon-learning-rate` = `--learning-rate`, scaled by
the default `--muon-adjust-lr match_rms_adamw`), plus Muon with Keller Jordan's rule (`original`) at its usual 0.02;
one process per run, 1 rank. Reported: val_loss at steps/4, /2, 3/4 and N, the train loss (mean of the last 10
steps), the median time per step over steps 3..N. Then time alone, at the first lr: 20-step runs of AdamW and Muon
taking turns, `--repeats` times each, on 1 rank and on 2 (torchrun, one thread each), the best run's median time per
step; and the optimizer step alone (fixed gradients, best of 50, one process). Best-of: on a shared machine other
processes only ever add time.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tiny_model  # noqa: E402

app = typer.Typer(add_completion=False)
ENV = {"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
FIRST_MEASURED = 2  # steps 3..N: skip warm-up


def sh(*args) -> str:
    r = subprocess.run(list(map(str, args)), capture_output=True, text=True, env={**os.environ, **ENV})
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{r.stderr[-3000:]}")
    return r.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model, data, out, steps, batch_size, optimizer_flags, nproc=1) -> dict:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", nproc, "--master-port", free_port()]
    sh(*launcher, ROOT / "train.py", "--model-name-or-path", model, "--data-path", data, "--output-dir", out,
       "--batch-size", batch_size, "--max-tokens-per-gpu", 8192, "--max-steps", steps, "--seed", 0,
       "--validation-split", 0.1, "--validation-frequency", steps // 4, "--num-warmup-steps", 5,
       "--no-save-final-checkpoint", *optimizer_flags)  # fmt: skip
    rows = [json.loads(line) for line in open(out / "training_metrics_0.jsonl")]
    train = [r for r in rows if "loss" in r]
    return {
        "val": {r["step"]: r["val_loss"] for r in rows if "val_loss" in r},
        "train_loss": statistics.mean(r["loss"] for r in train[-10:]),
        "time_per_step": statistics.median(r["time_per_step"] for r in train[FIRST_MEASURED:]),
    }


@app.command()
def optimizer_step(model: Path, optimizer: str, learning_rate: float, result: Path):
    """The optimizer step alone: the tiny model set up as train.py sets it up (FSDP2, 1 rank), fixed gradients."""
    import torch

    import optimizers
    import setup_model
    from config import TrainConfig
    from utils import init_distributed

    dist = init_distributed()
    cfg = TrainConfig(
        model_name_or_path=str(model), data_path="-", output_dir="-", batch_size=1, max_tokens_per_gpu=64,
        compute_dtype="float32", optimizer=optimizer, learning_rate=learning_rate,
    )  # fmt: skip
    net = setup_model.setup_model(cfg, dist, setup_model.check_model_path(str(model)))
    opt = optimizers.build_optimizer(cfg, net, dist.device)
    grads = [torch.randn_like(p) * 1e-3 for p in net.parameters()]
    times = []
    for _ in range(53):
        for p, g in zip(net.parameters(), grads):
            p.grad = g.clone()
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    result.write_text(json.dumps({"step_s": min(times[3:])}))


def step_alone(model: Path, optimizer: str, lr: float) -> float:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        sh(sys.executable, __file__, "optimizer-step", model, optimizer, lr, f.name)
        return json.loads(Path(f.name).read_text())["step_s"]


@app.command()
def compare(steps: int = 60, batch_size: int = 8, conversations: int = 400, lrs: str = "1e-3,3e-3", repeats: int = 3):
    """Every optimizer at every lr: val_loss at equal steps and time per step; then time alone (1 and 2 ranks, the
    optimizer step)."""
    rates = [float(x) for x in lrs.split(",")]
    configs = [(f"adamw    lr {lr:g}", ["--learning-rate", lr]) for lr in rates]
    configs += [(f"muon     lr {lr:g}", ["--optimizer", "muon", "--learning-rate", lr]) for lr in rates]
    configs += [
        (
            f"muon     lr {rates[0]:g}, Muon 0.02 original",
            ["--optimizer", "muon", "--learning-rate", rates[0], "--muon-learning-rate", 0.02,
             "--muon-adjust-lr", "original"],
        )
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = tiny_model.build_model(work / "model")
        messages = tiny_model.write_jsonl(work / "messages.jsonl", tiny_model.make_conversations(conversations))
        data = work / "data.jsonl"
        sh(sys.executable, ROOT / "process_data.py", "--input-file", messages, "--output-file", data,
           "--model-name-or-path", model)  # fmt: skip
        results = {
            name: run(model, data, work / f"run{i}", steps, batch_size, f) for i, (name, f) in enumerate(configs)
        }
        timed = {(name, nproc): [] for name in ("adamw", "muon") for nproc in (1, 2)}
        for i in range(repeats):
            for (name, nproc), times in timed.items():
                flags = ["--optimizer", name, "--learning-rate", rates[0]]
                times.append(
                    run(model, data, work / f"t{i}{name}{nproc}", 20, batch_size, flags, nproc)["time_per_step"]
                )
        alone = {opt: min(step_alone(model, opt, rates[0]) for _ in range(repeats)) for opt in ("adamw", "muon")}

    print(
        f"tiny Qwen2 (random init), {batch_size} conversations/step, {steps} steps, fp32, {os.cpu_count()} CPUs; "
        f"val_loss on 10% held out"
    )
    marks = sorted(next(iter(results.values()))["val"])
    print(f"{'':42}" + "".join(f"{'val@' + str(s):>9}" for s in marks) + f"{'train':>9}{'s/step':>9}")
    for name, r in results.items():
        vals = "".join(f"{r['val'][s]:9.3f}" for s in marks)
        print(f"{name:42}{vals}{r['train_loss']:9.3f}{r['time_per_step']:9.3f}")
    print(f"time per step, best of {repeats} 20-step runs (median over steps 3-20), lr {rates[0]:g}:")
    for (name, nproc), times in timed.items():
        print(
            f"  {name:6} {nproc} rank{'s' if nproc > 1 else ' '}  {min(times):.3f} s/step   (all: {', '.join(f'{t:.3f}' for t in times)})"
        )
    for opt, s in alone.items():
        print(f"optimizer step alone, 1 rank, best of {repeats}x50: {opt:6} {s * 1e3:6.1f} ms")


if __name__ == "__main__":
    app()
