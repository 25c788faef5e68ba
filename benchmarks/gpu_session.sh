#!/usr/bin/env bash
# What a session lent a GPU measures for issue 9, in the issue's order, one stage per device call (each fits in the
# device tool's 10 minutes; shared/GPU.md has the machine):
#   bash benchmarks/gpu_session.sh suite   # the whole suite on the GPU machine, GPU tests included
#   bash benchmarks/gpu_session.sh small   # 0.5B shape: defaults at 32k/64k, TRL padded/+Liger/padding-free
#   bash benchmarks/gpu_session.sh compile # 0.5B shape at 32k: compile off; FSDP against none (both bf16 weights)
#   bash benchmarks/gpu_session.sh large   # 1.5B shape: defaults at 16k/32k, activation checkpointing at 64k, TRL+Liger
# Logs and JSON go to $OUT (the device tool's folder) or ./gpu_out. Wheels in .whl/ (TRL, liger-kernel, datasets,
# downloaded as shared/GPU.md says and carried with `carry: [".whl"]`) are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    suite | small | compile | large) ;;
    *) echo "usage: bash benchmarks/gpu_session.sh suite|small|compile|large" >&2; exit 2 ;;
esac
out=${OUT:-gpu_out} stage=$1
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi -L; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; } \
    >"$out/versions.txt" 2>&1
bench() { python3 benchmarks/bench_gpu.py run --shape "$1" --runs "$2" --json-out "$out/bench_$stage.json" 2>&1 | tee "$out/bench_$stage.log"; }
case "${1:-}" in
    suite) timeout 560 python3 -m pytest -q -x --durations=15 2>&1 | tee "$out/pytest.log" | tail -40 ;;
    small) bench 0.5b defaults-32k,defaults-64k,trl-liger,trl-padded,trl-padfree ;;
    compile) bench 0.5b defaults-32k,no-compile-32k,bf16-32k,no-fsdp-bf16-32k ;;
    large) bench 1.5b defaults-16k,defaults-32k,ckpt-64k,trl-liger ;;
esac
