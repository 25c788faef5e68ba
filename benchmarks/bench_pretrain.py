"""process_data.py document mode (`--pretrain-block-size`): memory flat in corpus size, throughput vs the raw tokenizer.

    pip install -e ".[bench]"          # psutil
    python benchmarks/bench_pretrain.py [--small-mb 20 --large-mb 200 --block-size 2048]

Two generated corpora of {"document": text} lines, the large one the small one's documents over and over (each
pass in another order): the same text, so only the size differs. Each is processed by the real CLI
(`--pretrain-block-size N --isolate-documents`, default --num-proc = CPUs), its process tree's memory sampled every
50 ms: peak RSS summed over the tree (forked workers share the parent's pages, so this over-counts; what matters is
the ratio) and the largest single process's peak. Raw limit = the Rust tokenizer's `encode_batch` (all cores) on
the small corpus's documents, 256 at a time, timed alone: no JSON in or out, no blocks. It is measured before and
after the CLI runs and the faster of the two is the reference (the machine's speed drifts; the faster is the
stricter limit).
"""

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tiny_model  # noqa: E402


def make_documents(megabytes: int, seed: int = 0) -> list[str]:
    """Documents of long-tailed length (20 to ~5,000 words) until `megabytes` of text."""
    rng = random.Random(seed)
    docs, size = [], 0
    while size < megabytes * 1e6:
        docs.append(tiny_model.make_text(rng, min(5000, int(rng.lognormvariate(6, 1)) + 20)))
        size += len(docs[-1])
    return docs


def write_corpus(path: Path, docs: list[str], megabytes: int) -> int:
    """Write the documents, pass after pass in a new order, until `megabytes`; returns the bytes written."""
    rng, size = random.Random(1), 0
    with open(path, "w") as f:
        while size < megabytes * 1e6:
            for doc in rng.sample(docs, len(docs)):
                size += f.write(json.dumps({"document": doc}) + "\n")
                if size >= megabytes * 1e6:
                    break
    return size


def run_measured(args: list[str]) -> tuple[float, float, float, str]:
    """Run a command; returns (seconds, peak RSS summed over its process tree, largest single process's peak RSS,
    stdout), memory in MB."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root, peak_tree, peak_one = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        rss = []
        try:
            for p in [root, *root.children(recursive=True)]:
                rss.append(p.memory_info().rss)
        except psutil.Error:  # a process ended between listing and reading
            pass
        peak_tree, peak_one = max(peak_tree, sum(rss)), max([peak_one, *rss])
        time.sleep(0.05)
    out, err = proc.communicate()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(err)
    return elapsed, peak_tree / 2**20, peak_one / 2**20, out


def process(src: Path, model_dir: Path, out: Path, block_size: int):
    cmd = [sys.executable, str(ROOT / "process_data.py"), "--input-file", str(src), "--output-file", str(out)]
    cmd += ["--model-name-or-path", str(model_dir), "--pretrain-block-size", str(block_size), "--isolate-documents"]
    return run_measured(cmd)


def raw_tokens_per_second(docs: list[str], model_dir: Path) -> tuple[float, int]:
    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(model_dir).backend_tokenizer
    tokens, elapsed = 0, 0.0
    for i in range(0, len(docs), 256):
        start = time.perf_counter()
        encoded = backend.encode_batch(docs[i : i + 256], add_special_tokens=False)
        elapsed += time.perf_counter() - start
        tokens += sum(len(e.ids) for e in encoded)
    return tokens / elapsed, tokens


def main(
    small_mb: int = typer.Option(20, help="Size of the small corpus."),
    large_mb: int = typer.Option(200, help="Size of the large corpus."),
    block_size: int = typer.Option(2048, help="--pretrain-block-size."),
):
    docs = make_documents(small_mb)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = tiny_model.build_model(work / "model")
        raw_before, small_doc_tokens = raw_tokens_per_second(docs, model_dir)
        (work / "one.jsonl").write_text(json.dumps({"document": docs[0]}) + "\n")
        t_startup = process(work / "one.jsonl", model_dir, work / "one_out.jsonl", block_size)[0]
        results = {}
        for mb in (small_mb, large_mb):
            src = work / f"corpus_{mb}.jsonl"
            size = write_corpus(src, docs, mb)
            elapsed, peak_tree, peak_one, stdout = process(src, model_dir, work / "out.jsonl", block_size)
            tokens = int(stdout.split("tokens: ")[1].split()[0])  # the summary's document tokens (EOS included)
            results[mb] = (size, elapsed, peak_tree, peak_one, tokens)
            (work / "out.jsonl").unlink()
            src.unlink()
        raw_after = raw_tokens_per_second(docs, model_dir)[0]
    raw_rate = max(raw_before, raw_after)
    print(f"{os.cpu_count()} CPUs, blocks of {block_size} with --isolate-documents, default --num-proc")
    print(
        f"raw tokenizer (encode_batch, all cores): {raw_before:,.0f} tokens/s before the runs, {raw_after:,.0f} after, "
        f"over {small_doc_tokens:,} tokens"
    )
    for size, elapsed, peak_tree, peak_one, tokens in results.values():
        rate, rate_warm = tokens / elapsed, tokens / (elapsed - t_startup)
        print(
            f"{size / 1e6:6.0f} MB, {tokens:>11,} tokens: {elapsed:6.1f} s, {rate:,.0f} tokens/s "
            f"= {rate / raw_rate:.2f}x the raw rate ({rate_warm / raw_rate:.2f}x without the {t_startup:.1f} s "
            f"start-up of a 1-line run) | peak RSS {peak_tree:,.0f} MB tree, {peak_one:,.0f} MB largest process"
        )
    (_, _, tree_small, one_small, _), (_, _, tree_large, one_large, _) = results.values()
    print(
        f"peak RSS, {large_mb} MB / {small_mb} MB corpus: {tree_large / tree_small:.2f}x (tree), "
        f"{one_large / one_small:.2f}x (largest process)"
    )


if __name__ == "__main__":
    typer.run(main)
