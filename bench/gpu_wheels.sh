#!/bin/sh
# Wheels that the lent GPU machine (Python 3.12, torch 2.11+cu130, no registry access) lacks, for
# bench/gpu.py and bench/gpu_engine.py. Run here in the repo root; they land in .whl/ (ignored by git).
# Then on the device:  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
#                      PYTHONPATH=/tmp/site:src python3 bench/gpu.py --json $OUT/gpu.json
# bitsandbytes (43 MB) does not fit in one 64 MiB transfer with the rest: carry it in a call of its own.
set -eu
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$@"
}
get transformers==5.23.0 peft==0.21.2 datasets==5.2.0 trl==1.16.0 liger-kernel gguf python-dotenv \
    pydantic pydantic-core annotated-types typing-inspection typing-extensions dill multiprocess xxhash
if [ "${WITH_BNB:-0}" = 1 ]; then get --platform manylinux_2_24_x86_64 bitsandbytes==0.50.2; fi
du -sh .whl
