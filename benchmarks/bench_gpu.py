"""GPU throughput, MFU and peak memory: leantrain against TRL's SFTTrainer on Qwen2.5-shaped models.

    python benchmarks/bench_gpu.py run --shape 0.5b --runs defaults-32k,defaults-64k,trl-padded,trl-liger,trl-padfree
    python benchmarks/bench_gpu.py run --list        # the runs there are

The model is built from the Qwen2.5-0.5B (or -1.5B) config with random weights; the data are 2,048 synthetic
samples with log-normal lengths (mean ~944 tokens, at most 4,096), the first 20-70% of each masked. Every run
trains 10 optimizer steps of 64 samples with bf16 compute and fp32 master weights, each in its own process, and
reports real (non-pad) tokens/s over steps 3-10, MFU and peak GPU memory (max allocated):

    MFU = FLOPs / time / 989e12, FLOPs of a step = 6 x (non-embedding + LM head parameters) x tokens
                                                  + 6 x layers x hidden x sum(s^2) over the step's sequences s

TRL runs need `trl`, `datasets` (and `liger-kernel` for the Liger runs); see docs/BENCHMARKS.md for how they were
carried to the GPU machine.
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS, BATCH, FIRST_MEASURED, PEAK_FLOPS = 10, 64, 2, 989e12
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12),
}
# name -> leantrain flags, ("unsharded", leantrain flags): the same without fully_shard, or ("trl", SFTConfig overrides)
RUNS = {
    "defaults-16k": ["--max-tokens-per-gpu", "16384"],
    "defaults-32k": ["--max-tokens-per-gpu", "32768"],
    "defaults-64k": ["--max-tokens-per-gpu", "65536"],
    "no-compile-32k": ["--max-tokens-per-gpu", "32768", "--no-compile"],
    "no-compile-64k": ["--max-tokens-per-gpu", "65536", "--no-compile"],
    "bf16-32k": ["--max-tokens-per-gpu", "32768", "--train-dtype", "bfloat16"],
    "no-fsdp-bf16-32k": ("unsharded", ["--max-tokens-per-gpu", "32768", "--train-dtype", "bfloat16"]),
    "per-sequence-32k": ["--max-tokens-per-gpu", "32768", "--attn-implementation", "leantrain_per_sequence"],
    "loss-model-32k": ["--max-tokens-per-gpu", "32768", "--loss", "model"],
    "liger-32k": ["--max-tokens-per-gpu", "32768", "--loss", "liger", "--use-liger-kernels"],
    "liger-64k": ["--max-tokens-per-gpu", "65536", "--loss", "liger", "--use-liger-kernels"],
    "liger-loss-32k": ["--max-tokens-per-gpu", "32768", "--loss", "liger"],
    "ckpt-32k": ["--max-tokens-per-gpu", "32768", "--activation-checkpointing"],
    "ckpt-64k": ["--max-tokens-per-gpu", "65536", "--activation-checkpointing"],
    "liger-ckpt-64k": ["--max-tokens-per-gpu", "65536", "--activation-checkpointing", "--use-liger-kernels"],
    "trl-padded": ("trl", {}),
    "trl-liger": ("trl", {"use_liger_kernel": True}),
    "trl-padfree": ("trl", {"padding_free": True}),
}

app = typer.Typer(add_completion=False)


def build_model(shape: str, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=151936,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1e6,
        tie_word_embeddings=True,
        use_cache=False,
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    return out


def build_data(out: Path, n: int = 2048, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(944) - 0.18, 0.6, n).astype(int), 32, 4096)
    with open(out, "w") as f:
        for length in lengths:
            ids = rng.integers(10, 151000, length).tolist()
            masked = int(length * rng.uniform(0.2, 0.7))
            labels = [-100] * masked + ids[masked:]
            f.write(json.dumps({"input_ids": ids, "labels": labels, "len": int(length)}) + "\n")
    return out


def flops_per_step(model_dir: Path, step_lengths: list[list[int]]) -> list[float]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    dense = total - embedding - (0 if config.tie_word_embeddings else head) + head
    layers, hidden = config.num_hidden_layers, config.hidden_size
    return [6 * dense * sum(s) + 6 * layers * hidden * sum(x * x for x in s) for s in step_lengths]


def summarize(model_dir, step_lengths, step_times, peak_gb) -> dict:
    flops = flops_per_step(model_dir, step_lengths)[FIRST_MEASURED:STEPS]
    seconds = sum(step_times[FIRST_MEASURED:STEPS])
    tokens = sum(sum(s) for s in step_lengths[FIRST_MEASURED:STEPS])
    return {"tok_s": tokens / seconds, "mfu": sum(flops) / seconds / PEAK_FLOPS, "peak_gb": peak_gb}


def leantrain_step_lengths(data: Path, capacity: int) -> list[list[int]]:
    """The samples of each step, replayed from leantrain's own sampler (seed 42, the default)."""
    from dataset import load_tokenized
    from sampler import GlobalSampler

    tokenized = load_tokenized(data, capacity)
    sampler = GlobalSampler(len(tokenized), 42)
    return [tokenized.lengths[sampler.next_indices(BATCH)].tolist() for _ in range(STEPS)]


