"""What checkpoint integrity costs: sha256 of every file written (at save) and read (at resume), next to the save.

    python benchmarks/bench_checkpoint.py [--hidden 768 --layers 12]

Trains one step of a Qwen2-shaped model built from a config (random weights, fp32, ~85M parameters by default) on
one process with a checkpoint at the end, and reports the save time, the part of it spent hashing (train.py's own
`saved checkpoint ... (X s, hashing Y s)` line) and the time to verify both folders as `--resume` does.
"""

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
import integrity  # noqa: E402
import tiny_model  # noqa: E402
from utils import Dist  # noqa: E402

app = typer.Typer(add_completion=False)


@app.command()
def main(hidden: int = 768, layers: int = 12, intermediate: int = 2048):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_model.build_model(
            tmp / "model", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate
        )
        messages = tiny_model.write_jsonl(tmp / "m.jsonl", tiny_model.make_conversations(16, max_words=40))
        data = tmp / "data.jsonl"
        subprocess.run(
            [sys.executable, ROOT / "process_data.py", "--input-file", messages, "--output-file", data,
             "--model-name-or-path", model, "--num-proc", "1"],
            check=True, capture_output=True,
        )  # fmt: skip
        out = tmp / "run"
        r = subprocess.run(
            [sys.executable, ROOT / "train.py", "--model-name-or-path", model, "--data-path", data,
             "--output-dir", out, "--batch-size", "4", "--max-tokens-per-gpu", "4096", "--max-steps", "1"],
            capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "", **__import__("os").environ},
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        save_s, hash_s = map(
            float, re.search(r"saved checkpoint .* \(([\d.]+) s, hashing ([\d.]+) s\)", r.stdout).groups()
        )
        sizes = {
            kind: sum(p.stat().st_size for p in (out / kind).rglob("*") if p.is_file()) / 2**30
            for kind in (integrity.STATE_DIR, integrity.HF_DIR)
        }
        start = time.perf_counter()
        for kind in (integrity.STATE_DIR, integrity.HF_DIR):
            integrity.verify(out / kind / "samples_4", kind, Dist(0, 0, 1, None), checkpoint.TrainState.checked)
        verify_s = time.perf_counter() - start
        params = sum(
            p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model).parameters()
        )
        print(
            f"model: {params / 1e6:.0f}M parameters; state {sizes['full_state']:.2f} GiB, HF {sizes['hf_format']:.2f} GiB"
        )
        print(f"save: {save_s:.1f} s, of which hashing {hash_s:.1f} s ({100 * hash_s / save_s:.0f}%)")
        print(f"verify at resume (1 rank): {verify_s:.1f} s")


if __name__ == "__main__":
    app()
