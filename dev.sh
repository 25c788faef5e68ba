#!/usr/bin/env bash
# The two commands of a fresh clone; each does all the set-up it needs by itself:
#   ./dev.sh demo [demo.py flags]    the tiny model learns to reverse digit strings (about 1.5 minutes on 2 CPU cores)
#   ./dev.sh test [pytest flags]     the test suite, on TEST_WORKERS=2 workers (docs/REFERENCE.md#tests: its measured time)
# and one for maintainers:
#   ./dev.sh relock [pytest flags]   the suite on the newest releases pyproject.toml admits, in a fresh .venv-latest/;
#                                    where it passes, requirements-dev.lock is rewritten from that environment
# Set-up, skipped where done already: a virtual environment in .venv/ (VENV=dir for another place, PYTHON=python3.12
# to build it from another interpreter), torch, then `pip install -e ".[dev]"` (again whenever pyproject.toml or
# requirements-dev.lock changes).
# Versions: requirements-dev.lock holds the exact versions the suite last passed with (everything but torch and
# leantrain), for the Python it names; dev.sh installs them where it applies (that Python, no CUDA torch already
# present), so a fresh clone gets what CI tested. Elsewhere it says so and resolves pyproject.toml's ranges.
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
lock=requirements-dev.lock
cpu_torch=torch==2.13.0
cpu_index=https://download.pytorch.org/whl/cpu

setup() {  # setup VENV USE_LOCK(yes|no)
    local venv=$1 use_lock=$2 py=$1/bin/python
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
    local constraints=()
    if [ "$use_lock" = yes ]; then
        local lock_python here cuda
        lock_python=$(sed -n 's/^# python \([0-9][0-9.]*\).*/\1/p' "$lock")
        here=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        cuda=$("$py" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null || true)
        if [ "$here" = "$lock_python" ] && [ -z "$cuda" ]; then
            constraints=(-c "$lock")
        elif [ ! "$venv/.installed" -nt pyproject.toml ] || [ ! "$venv/.installed" -nt "$lock" ]; then
            echo "dev.sh: Python $here${cuda:+ with CUDA torch $cuda}: resolving pyproject.toml's ranges, not $lock (made for Python $lock_python, CPU torch)"
        fi
    fi
    if [ ! "$venv/.installed" -nt pyproject.toml ] || [ ! "$venv/.installed" -nt "$lock" ]; then
        echo "dev.sh: installing leantrain's dependencies and dev tools (pip install -e \".[dev]\"${constraints:+ -c $lock})"
        # Without the lock (relock's fresh environment) pip resolves the newest releases the ranges admit, torch
        # aside: the one installed above satisfies its range (an upgrade would fetch the CUDA build).
        "$py" -m pip install -q -e ".[dev]" "${constraints[@]}"
        touch "$venv/.installed"
    fi
}

# Two workers (pytest-xdist), a test file each at a time (its module fixtures built once): most tests wait on
# subprocesses and start-up, so two keep 2 cores busy where one left them half idle (docs/REFERENCE.md#tests).
suite=(-q -n "${TEST_WORKERS:-2}" --dist loadfile)

relock() {  # the newest releases the ranges admit, in a fresh environment; the lock follows only if the suite passes
    local latest=${VENV_LATEST:-.venv-latest}
    rm -rf "$latest"
    setup "$latest" no
    if ! "$latest/bin/python" -m pytest "${suite[@]}" "$@"; then
        echo "dev.sh relock: the suite fails on the newest releases ($latest/); $lock left as it is" >&2
        exit 1
    fi
    local new
    new=$(mktemp)
    {
        echo "# python $("$latest/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])') (torch: as dev.sh chooses it; the rest: exact)"
        echo "# Written by ./dev.sh relock on $(date -u +%Y-%m-%d) after the suite passed on these versions; dev.sh installs them."
        "$latest/bin/python" -m pip freeze --exclude-editable | grep -viE '^(torch|pip|setuptools)=='
    } >"$new"
    mv "$new" "$lock"
    echo "dev.sh relock: the suite passed; $lock rewritten (git diff $lock shows what moved)"
}

case "${1:-}" in
    demo) shift; setup "$venv" yes; exec "$venv/bin/python" demo.py "$@" ;;
    test) shift; setup "$venv" yes; exec "$venv/bin/python" -m pytest "${suite[@]}" "$@" ;;
    relock) shift; relock "$@" ;;
    *) echo "usage: ./dev.sh demo [demo.py flags] | ./dev.sh test [pytest flags] | ./dev.sh relock [pytest flags]" >&2; exit 2 ;;
esac
