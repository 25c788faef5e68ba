#!/usr/bin/env bash
# What a session lent a GPU measures for issue 9, in the issue's order, one stage per device call (each fits in the
# device tool's 10 minutes; shared/GPU.md has the machine):
#   bash benchmarks/gpu_session.sh suite   # the whole suite on the GPU machine, GPU tests included
#   bash benchmarks/gpu_session.sh small   # 0.5B shape: defaults at 32k/64k, compile off, no FSDP, TRL padded/+Liger/padding-free
#   bash benchmarks/gpu_session.sh large   # 1.5B shape: defaults at 16k/32k, activation checkpointing at 64k, TRL+Liger
# Logs and JSON go to $OUT (the device tool's folder) or ./gpu_out. Wheels in .whl/ (TRL, liger-kernel, datasets,
# downloaded as shared/GPU.md says and carried with `carry: [".whl"]`) are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    suite | small | large) ;;
    *) echo "usage: bash benchmarks/gpu_session.sh suite|small|large" >&2; exit 2 ;;
esac
out=${OUT:-gpu_out}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi -L; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; } \
    >"$out/versions.txt" 2>&1
bench() { python3 benchmarks/bench_gpu.py run --shape "$1" --runs "$2" --json-out "$out/bench_$1.json" 2>&1 | tee "$out/bench_$1.log"; }
case "${1:-}" in
    suite) timeout 560 python3 -m pytest -q -x --durations=15 2>&1 | tee "$out/pytest.log" | tail -40 ;;
    small) bench 0.5b defaults-32k,defaults-64k,no-compile-32k,no-fsdp-32k,trl-liger,trl-padded,trl-padfree ;;
    large) bench 1.5b defaults-16k,defaults-32k,ckpt-64k,trl-liger ;;
esac
