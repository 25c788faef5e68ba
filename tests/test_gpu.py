"""GPU paths (bf16 compute, flash-attn varlen, Liger): skipped without CUDA. Run them on a GPU machine with
`python -m pytest -q -m gpu`."""

import importlib.util
import json

import pytest

import tiny_model
from conftest import ROOT, run_script, tokenize


@pytest.mark.gpu
@pytest.mark.parametrize("liger", [False, True])
def test_bf16_training_on_gpu(qwen_dir, tmp_path, liger):
    if liger and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel not installed")
    src = tiny_model.write_jsonl(tmp_path / "m.jsonl", tiny_model.make_conversations(64, seed=1))
    data = tokenize(src, qwen_dir, tmp_path / "d.jsonl")
    out = tmp_path / "run"
    r = run_script(
        ROOT / "train.py",
        "--model-name-or-path",
        qwen_dir,
        "--data-path",
        data,
        "--output-dir",
        out,
        "--batch-size",
        16,
        "--max-tokens-per-gpu",
        8192,
        "--max-steps",
        8,
        "--learning-rate",
        3e-3,
        *(["--use-liger-kernels"] if liger else []),
    )
    assert r.returncode == 0, r.stderr
    params = json.loads((out / "training_params.json").read_text())
    assert params["compute_dtype"] == "bfloat16"
    metrics = [json.loads(line) for line in open(out / "training_metrics_0.jsonl")]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert metrics[0]["peak_memory_gb"] > 0
