#!/usr/bin/env bash
# The two commands of a fresh clone; each does all the set-up it needs by itself:
#   ./dev.sh demo [demo.py flags]    the tiny model learns to reverse digit strings (about 1.5 minutes on 2 CPU cores)
#   ./dev.sh test [pytest flags]     the test suite (about 8 minutes on 2 CPU cores)
# Set-up, skipped where done already: a virtual environment in .venv/ (VENV=dir for another place, PYTHON=python3.12
# to build it from another interpreter), torch, then `pip install -e ".[dev]"` (again whenever pyproject.toml changes).
# Torch, decided once, when .venv/ is created or has none:
#   - PYTHON already imports a CUDA build of torch (a GPU machine, a cluster module, a container): .venv/ sees it
#     (--system-site-packages) and it is left alone: nothing downloaded, nothing replaced.
#   - a GPU (nvidia-smi) and no such torch: pip's default torch wheel, the CUDA build, via leantrain's dependencies.
#   - no GPU: the CPU wheel, torch==2.13.0, from PyTorch's CPU index (PyPI's Linux wheel is the multi-GB CUDA build);
#     where that index does not answer within 5 s (an offline machine) from pip's own configured indexes and wheels.
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python=${PYTHON:-python3}
venv=${VENV:-.venv}
py=$venv/bin/python
cpu_torch=torch==2.13.0
cpu_index=https://download.pytorch.org/whl/cpu

setup() {
    if [ ! -x "$py" ]; then
        if "$python" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
            echo "dev.sh: creating $venv/ on top of $python's CUDA torch (--system-site-packages)"
            "$python" -m venv --system-site-packages "$venv"
        else
            echo "dev.sh: creating $venv/"
            "$python" -m venv "$venv"
        fi
    fi
    if ! "$py" -c 'import torch' 2>/dev/null && ! nvidia-smi -L >/dev/null 2>&1; then
        # pip would retry an unreachable index for minutes (timeouts x retries): ask it only if it answers quickly.
        if "$py" -c "import urllib.request; urllib.request.urlopen('$cpu_index/torch/', timeout=5)" 2>/dev/null; then
            echo "dev.sh: installing $cpu_torch (CPU) from $cpu_index"
            "$py" -m pip install -q --index-url "$cpu_index" "$cpu_torch"
        else
            echo "dev.sh: $cpu_index unreachable; installing $cpu_torch from pip's configured sources"
            "$py" -m pip install -q "$cpu_torch"
        fi
    fi
    if [ ! "$venv/.installed" -nt pyproject.toml ]; then
        echo "dev.sh: installing leantrain's dependencies and dev tools (pip install -e \".[dev]\")"
        "$py" -m pip install -q -e ".[dev]"
        touch "$venv/.installed"
    fi
}

case "${1:-}" in
    demo) shift; setup; exec "$py" demo.py "$@" ;;
    test) shift; setup; exec "$py" -m pytest -q "$@" ;;
    *) echo "usage: ./dev.sh demo [demo.py flags] | ./dev.sh test [pytest flags]" >&2; exit 2 ;;
esac
