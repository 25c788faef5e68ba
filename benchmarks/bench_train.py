"""Training throughput: leantrain (1 and 2 ranks, and 1 without FSDP) vs TRL's SFTTrainer vs a plain padding-free loop.

    pip install -e ".[bench]"
    python benchmarks/bench_train.py [--steps 20] [--batch-size 8] [--conversations 400]

Same built-in tiny Qwen2 (hidden 128, 2 layers, vocab 4000, ~1.5M parameters), same conversations, same number
of optimizer steps of `--batch-size` conversations, fp32, no gradient checkpointing, each in its own process
(torch's default threads: both cores for one process; torchrun gives each of 2 ranks one). Reported: real
(non-pad) tokens/s over steps 3..N and each process's peak RSS; ratios against TRL and the plain loop.
"""

import json
import os
import resource
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
FIRST_MEASURED = 2  # steps 3..N: skip warm-up


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def throughput(tokens: list[int], step_ends: list[float]) -> float:
    """Tokens of steps 3..N over the time from the end of step 2 to the end of step N."""
    return sum(tokens[FIRST_MEASURED:]) / (step_ends[-1] - step_ends[FIRST_MEASURED - 1])


@app.command()
def plain(model_dir: Path, data: Path, steps: int, batch_size: int, result: Path):
    """A plain padding-free loop: pack each batch into one row, HF forward with labels (sdpa), AdamW."""
    import torch
    from transformers import AutoModelForCausalLM

    from dataset import load_tokenized
    from sampler import GlobalSampler

    dataset = load_tokenized(data, 10**9)
    order = GlobalSampler(len(dataset), seed=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    tokens, ends = [], []
    for _ in range(steps):
        idx = order.next_indices(batch_size)
        ids, labels, pos = [], [], []
        for i in idx:
            s, e = dataset.offsets[i], dataset.offsets[i + 1]
            lab = dataset.labels[s:e].copy()
            lab[0] = -100  # HF shifts over the whole row: never predict a sample's first token
            ids.append(dataset.input_ids[s:e])
            labels.append(lab)
            pos.append(range(e - s))
        row = lambda parts: torch.tensor([x for p in parts for x in p], dtype=torch.long)[None]  # noqa: E731
        loss = model(input_ids=row(ids), labels=row(labels), position_ids=row(pos), use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        tokens.append(sum(len(x) for x in ids))
        ends.append(time.perf_counter())
    result.write_text(json.dumps({"tok_s": throughput(tokens, ends), "rss_gb": peak_rss_gb()}))


@app.command()
def trl(model_dir: Path, messages: Path, steps: int, batch_size: int, result: Path):
    """TRL SFTTrainer: padding_free, assistant-only loss, fp32, no gradient checkpointing."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = tiny_model.CHATML_GENERATION_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    dataset = Dataset.from_list([json.loads(line) for line in open(messages)])
    ends, tokens = [], []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=1e-4,
            padding_free=True,
            assistant_only_loss=True,
            max_length=None,
            bf16=False,
            use_cpu=True,
            gradient_checkpointing=False,
            report_to=[],
            save_strategy="no",
            logging_steps=10**9,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimes()]
        )
        collate = trainer.data_collator

        def counting_collator(examples):
            tokens.append(sum(len(e["input_ids"]) for e in examples))
            return collate(examples)

        trainer.data_collator = counting_collator
        trainer.train()
    result.write_text(json.dumps({"tok_s": throughput(tokens[:steps], ends), "rss_gb": peak_rss_gb()}))


def run_leantrain(model_dir, data, steps, batch_size, out, nproc, script=ROOT / "train.py", extra=()) -> dict:
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", "29533"]
    )
    cmd = [
        *launcher,
        str(script),
        "--model-name-or-path",
        str(model_dir),
        "--data-path",
        str(data),
        "--output-dir",
        str(out),
        "--batch-size",
        str(batch_size),
        "--max-tokens-per-gpu",
        "8192",
        "--max-steps",
        str(steps),
        "--learning-rate",
        "1e-4",
        "--seed",
        "0",
        "--no-save-final-checkpoint",
        *extra,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    m = [json.loads(line) for line in open(out / "training_metrics_0.jsonl")][FIRST_MEASURED:]
    return {
        "tok_s": sum(x["num_total_tokens"] for x in m) / sum(x["time_per_step"] for x in m),
        "rss_gb": max(x["peak_memory_gb"] for x in m),
    }


def run_worker(name, *args) -> dict | None:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        r = subprocess.run([sys.executable, __file__, name, *map(str, args), f.name], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name} failed:\n{r.stderr[-2000:]}")
            return None
        return json.loads(Path(f.name).read_text())


def make_inputs(work: Path, conversations: int):
    """The tiny model, its conversations and their tokenized form."""
    model_dir = tiny_model.build_model(work / "model")
    messages = tiny_model.write_jsonl(work / "messages.jsonl", tiny_model.make_conversations(conversations))
    data = work / "data.jsonl"
    process = [sys.executable, str(ROOT / "process_data.py"), "--input-file", str(messages)]
    process += ["--output-file", str(data), "--model-name-or-path", str(model_dir)]
    subprocess.run(process, check=True, capture_output=True)
    return model_dir, messages, data


@app.command("per-sample")
def per_sample(steps: int = 20, batch_size: int = 8, conversations: int = 400, repeats: int = 5, nproc: int = 1):
    """tok/s with per-sample losses (--log-loss-quantiles: summed per sample on the device, carried by the step's
    all-reduce) against without, runs interleaved, `repeats` of each; the median ratio, and the spread of the
    baseline's own runs as the noise floor."""
    import statistics

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, _, data = make_inputs(work, conversations)
        runs = {"without": [], "with": []}
        for i in range(repeats):
            for name, extra in (("without", ()), ("with", ("--log-loss-quantiles",))):
                out = work / f"{name}{i}"
                runs[name].append(run_leantrain(model_dir, data, steps, batch_size, out, nproc, extra=extra)["tok_s"])
    base, new = statistics.median(runs["without"]), statistics.median(runs["with"])
    spread = (max(runs["without"]) - min(runs["without"])) / base
    print(
        f"tiny Qwen2, {batch_size} conversations/step, {steps} steps, {nproc} rank(s), {repeats} interleaved runs each"
    )
    print(f"without per-sample losses: median {base:.0f} tok/s  {[round(x) for x in runs['without']]}")
    print(f"with per-sample losses:    median {new:.0f} tok/s  {[round(x) for x in runs['with']]}")
    print(f"ratio with/without: {new / base:.3f} (the baseline's own spread, max-min over median: {spread:.1%})")


@app.command()
def compare(steps: int = 20, batch_size: int = 8, conversations: int = 400):
    """Run all trainers and print tokens/s and peak RSS with ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, messages, data = make_inputs(work, conversations)
        results = {
            "leantrain, 1 rank": run_leantrain(model_dir, data, steps, batch_size, work / "lt1", 1),
            "leantrain, 2 ranks": run_leantrain(model_dir, data, steps, batch_size, work / "lt2", 2),
            "leantrain, no FSDP": run_leantrain(
                model_dir, data, steps, batch_size, work / "lt0", 1, ROOT / "benchmarks/unsharded.py"
            ),
            "plain padding-free loop": run_worker("plain", model_dir, data, steps, batch_size),
            "TRL SFTTrainer": run_worker("trl", model_dir, messages, steps, batch_size),
        }
    print(
        f"tiny Qwen2, {batch_size} conversations/step, {steps} steps (tok/s over steps {FIRST_MEASURED + 1}-{steps}),"
        f" fp32, {os.cpu_count()} CPUs"
    )
    trl_tps = (results["TRL SFTTrainer"] or {}).get("tok_s")
    plain_tps = (results["plain padding-free loop"] or {}).get("tok_s")
    for name, r in results.items():
        if r is None:
            continue
        ratios = "".join(
            f" | {r['tok_s'] / base:5.2f}x {label}" for label, base in (("TRL", trl_tps), ("plain", plain_tps)) if base
        )
        print(f"{name:24} {r['tok_s']:8.0f} tok/s | peak RSS {r['rss_gb'] * 1024:6.0f} MB (per process){ratios}")


if __name__ == "__main__":
    app()
