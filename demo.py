"""The demo: the built-in tiny model learns a task you can ask it about, in under two minutes on 2 CPU cores.

    python demo.py [--out-dir DIR]        (or ./dev.sh demo, which sets up .venv/ first)

1. builds the tiny random Qwen2 and its tokenizer (tiny_model.py, no hub),
2. writes the task as conversations: "reverse 58203" -> "30285", 3 to 8 digits, with held-out prompts that never
   occur in training,
3. tokenizes both splits with process_data.py,
4. answers the held-out prompts greedily with the base model and scores exact matches,
5. trains with `torchrun --nproc-per-node 2 train.py` on CPU, measuring val_loss on the held-out split,
6. answers the same prompts with the final checkpoint, plots the curves, and says where everything is.

Each run writes to a fresh folder (runs/demo-TIMESTAMP by default), so running it again never touches an earlier run.
"""

import datetime
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import typer

import tiny_model

ROOT = Path(__file__).resolve().parent


def make_task(num_train: int, num_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Digit-reversal conversations, distinct prompts: a held-out prompt never occurs in the training split.

    Digits, because the tokenizer splits every digit into a token of its own (Qwen2's pre-tokenizer): the answer
    is the prompt's tokens in reverse order, which the tiny model can learn in a few hundred steps."""
    rng = random.Random(seed)
    prompts = set()
    rows = []
    while len(rows) < num_train + num_heldout:
        digits = "".join(rng.choices("0123456789", k=rng.randint(3, 8)))
        prompt = f"reverse {digits}"
        if prompt not in prompts:
            prompts.add(prompt)
            answer = digits[::-1]
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return rows[:num_train], rows[num_train:]


def generate_answers(model_dir: Path, prompts: list[str], batch_size: int = 100) -> list[str]:
    """The model's greedy answer to each prompt, asked as one user turn through the chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # every row of a batch then continues from its own last token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    answers = []
    for i in range(0, len(prompts), batch_size):
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts[i : i + batch_size]
        ]
        # The template writes its own special tokens; the tokenizer must not add more.
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=16, do_sample=False)
        answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference."""
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def run(*cmd) -> None:
    """Run a repo script as a user would type it, its output on the console; stop the demo if it fails."""
    cmd = [str(c) for c in cmd]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    # CPU only, on a GPU machine too: the demo is the same 2-rank CPU run everywhere (two ranks would otherwise
    # share one GPU).
    if subprocess.run(cmd, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}).returncode:
        sys.exit(f"demo: failed: {' '.join(cmd)}")


def main(
    out_dir: Path = typer.Option(None, help="New folder for all the demo writes. Default: runs/demo-TIMESTAMP."),
    num_train: int = typer.Option(5000, help="Training conversations."),
    num_heldout: int = typer.Option(200, help="Held-out conversations: validation set and exact-match prompts."),
    epochs: int = typer.Option(3, help="Passes over the training conversations."),
):
    """Train the tiny model to reverse digit strings and show held-out exact-match accuracy before and after."""
    start = time.time()
    out_dir = (out_dir or ROOT / "runs" / f"demo-{datetime.datetime.now():%Y%m%d-%H%M%S}").resolve()
    if out_dir.exists():
        sys.exit(f"demo: {out_dir} exists; pass a new --out-dir (each run gets a folder of its own)")
    out_dir.mkdir(parents=True)
    python = sys.executable  # the interpreter running the demo (.venv's), whatever is on PATH

    model_dir = tiny_model.build_model(out_dir / "base_model")
    train, heldout = make_task(num_train, num_heldout)
    for name, rows in (("train", train), ("heldout", heldout)):
        tiny_model.write_jsonl(out_dir / f"{name}_messages.jsonl", rows)
        cmd = [python, "process_data.py", "--input-file", out_dir / f"{name}_messages.jsonl"]
        run(*cmd, "--output-file", out_dir / f"{name}.jsonl", "--model-name-or-path", model_dir, "--num-proc", 1)

    prompts = [row["messages"][0]["content"] for row in heldout]
    references = [row["messages"][1]["content"] for row in heldout]
    print(f"\nasking the base model the {len(prompts)} held-out prompts...", flush=True)
    before = generate_answers(model_dir, prompts)

    # `python -m torch.distributed.run` is `torchrun`, from the demo's own interpreter.
    # --standalone: a free rendezvous port, so a second demo (or any torchrun) running meanwhile cannot join this one.
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", 2, "train.py"]
    cmd += ["--model-name-or-path", model_dir]
    cmd += ["--data-path", out_dir / "train.jsonl", "--validation-data-path", out_dir / "heldout.jsonl"]
    cmd += ["--output-dir", out_dir / "train", "--batch-size", 64, "--max-tokens-per-gpu", 4096, "--max-epochs", epochs]
    run(*cmd, "--learning-rate", 3e-3, "--lr-scheduler", "cosine", "--num-warmup-steps", 10)
    run(python, "batch_metrics.py", "plot", out_dir / "train")

    checkpoint = max((out_dir / "train" / "hf_format").iterdir(), key=lambda p: int(p.name.rsplit("_", 1)[1]))
    print(f"\nasking the checkpoint the {len(prompts)} held-out prompts...", flush=True)
    after = generate_answers(checkpoint, prompts)
    results = {
        "exact_match_before": exact_match(before, references),
        "exact_match_after": exact_match(after, references),
        "answers": [
            {"prompt": p, "reference": r, "base_model": b, "checkpoint": a}
            for p, r, b, a in zip(prompts, references, before, after)
        ],
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    print("\nheld-out examples (greedy):")
    for row in results["answers"][:6]:
        print(f"  {row['prompt']!r:<18} base model {row['base_model'][:24]!r:<28} checkpoint {row['checkpoint']!r}")
    before_pct, after_pct = results["exact_match_before"], results["exact_match_after"]
    print(f"\nexact answers on {len(prompts)} held-out prompts: base model {before_pct:.0%}, trained {after_pct:.0%}")
    print(f"({time.time() - start:.0f} s in all)")
    print(f"\nwritten to {out_dir}/")
    for path, what in (
        ("base_model/", "the tiny random model and tokenizer the run starts from"),
        ("train_messages.jsonl, heldout_messages.jsonl", "the task as conversations"),
        ("train.jsonl, heldout.jsonl", "the same, tokenized by process_data.py"),
        ("train/training_metrics_0.jsonl", "a row per step (loss, lr, ...) and per validation (val_loss)"),
        ("train/training_curves.png", "loss and val_loss, lr, grad norm, tokens/s"),
        (f"train/hf_format/{checkpoint.name}/", "the trained model (AutoModelForCausalLM.from_pretrained loads it)"),
        ("results.json", "exact-match accuracy and every held-out answer, before and after"),
    ):
        print(f"  {path:<48} {what}")


if __name__ == "__main__":
    typer.run(main)
