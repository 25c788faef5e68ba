"""GPU paths (bf16 compute, varlen attention back-ends, compile, Liger): skipped without CUDA. Run them on a GPU
machine with `python -m pytest -q -m gpu`."""

import importlib.util
import json

import pytest
import torch

import attention
import setup_model
import tiny_model
from conftest import GPU_ENV, ROOT, run_script, tokenize
from dataset import load_tokenized
from packing import collate

BACKENDS = [attention.VARLEN, attention.PER_SEQUENCE] + (
    ["flash_attention_2"] if importlib.util.find_spec("flash_attn") else []
)


@pytest.fixture(scope="module")
def gpu_data(qwen_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu")
    src = tiny_model.write_jsonl(tmp / "m.jsonl", tiny_model.make_conversations(64, seed=1))
    return tokenize(src, qwen_dir, tmp / "d.jsonl")


def train_gpu(qwen_dir, data, out, *flags):
    r = run_script(
        ROOT / "train.py",
        *("--model-name-or-path", qwen_dir, "--data-path", data, "--output-dir", out, "--batch-size", 16),
        *("--max-tokens-per-gpu", 2048, "--max-steps", 8, "--learning-rate", 3e-3, "--seed", 5, *flags),
        env=GPU_ENV,
    )
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in open(out / "training_metrics_0.jsonl")], r.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen2", "mistral-window", "gemma2-softcap"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_separate_in_bf16(tmp_path, arch, backend, gpu_data, qwen_dir):
    """A packed row through each back-end == separate per-sample forwards (the model's own eager attention and
    loss), bf16 compute: loss rel 2e-3. The window (16) is shorter than most samples."""
    from transformers import AutoModelForCausalLM

    if arch == "gemma2-softcap" and backend == attention.VARLEN:
        pytest.skip("varlen kernels have no soft-capping: auto never picks them for Gemma 2")
    attention.register_attention()
    config = {
        "qwen2": lambda: tiny_model.model_config("qwen2"),
        "mistral-window": lambda: tiny_model.arch_config("mistral", sliding_window=16),
        "gemma2-softcap": lambda: tiny_model.arch_config(
            "gemma2", head_dim=32, sliding_window=16, initializer_range=0.2, attn_logit_softcapping=1.0
        ),
    }[arch]()
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="eager").cuda()
    data = load_tokenized(gpu_data, 10_000)
    idx = list(range(12))
    ref = 0.0
    with torch.no_grad():
        for i in idx:
            mb = collate(data, [i])
            s, e = data.offsets[i], data.offsets[i + 1]
            labels = torch.tensor(data.labels[s:e], dtype=torch.long, device="cuda")[None]
            out = lm(input_ids=mb.input_ids.cuda(), labels=labels, use_cache=False)
            ref += out.loss.float().item() * mb.num_loss_tokens
        lm.set_attn_implementation(backend)
        model = setup_model.LossModel(lm, "chunked", setup_model.LogitTransform.of(config))
        mb = collate(data, idx)
        packed = model(**mb.inputs("cuda")).total.item()
    assert packed == pytest.approx(ref, rel=2e-3)


@pytest.mark.gpu
def test_one_step_equal_between_backends_and_compile(qwen_dir, gpu_data, tmp_path):
    """Every attention back-end and --compile against per-sequence attention without compile, bf16: the first
    step (same weights: loss and gradient norm) and the loss after one optimizer step."""
    steps = ("--max-steps", 2)
    ref, stdout = train_gpu(
        qwen_dir, gpu_data, tmp_path / "ref", "--attn-implementation", "leantrain_per_sequence", "--no-compile", *steps
    )
    assert "compile off" in stdout
    variants = [("--attn-implementation", b, "--no-compile") for b in BACKENDS] + [("--compile",)]
    for i, flags in enumerate(variants):
        metrics, stdout = train_gpu(qwen_dir, gpu_data, tmp_path / f"v{i}", *flags, *steps)
        assert metrics[0]["loss"] == pytest.approx(ref[0]["loss"], rel=5e-3), flags
        assert metrics[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], rel=2e-2), flags
        assert metrics[1]["loss"] == pytest.approx(ref[1]["loss"], rel=5e-3), flags


@pytest.mark.gpu
def test_auto_defaults_on_cuda(qwen_dir, gpu_data, tmp_path):
    metrics, stdout = train_gpu(qwen_dir, gpu_data, tmp_path / "run")
    params = json.loads((tmp_path / "run" / "training_params.json").read_text())
    assert params["compute_dtype"] == "bfloat16" and params["compile"] is True
    assert params["attn_implementation"] in ("flash_attention_2", attention.VARLEN)
    assert "packing:" not in stdout  # bf16 on the GPU: the packing check must not mistake rounding for mixing
    assert metrics[-1]["loss"] < metrics[0]["loss"] and metrics[0]["peak_memory_gb"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed")
def test_liger_loss_and_kernels_match_chunked(qwen_dir, gpu_data, tmp_path):
    ref, _ = train_gpu(qwen_dir, gpu_data, tmp_path / "chunked", "--loss", "chunked")
    metrics, _ = train_gpu(qwen_dir, gpu_data, tmp_path / "liger", "--loss", "liger", "--use-liger-kernels")
    for m, r in zip(metrics, ref):
        assert m["loss"] == pytest.approx(r["loss"], rel=1e-2)
