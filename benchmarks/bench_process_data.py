"""process_data.py throughput vs the raw fast-tokenizer limit and TRL's dataset preparation, in one run.

    pip install -e ".[bench]"
    python benchmarks/bench_process_data.py [--num-conversations 20000]

All three see the same generated conversations (long-tailed lengths, system prompts, multi-turn, reasoning, tool
turns) and the same tiny ChatML tokenizer. TRL gets the same template with `{% generation %}` tags, which its
assistant-only loss requires. Samples/s over the whole run:
- leantrain: the real CLI (`process_data.py`, default --num-proc = CPUs), process start-up included;
- raw limit: `tokenizer(texts)` on the already rendered conversations (Rust, all cores), no template, no labels;
- TRL: `SFTTrainer(..., assistant_only_loss=True)` construction, i.e. its dataset tokenization: as configured by
  default (one process), and with `dataset_num_proc` = CPUs.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tiny_model  # noqa: E402


def bench_leantrain(src: Path, tok_dir: Path, work: Path, out_name: str = "out.jsonl") -> float:
    start = time.perf_counter()
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "process_data.py"),
            "--input-file",
            str(src),
            "--output-file",
            str(work / out_name),
            "--model-name-or-path",
            str(tok_dir),
        ],
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return elapsed


def bench_raw(conversations, tok_dir: Path) -> float:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    texts = tokenizer.apply_chat_template([c["messages"] for c in conversations], tokenize=False)
    start = time.perf_counter()
    tokenizer(texts, add_special_tokens=False)
    return time.perf_counter() - start


def bench_trl(conversations, tok_dir: Path, model_dir: Path, work: Path, num_proc: int | None) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    tokenizer.chat_template = tiny_model.CHATML_GENERATION_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    dataset = Dataset.from_list(conversations)
    config = SFTConfig(
        output_dir=str(work / "trl"),
        assistant_only_loss=True,
        max_length=None,
        use_cpu=True,
        report_to=[],
        dataset_num_proc=len(os.sched_getaffinity(0)),
        bf16=False,
    )
    start = time.perf_counter()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    elapsed = time.perf_counter() - start
    assert len(trainer.train_dataset) == len(conversations)
    return elapsed


def main(num_conversations: int = typer.Option(20000, help="Conversations to generate (>= 20k for the record).")):
    import json

    conversations = tiny_model.make_conversations(num_conversations, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = tiny_model.build_model(work / "model")
        src = work / "messages.jsonl"
        src.write_text("".join(json.dumps(c) + "\n" for c in conversations))
        t_lt = bench_leantrain(src, model_dir, work)
        one = tiny_model.write_jsonl(work / "one.jsonl", conversations[:1])
        t_startup = bench_leantrain(one, model_dir, work, "one_out.jsonl")  # imports (torch via transformers), load
        tokens = sum(json.loads(line)["len"] for line in open(work / "out.jsonl"))
        t_raw = bench_raw(conversations, model_dir)
        try:
            cpus = len(os.sched_getaffinity(0))
            t_trl = {
                "default: 1 process": bench_trl(conversations, model_dir, model_dir, work, None),
                f"{cpus} processes": bench_trl(conversations, model_dir, model_dir, work, cpus),
            }
        except ImportError:
            t_trl = {}
            print("TRL not installed (pip install -e '.[bench]'): skipping its column")
    n = num_conversations
    print(f"{n} conversations, {tokens} tokens ({tokens / n:.0f} per conversation), {os.cpu_count()} CPUs")
    print(
        f"leantrain process_data.py: {n / t_lt:8.0f} samples/s ({t_lt:.1f} s, start-up included); "
        f"{n / (t_lt - t_startup):.0f} samples/s without the {t_startup:.1f} s start-up of a 1-line run"
    )
    print(
        f"raw fast tokenizer limit : {n / t_raw:8.0f} samples/s ({t_raw:.1f} s)  -> leantrain at "
        f"{t_raw / t_lt:.2f}x of the limit ({t_lt / t_raw:.2f}x slower; {(t_lt - t_startup) / t_raw:.2f}x without start-up)"
    )
    for how, t in t_trl.items():
        print(
            f"TRL SFTTrainer prep ({how}): {n / t:6.0f} samples/s ({t:.1f} s)  -> leantrain {t / t_lt:.2f}x TRL "
            f"({t / (t_lt - t_startup):.2f}x without start-up)"
        )


if __name__ == "__main__":
    typer.run(main)