def run_leantrain(model_dir: Path, data: Path, flags: list[str], work: Path, script: Path = ROOT / "train.py") -> dict:
    out = work / "out"
    cmd = [sys.executable, str(script), "--model-name-or-path", str(model_dir), "--data-path", str(data)]
    cmd += ["--output-dir", str(out), "--batch-size", str(BATCH), "--max-steps", str(STEPS)]
    cmd += ["--learning-rate", "1e-5", "--no-save-final-checkpoint", *flags]
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]}
    metrics = [json.loads(line) for line in open(out / "training_metrics_0.jsonl")]
    capacity = int(flags[flags.index("--max-tokens-per-gpu") + 1])
    lengths = leantrain_step_lengths(data, capacity)
    assert [sum(s) for s in lengths] == [m["num_total_tokens"] for m in metrics], "sampler replay differs"
    result = summarize(
        model_dir, lengths, [m["time_per_step"] for m in metrics], max(m["peak_memory_gb"] for m in metrics)
    )
    setup = next((line for line in r.stdout.splitlines() if line.startswith("model:")), "")
    return result | {"wall_s": time.perf_counter() - start, "setup": setup, "loss": [m["loss"] for m in metrics]}


@app.command(hidden=True)
def trl_worker(model_dir: Path, data: Path, overrides: str, result: Path):
    """One TRL SFTTrainer run: micro-batches of 8 x 8 accumulation steps, sdpa, bf16 autocast, fp32 weights."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in open(data)]
    dataset = Dataset.from_list(
        [{"input_ids": r["input_ids"], "completion_mask": [int(x != -100) for x in r["labels"]]} for r in rows]
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    ends, micro_lengths = [], []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            max_steps=STEPS,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=BATCH // 8,
            learning_rate=1e-5,
            bf16=True,
            max_length=None,
            completion_only_loss=True,
            gradient_checkpointing=False,
            report_to=[],
            save_strategy="no",
            logging_steps=10**9,
            dataloader_num_workers=0,  # the recording collator must run in this process
            seed=0,
            **json.loads(overrides),
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, callbacks=[StepTimes()])
        collate = trainer.data_collator

        def recording_collator(examples):
            micro_lengths.append([len(e["input_ids"]) for e in examples])
            return collate(examples)

        trainer.data_collator = recording_collator
        start = time.perf_counter()
        trainer.train()
    # The dataloader runs ahead: the first STEPS x 8 micro-batches are the ones trained on.
    per_step = BATCH // 8
    lengths = [sum(micro_lengths[i * per_step : (i + 1) * per_step], []) for i in range(STEPS)]
    times = np.diff([start, *ends]).tolist()
    peak = torch.cuda.max_memory_allocated() / 2**30
    result.write_text(json.dumps(summarize(model_dir, lengths, times, peak)))


def run_trl(model_dir: Path, data: Path, overrides: dict, work: Path) -> dict:
    result = work / "trl.json"
    start = time.perf_counter()
    cmd = [sys.executable, __file__, "trl-worker", str(model_dir), str(data), json.dumps(overrides), str(result)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(result.read_text()) | {"wall_s": time.perf_counter() - start}


@app.command()
def run(
    shape: str = typer.Option("0.5b", help="Model shape: 0.5b or 1.5b (Qwen2.5 configs, random weights)."),
    runs: str = typer.Option("defaults-32k,defaults-64k,trl-padded,trl-liger,trl-padfree", help="Comma-separated."),
    list_runs: bool = typer.Option(False, "--list", help="Print the runs there are and exit."),
    json_out: Path | None = typer.Option(None, help="Also write the results here."),
):
    if list_runs:
        for name, spec in RUNS.items():
            print(f"{name:18} {spec}")
        return
    names = runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; --list shows them")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, data = build_model(shape, work / "model"), build_data(work / "data.jsonl")
        for name in names:
            spec = RUNS[name]
            (work / name).mkdir()
            if isinstance(spec, tuple) and spec[0] == "trl":
                results[name] = run_trl(model_dir, data, spec[1], work / name)
            elif isinstance(spec, tuple):
                results[name] = run_leantrain(model_dir, data, spec[1], work / name, ROOT / "benchmarks/unsharded.py")
            else:
                results[name] = run_leantrain(model_dir, data, spec, work / name)
            print(name, json.dumps(results[name]), flush=True)
    baseline = next((results[n]["tok_s"] for n in ("trl-liger", "trl-padded") if "tok_s" in results.get(n, {})), None)
    print(f"\nQwen2.5-{shape} shape, {BATCH} samples/step, bf16, tok/s over steps {FIRST_MEASURED + 1}-{STEPS}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:18} failed: {r['error']}")
            continue
        ratio = f" | {r['tok_s'] / baseline:5.2f}x TRL+Liger" if baseline else ""
        print(f"{name:18} {r['tok_s']:9,.0f} tok/s | MFU {r['mfu']:6.1%} | peak {r['peak_gb']:5.1f} GB{ratio}")
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    app()
