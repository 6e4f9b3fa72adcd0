#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install detrkit with its test extra.
#
# PyTorch is installed first, on its own, because a plain `pip install torch` on Linux pulls a
# multi-GB CUDA build.  The order of preference:
#   1. TORCH_SPEC / TORCH_INDEX_URL from the environment, when set (e.g. a CUDA index of your choice);
#   2. a pip constraint file that pins torch (machines that serve fixed torch wheels from local disk):
#      install exactly the pinned versions, which pip then takes from disk;
#   3. Linux without an NVIDIA driver: the CPU-only wheels from the PyTorch CPU index;
#   4. anything else (macOS, Windows, Linux with a GPU): the regular PyPI wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    for cand in python3.11 python3.12 python3.10 python3.13 python3; do
        if command -v "$cand" >/dev/null 2>&1 &&
            "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
            PYTHON=$cand
            break
        fi
    done
fi
[ -n "$PYTHON" ] || { echo "setup: no Python >= 3.10 found (set PYTHON=...)" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# The web page of `detrkit serve` is tested in headless Chromium (Debian's chromium + chromium-driver).
# Installed here when the system allows it (root or passwordless sudo, apt); otherwise that one test
# is skipped, unless DETRKIT_REQUIRE_BROWSER is set (CI), where it fails.
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    sudo=()
    [ "$(id -u)" = 0 ] || { sudo -n true 2>/dev/null && sudo=(sudo -n); }
    if [ "$(id -u)" = 0 ] || [ ${#sudo[@]} -gt 0 ]; then
        echo "setup: apt-get install chromium chromium-driver (browser test of the web page)"
        export DEBIAN_FRONTEND=noninteractive
        "${sudo[@]}" apt-get install -y -q chromium chromium-driver >/dev/null ||
            { "${sudo[@]}" apt-get update -q >/dev/null && "${sudo[@]}" apt-get install -y -q chromium chromium-driver >/dev/null; } ||
            echo "setup: could not install chromium; the browser test will be skipped" >&2
    else
        echo "setup: chromium not installed (apt install chromium chromium-driver); the browser test will be skipped"
    fi
fi

# Skip the whole install when nothing that affects it changed since the last successful run.
stamp="$VENV/.detrkit-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c 'import torch, torchvision, detrkit' 2>/dev/null; then
    exit 0
fi

if ! "$VENV/bin/python" -c 'import torch, torchvision' 2>/dev/null; then
    torch_args=()
    if [ -n "${TORCH_SPEC:-}" ]; then
        read -r -a torch_args <<<"$TORCH_SPEC"
        [ -z "${TORCH_INDEX_URL:-}" ] || torch_args+=(--index-url "$TORCH_INDEX_URL")
    else
        constraint=$("${PIP[@]}" config list 2>/dev/null | sed -n "s/^[a-z:.]*constraint='\(.*\)'$/\1/p" | head -n1)
        pinned_torch=""
        pinned_vision=""
        if [ -n "$constraint" ] && [ -f "$constraint" ]; then
            pinned_torch=$(sed -n 's/^torch[<=]=\([0-9.]*\).*/\1/p' "$constraint" | head -n1)
            pinned_vision=$(sed -n 's/^torchvision[<=]=\([0-9.]*\).*/\1/p' "$constraint" | head -n1)
        fi
        if [ -n "$pinned_torch" ] && [ -n "$pinned_vision" ]; then
            torch_args=("torch==$pinned_torch" "torchvision==$pinned_vision")
        elif [ "$(uname -s)" = "Linux" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
            torch_args=(torch torchvision --index-url https://download.pytorch.org/whl/cpu)
        else
            torch_args=(torch torchvision)
        fi
    fi
    echo "setup: pip install ${torch_args[*]}"
    "${PIP[@]}" install -q "${torch_args[@]}"
fi

echo "setup: pip install -e .[dev]"
"${PIP[@]}" install -q -e '.[dev]'
echo "$want" >"$stamp"
