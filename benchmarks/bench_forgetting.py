"""Forgetting: how much of task A a model keeps while it learns task B, full fine-tuning vs OSFT. CPU, fp32.

    python benchmarks/bench_forgetting.py run      # the table: the base, then 20 runs on task B (~11 min, 2 cores)
    python benchmarks/bench_forgetting.py base --init-std 0.02 --weight-decay 0 --steps 235   # one base's properties

Task A: "reverse 58203" -> "30285" (the demo's task). Task B: "copy 58203" -> "58203": the same digit tokens in the
opposite order, behind another instruction word, so that one model can know both (a prompt with two answers could
be kept by no method). Every digit string occurs once over both tasks' training and held-out sets.

The base: the demo's tiny Qwen2 (hidden 128, 2 layers), trained on task A from random weights. `base` prints, for
a construction (init std, weight decay, steps), the base's exact match on each task and, over its 14 target
matrices (mean, min..max), what OSFT relies on: whether the top singular directions of each trained W are what
training wrote, measured against the random init W0 (dW = W - W0):
  |dW|/|W|            the share of W's norm training wrote (1: none of the init left)
  dW in top 1/4       the share of dW's energy inside W's top R/4 singular directions, both sides (|U^T dW V|^2 / |dW|^2),
                      next to a random subspace's share (k/N)(k/M)
  dW in frozen        the same for the k = floor((1 - r) R) directions OSFT freezes at ratio r
  top 1/4 kept        the overlap of W's top R/4 left singular subspace with W0's (|U0^T U|^2 / k; a random
                      subspace's is k/N): near it, the top directions moved away from the init
`run` builds the base chosen that way (init std 0.01, weight decay 0.1, 400 steps; why: docs/BENCHMARKS.md), prints
its properties, then trains task B from it, each run its own train.py process on one thread, two runs at a time:
full fine-tuning, and OSFT at ratio r with the global ratio and with per-layer ranks from importance (calibrated on
task A's training data), each with non-targets (embeddings, LM head, norms) trained and frozen; at each learning
rate, seeds 0 and 1 (data order and torch). Every `--every` steps an HF checkpoint is scored by greedy exact match
on 200 held-out prompts of each task, and train.py logs val_loss/A and val_loss/B (two validation sets).
Reported per method and lr (mean of the seeds): the last checkpoint's A kept and B learnt, A kept at the first
checkpoint where B reaches 10% and 50%, and val_loss/A where val_loss/B first reaches 1.5 (matched task B), both
val_loss curves; then each method's best at matched task B over the lrs.
"""

import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import demo  # noqa: E402
import tiny_model  # noqa: E402

