#!/bin/sh
# The install steps of both Docker images, in one place so a test can run them in a fresh virtualenv
# (tests/test_docker_install.py) where no Docker engine runs. The images set PIP_NO_CACHE_DIR=1; the test
# reuses pip's cache from `make setup`.
#   PIP           pip to use (default: pip)
#   TORCH_INDEX   wheel index for torch (CUDA or CPU build); empty = pip's default
#   TARGET        what to install: a wheel path or a source dir (default: .)
#   EXTRAS        tuneforge extras (default: serve)
set -eu
PIP=${PIP:-pip}
TARGET=${TARGET:-.}
EXTRAS=${EXTRAS:-serve}
HERE=$(dirname "$0")
# torch first and pinned, alone: a bare `torch` requirement elsewhere would pull another build.
if [ -n "${TORCH_INDEX:-}" ]; then
  $PIP install --index-url "$TORCH_INDEX" torch==2.13.0
else
  $PIP install torch==2.13.0
fi
$PIP install torch==2.13.0 -c "$HERE/../requirements-lock.txt" "$TARGET[$EXTRAS]"
