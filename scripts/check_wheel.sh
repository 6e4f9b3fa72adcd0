#!/usr/bin/env bash
# Build detrkit's wheel, install it in a new virtual environment outside the source tree, and run
# `detrkit --help`, `detrkit synth` and `detrkit predict` (plus the server's page) from there:
# catches files the wheel misses (package data such as the server page, a module left out).
#
# The new environment gets detrkit from the wheel only. Its dependencies (torch alone is several
# GB) are taken from the project's environment ($VENV, default .venv) through a path entry, so the
# check takes seconds; `pip check` then verifies that they satisfy what the wheel declares.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$PWD/$VENV/bin/python"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Built from a copy of the files git knows (committed or not, ignored ones left out): no build/ or
# *.egg-info of an earlier build or of the editable install can slip files into the wheel.
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$work/src"
echo "check_wheel: python -m build --wheel"
"$PY" -m build --wheel --outdir "$work/dist" "$work/src" >"$work/build.log" 2>&1 ||
    { cat "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/detrkit-*.whl)

"$PY" -m venv "$work/venv"
site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
deps=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Only a path: the project environment's own .pth files (its editable detrkit) are not processed.
echo "$deps" >"$site/project-deps.pth"
"$work/venv/bin/python" -m pip install -q --no-deps --disable-pip-version-check "$wheel"
problems=$("$work/venv/bin/python" -m pip check --disable-pip-version-check 2>&1 || true)
if grep -qi '^detrkit ' <<<"$problems"; then echo "$problems" >&2; exit 1; fi

cd "$work"
where=$("$work/venv/bin/python" -c 'import detrkit; print(detrkit.__file__)')
case "$where" in
    "$site"/*) ;;
    *) echo "check_wheel: detrkit was imported from $where, not from the wheel" >&2; exit 1 ;;
esac
"$work/venv/bin/detrkit" --help >/dev/null
"$work/venv/bin/detrkit" synth --out data --images 2 --val-images 2
"$work/venv/bin/python" - <<'PY'
import detrkit

config = detrkit.DetrConfig(
    num_classes=4, backbone="resnet18", d_model=32, nheads=2, enc_layers=1, dec_layers=1,
    dim_feedforward=64, num_queries=5, pretrained_backbone=False,
)
detrkit.save_model(detrkit.build_model(config), "tiny.safetensors")

from fastapi.testclient import TestClient

from detrkit.inference.serve import ServeConfig, create_app

with TestClient(create_app(detrkit.Detector(detrkit.load_model("tiny.safetensors")), ServeConfig())) as client:
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower(), page.status_code
print("check_wheel: server page served")
PY
"$work/venv/bin/detrkit" predict data/val2017 --weights tiny.safetensors --out pred --threshold 0
test -s pred/results.json && test -d pred/annotated
echo "check_wheel: $(basename "$wheel") installs and runs (help, synth, predict, server page)"