app = typer.Typer(add_completion=False)
ENV = {"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TASKS = {"A": ("reverse", lambda digits: digits[::-1]), "B": ("copy", lambda digits: digits)}
TARGET = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")  # OSFT's default targets
BATCH = 64
THRESHOLDS = (0.1, 0.5)  # task-B exact match at which the methods' task-A exact match is compared
# and the task-B val_loss at which their task-A val_loss is: it moves long before B's exact match (development runs,
# lr 1e-3: full fine-tuning reached it at step 60, OSFT global at 180)
VAL_B = 1.5


def sh(*args, threads: int) -> str:
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{r.stderr[-3000:]}")
    return r.stdout


def make_data(work: Path, model: Path, num_train: int, num_heldout: int) -> dict:
    """Each task's training and held-out conversations, tokenized; digit strings distinct over all four sets."""
    rng, seen, paths = random.Random(0), set(), {}
    for task, (word, answer) in TASKS.items():
        for split, n in (("train", num_train), ("heldout", num_heldout)):
            rows = []
            while len(rows) < n:
                digits = "".join(rng.choices("0123456789", k=rng.randint(3, 8)))
                if digits not in seen:
                    seen.add(digits)
                    user, assistant = f"{word} {digits}", answer(digits)
                    rows.append(
                        {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}
                    )
            messages = tiny_model.write_jsonl(work / f"{task}_{split}.messages.jsonl", rows)
            paths[task, split] = work / f"{task}_{split}.jsonl"
            sh(ROOT / "process_data.py", "--input-file", messages, "--output-file", paths[task, split],
               "--model-name-or-path", model, "--num-proc", 1, threads=1)  # fmt: skip
            if split == "heldout":
                paths[task, "prompts"] = [[r["messages"][0]["content"], r["messages"][1]["content"]] for r in rows]
    return paths


def train(model, data, out, steps, every, paths, *flags, threads) -> str:
    """A train.py run measuring val_loss/A and val_loss/B and saving an HF checkpoint every `every` steps; its output."""
    validation = f"A={paths['A', 'heldout']},B={paths['B', 'heldout']}"
    return sh(ROOT / "train.py", "--model-name-or-path", model, "--data-path", data, "--output-dir", out,
       "--batch-size", BATCH, "--max-tokens-per-gpu", 8192, "--max-steps", steps, "--validation-data-path", validation,
       "--validation-frequency", every, "--min-samples-per-checkpoint", every * BATCH, *flags, threads=threads)  # fmt: skip


def checkpoints(out: Path) -> dict[int, Path]:
    return {int(p.name.split("_")[1]) // BATCH: p for p in (out / "hf_format").iterdir()}


def val_losses(out: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in open(out / "training_metrics_0.jsonl")]
    return {r["step"]: (r["val_loss/A"], r["val_loss/B"]) for r in rows if "val_loss/A" in r}


@app.command(hidden=True)
def score(run_dir: Path, prompts: Path, result: Path):
    """Greedy exact match of each of a run's HF checkpoints on each task's held-out prompts (its own process, one
    thread, beside the other training run)."""
    sets = json.loads(prompts.read_text())
    scores = {}
    for step, path in sorted(checkpoints(run_dir).items()):
        asked = [p for rows in sets.values() for p, _ in rows]
        answers = iter(demo.generate_answers(path, asked))
        scores[step] = {
            task: demo.exact_match([next(answers) for _ in rows], [a for _, a in rows]) for task, rows in sets.items()
        }
    result.write_text(json.dumps(scores))


def scored(work: Path, out: Path, paths: dict) -> dict[int, dict]:
    """{step: {"A": exact match, "B": ..., "val": (val_loss/A, val_loss/B)}} of a finished run; its checkpoints are
    deleted after (they are ~25 MB each)."""
    prompts = work / "prompts.json"
    result = out / "scores.json"
    sh(__file__, "score", out, prompts, result, threads=1)
    val = val_losses(out)
    shutil.rmtree(out / "hf_format")
    shutil.rmtree(out / "full_state")
    return {int(step): s | {"val": val[int(step)]} for step, s in json.loads(result.read_text()).items()}


def properties(init: Path, base: Path, ratio: float) -> dict[str, list[float]]:
    """Per target matrix: |dW|/|W|, dW's energy share in W's top R/4 and frozen k directions (with a random
    subspace's share), overlap of W's top R/4 left singular subspace with the init's (and a random one's)."""
    import torch
    from safetensors.torch import load_file

    w0s, ws = load_file(init / "model.safetensors"), load_file(base / "model.safetensors")
    found = {key: [] for key in ("learnt", "top", "top_chance", "frozen", "frozen_chance", "kept", "kept_chance")}
    for name in sorted(n for n in ws if TARGET.fullmatch(n)):
        w0, w = w0s[name].double(), ws[name].double()
        dw = w - w0
        (n, m), rank = w.shape, min(w.shape)
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        u0 = torch.linalg.svd(w0, full_matrices=False)[0]
        top, frozen = rank // 4, math.floor((1 - ratio) * rank)
        for key, k in (("top", top), ("frozen", frozen)):
            found[key].append(float((u[:, :k].T @ dw @ vh[:k].T).square().sum() / dw.square().sum()))
            found[f"{key}_chance"].append(k / n * k / m)
        found["learnt"].append(float(dw.norm() / w.norm()))
        found["kept"].append(float((u0[:, :top].T @ u[:, :top]).square().sum() / top))
        found["kept_chance"].append(top / n)
    return found


def build_base(work: Path, paths: dict, init: Path, init_std, weight_decay, steps, lr) -> tuple[Path, dict]:
    """Train the init on task A (cosine schedule, 2 threads); returns the base's HF folder and its step-0 scores."""
    out = work / "base"
    train(init, paths["A", "train"], out, steps, steps, paths, "--learning-rate", lr, "--lr-scheduler", "cosine",
          "--num-warmup-steps", 10, "--weight-decay", weight_decay, threads=2)  # fmt: skip
    base = work / "base_model"
    shutil.copytree(checkpoints(out)[steps], base)
    return base, scored(work, out, paths)[steps]


def describe_base(init_std, weight_decay, steps, lr, ratio, found: dict, at_end: dict) -> None:
    print(
        f"base: init std {init_std:g}, task A {steps} steps x {BATCH} (lr {lr:g} cosine, weight decay {weight_decay:g}): "
        f"exact match A {at_end['A']:.0%}, B {at_end['B']:.0%}; val_loss A {at_end['val'][0]:.3f}, B {at_end['val'][1]:.3f}"
    )

    def spread(key):
        v = found[key]
        return f"{statistics.mean(v):.2f} ({min(v):.2f}..{max(v):.2f})"

    print(f"  over its {len(found['learnt'])} target matrices, mean (min..max):")
    print(f"  |dW|/|W|              {spread('learnt')}")
    print(f"  dW in top 1/4         {spread('top')}   random subspace {spread('top_chance')}")
    print(f"  dW in frozen (r={ratio:g})  {spread('frozen')}   random subspace {spread('frozen_chance')}")
    print(f"  top 1/4 kept from W0  {spread('kept')}   random subspace {spread('kept_chance')}")


def prepare(work: Path, init_std: float, num_train: int) -> tuple[Path, dict]:
    init = tiny_model.build_model(work / "init", initializer_range=init_std)
    paths = make_data(work, init, num_train, 200)
    (work / "prompts.json").write_text(json.dumps({task: paths[task, "prompts"] for task in TASKS}))
    return init, paths


@app.command()
def base(init_std: float = 0.02, weight_decay: float = 0.0, steps: int = 235, lr: float = 3e-3, ratio: float = 0.25):
    """One base construction's properties (the demo's: init std 0.02, no weight decay, 235 steps)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        init, paths = prepare(work, init_std, 5000)
        model, at_end = build_base(work, paths, init, init_std, weight_decay, steps, lr)
        describe_base(init_std, weight_decay, steps, lr, ratio, properties(init, model, ratio), at_end)


def matched():
    """(label, B reached?, A's value there, format, better of two A values) for each task-B level compared at."""
    exact = [(f"A @ B>={t:.0%}", lambda s, t=t: s["B"] >= t, lambda s: s["A"], "{:.0%}", max) for t in THRESHOLDS]
    return exact + [(f"valA @ valB<={VAL_B:g}", lambda s: s["val"][1] <= VAL_B, lambda s: s["val"][0], "{:.2f}", min)]


def report(methods, rates, seeds, paths_of) -> None:
    """The table per method and lr, the val_loss curves, each method's best A kept at matched task B."""
    print(f"{'':46}{'A kept':>8}{'B learnt':>10}" + "".join(f"{label:>22}" for label, *_ in matched()))
    best = {}
    for name in methods:
        for lr in rates:
            runs = [paths_of[name, lr, seed] for seed in range(seeds)]
            cells = ""
            for label, reached, value, fmt, better in matched():
                # the first checkpoint of each seed's run where task B reached the level: A's value, the step
                hits = [next(((step, s) for step, s in sorted(r.items()) if reached(s)), None) for r in runs]
                kept, at = [h and value(h[1]) for h in hits], [h and h[0] for h in hits]
                if None in kept:
                    cells += f"{f'- ({len(runs) - kept.count(None)}/{len(runs)} seeds)':>22}"
                else:
                    mean = statistics.mean(kept)
                    cells += f"{fmt.format(mean) + f' @{statistics.mean(at):.0f}':>22}"
                    best[name, label] = better(best.get((name, label), (mean, lr)), (mean, lr), key=lambda x: x[0])
            last = [r[max(r)] for r in runs]
            a, b = statistics.mean(s["A"] for s in last), statistics.mean(s["B"] for s in last)
            print(f"{name + f'  lr {lr:g}':46}{a:8.0%}{b:10.0%}{cells}")
    steps = sorted(next(iter(paths_of.values())))
    print(f"\nval_loss/A and val_loss/B (mean of the seeds) at steps {', '.join(map(str, steps))}")
    for name in methods:
        for lr in rates:
            runs = [paths_of[name, lr, seed] for seed in range(seeds)]
            for i, task in enumerate(TASKS):
                curve = " ".join(f"{statistics.mean(r[step]['val'][i] for r in runs):.2f}" for step in steps)
                print(f"{(name + f'  lr {lr:g}') if i == 0 else '':46}{task} {curve}")
    print("\nbest over the lrs at matched task B (mean of the seeds; its lr):")
    for name in methods:
        cells = [
            f"{label}: "
            + (
                f"{fmt.format(best[name, label][0])} (lr {best[name, label][1]:g})"
                if (name, label) in best
                else "not reached"
            )
            for label, _, _, fmt, _ in matched()
        ]
        print(f"  {name:38}" + "   ".join(cells))


@app.command()
def run(
    init_std: float = 0.01,
    weight_decay: float = 0.1,
    base_steps: int = 400,
    base_lr: float = 3e-3,
    ratio: float = 0.25,
    lrs: str = "3e-4,1e-3",
    steps: int = 200,
    every: int = 20,
    seeds: int = 2,
):
    """The base, its properties, then every method at every lr and seed on task B; the tables."""
    start = time.time()
    rates = [float(x) for x in lrs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        init, paths = prepare(work, init_std, 5000)
        model, at_end = build_base(work, paths, init, init_std, weight_decay, base_steps, base_lr)
        describe_base(init_std, weight_decay, base_steps, base_lr, ratio, properties(init, model, ratio), at_end)
        osft = ["--osft", "--osft-unfreeze-rank-ratio", ratio]
        importance = ["--osft-rank-allocation", "importance", "--osft-calibration-data-path", paths["A", "train"]]
        methods = {
            "full fine-tuning": [],
            "OSFT global": osft,
            "OSFT global, non-targets frozen": [*osft, "--osft-freeze-non-targets"],
            "OSFT importance": [*osft, *importance],
            "OSFT importance, non-targets frozen": [*osft, *importance, "--osft-freeze-non-targets"],
        }
        jobs = [(name, lr, seed) for name in methods for lr in rates for seed in range(seeds)]

        def one(job):
            name, lr, seed = job
            out = work / f"run{jobs.index(job)}"
            output = train(model, paths["B", "train"], out, steps, every, paths, "--learning-rate", lr,
                           "--num-warmup-steps", 5, "--seed", seed, *methods[name], threads=1)  # fmt: skip
            if (name, lr, seed) == ("OSFT importance", rates[0], 0):  # the ranks it chose (the same in every run)
                print("\n".join(line for line in output.splitlines() if line.startswith("osft: ")), flush=True)
            return {0: at_end} | scored(work, out, paths)

        with ThreadPoolExecutor(2) as pool:  # two one-thread processes at a time: the 2 cores
            paths_of = dict(zip(jobs, pool.map(one, jobs)))

    print(
        f"\ntask B: {len(jobs)} runs ({len(methods)} methods x {len(rates)} lrs x {seeds} seeds), {steps} steps x "
        f"{BATCH}, constant lr after 5 warmup steps, OSFT r={ratio:g}; exact match on 200 held-out prompts per task, "
        "mean of the seeds; A @ B>=X: A's exact match at the first checkpoint where B's reaches X, @ that step ('-': "
        "not every seed reached it); valA @ valB<=Y: val_loss/A where val_loss/B first reaches Y"
    )
    report(methods, rates, seeds, paths_of)
    print(f"\n{len(jobs) + 1} train.py runs (1 base + {len(jobs)} on task B), {time.time() - start:.0f} s in all")


if __name__ == "__main__":
    app()
