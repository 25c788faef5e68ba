"""OSFT: (a) forgetting, (b) cost. CPU, fp32, one process per run.

    python benchmarks/bench_osft.py forgetting [--ratio 0.25 --ratio 0]
    python benchmarks/bench_osft.py cost [--hidden 768 --layers 12]

(a) The built-in tiny Qwen2 learns task A (64 short conversations, memorised until the loss is low), then task B
(64 others) for the same number of steps with full fine-tuning and with OSFT. Reported: task-A loss before and
after B (its rise is the forgetting) and the task-B loss reached. Losses are train.py's own exact per-token mean
over the whole set, measured by a run with learning rate 0 and the whole set as one batch.
(b) Step time (steps 3..N), peak RSS and the SVD time at start-up of OSFT vs plain fine-tuning on a larger model
built from a config.
"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tiny_model  # noqa: E402

app = typer.Typer(add_completion=False)
ENV = {"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def sh(*args) -> str:
    import os

    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env={**os.environ, **ENV})
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{r.stderr[-3000:]}")
    return r.stdout


def tokenized(tmp: Path, model: Path, name: str, n: int, seed: int, max_words: int = 12) -> Path:
    messages = tiny_model.write_jsonl(tmp / f"{name}.messages.jsonl", tiny_model.make_conversations(n, seed, max_words))
    out = tmp / f"{name}.jsonl"
    sh(ROOT / "process_data.py", "--input-file", messages, "--output-file", out, "--model-name-or-path", model,
       "--num-proc", "1")  # fmt: skip
    return out


def train(model, data, out, steps, *extra) -> str:
    return sh(ROOT / "train.py", "--model-name-or-path", model, "--data-path", data, "--output-dir", out,
              "--batch-size", 16, "--max-tokens-per-gpu", 8192, "--max-steps", steps, *extra)  # fmt: skip


def last_hf(out: Path) -> Path:
    return max((out / "hf_format").iterdir(), key=lambda p: int(p.name.split("_")[1]))


def loss_on(model: Path, data: Path, tmp: Path) -> float:
    n = sum(1 for _ in open(data))
    out = tmp / f"eval-{len(list(tmp.glob('eval-*')))}"
    sh(ROOT / "train.py", "--model-name-or-path", model, "--data-path", data, "--output-dir", out, "--batch-size", n,
       "--max-tokens-per-gpu", 8192, "--max-steps", 1, "--learning-rate", 0, "--no-save-final-checkpoint")  # fmt: skip
    return json.loads(open(out / "training_metrics_0.jsonl").readline())["loss"]


@app.command()
def forgetting(ratio: list[float] = [0.25], steps_a: int = 300, steps_b: int = 100, lr: float = 3e-3):  # noqa: B006
    """r = 0 freezes the targets outright: what is left is the forgetting of everything else (embeddings, norms,
    LM head), which OSFT does not touch."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tiny_model.build_model(tmp / "base")
        task_a, task_b = tokenized(tmp, base, "a", 64, seed=1), tokenized(tmp, base, "b", 64, seed=2)
        train(base, task_a, tmp / "A", steps_a, "--learning-rate", lr, "--lr-scheduler", "cosine")
        model_a = last_hf(tmp / "A")
        a_before, b_before = loss_on(model_a, task_a, tmp), loss_on(model_a, task_b, tmp)
        print(f"after task A ({steps_a} steps): task-A loss {a_before:.3f}, task-B loss {b_before:.3f}")
        print("| run on task B | task-A loss after | rise (forgetting) | task-B loss reached |")
        print("|---|---|---|---|")
        rises = {}
        runs = [("full fine-tuning", ())] + [
            (f"OSFT r={r}", ("--osft", "--osft-unfreeze-rank-ratio", r)) for r in ratio
        ]
        for name, extra in runs:
            out = tmp / name.replace(" ", "_")
            train(model_a, task_b, out, steps_b, "--learning-rate", lr, *extra)
            a_after, b_after = loss_on(last_hf(out), task_a, tmp), loss_on(last_hf(out), task_b, tmp)
            rises[name] = a_after - a_before
            print(f"| {name} | {a_after:.3f} | {a_after - a_before:+.3f} | {b_after:.3f} |")
        full = rises.pop("full fine-tuning")
        for name, rise in rises.items():
            print(f"{name} forgets {rise / full:.2f}x as much as full fine-tuning (target <= 0.33)")


@app.command()
def cost(hidden: int = 768, layers: int = 12, intermediate: int = 2048, ratio: float = 0.25, steps: int = 6):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_model.build_model(tmp / "m", hidden_size=hidden, num_hidden_layers=layers,
                                       intermediate_size=intermediate)  # fmt: skip
        data = tokenized(tmp, model, "d", 64, seed=3, max_words=200)
        print("| run | step time (s, steps 3..N) | peak RSS (GB) | start-up |")
        print("|---|---|---|---|")
        for name, extra in (("plain", ()), (f"OSFT r={ratio}", ("--osft", "--osft-unfreeze-rank-ratio", ratio))):
            out = tmp / name.replace(" ", "_")
            stdout = train(model, data, out, steps, "--no-save-final-checkpoint", *extra)
            rows = [json.loads(line) for line in open(out / "training_metrics_0.jsonl")]
            step_time = sum(r["time_per_step"] for r in rows[2:]) / len(rows[2:])
            svd = re.search(r"osft: .*", stdout)
            print(f"| {name} | {step_time:.2f} | {rows[-1]['peak_memory_gb']:.2f} | {svd.group(0) if svd else '-'} |")


@app.command()
def paths(out_features: int = 4864, in_features: int = 896, ratio: float = 0.25, repeats: int = 5):
    """Forward + backward time of one OSFT target through the rebuilt dense weight and through the factors, next
    to a plain Linear, for a few token counts: where the FLOP rule in OSFTLinear.forward switches."""
    import time

    import torch
    from torch import nn

    import osft

    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False)
    module = osft.OSFTLinear.from_linear(linear, int((1 - ratio) * min(out_features, in_features)))

    def seconds(fn, x):
        fn(x).sum().backward()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            fn(x).sum().backward()
        return (time.perf_counter() - start) / repeats

    print(
        f"| tokens | plain Linear (ms) | OSFT dense (ms) | OSFT factors (ms) | rule picks |  ({out_features}x{in_features}, r={ratio})"
    )
    print("|---|---|---|---|---|")
    for tokens in (16, 128, 1024, 8192):
        x = torch.randn(tokens, in_features)
        dense = seconds(lambda x: module.through_dense(x, *module.factors()), x)
        factored = seconds(lambda x: module.through_factors(x, *module.factors()), x)
        n, m, r = out_features, in_features, min(out_features, in_features)
        pick = "dense" if n * m * r + tokens * n * m <= tokens * r * (n + m) else "factors"
        print(f"| {tokens} | {1e3 * seconds(linear, x):.1f} | {1e3 * dense:.1f} | {1e3 * factored:.1f} | {pick} |")


if __name__ == "__main__":
    app()
