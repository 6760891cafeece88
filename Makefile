# Two commands set everything up on a fresh machine: `make book` and `make test`.
# Each creates .venv if it is missing and installs what it needs into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qcourse-env
KERNEL_STAMP := $(VENV)/.qcourse-kernels
export PATH := $(CURDIR)/$(BIN):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: all book pdf test lint clean venv hub hub-test

all: test

venv: $(KERNEL_STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $@ $(KERNEL_STAMP)

# Rebuild the compiled kernels whenever their sources change (an editable install does not).
# Only then: make counts a prerequisite remade in the same run ($(STAMP), whose install has just
# built them) as a reason, and a fresh clone would compile them twice (a minute).
KERNEL_SOURCES := $(wildcard qcourse/*.pyx qcourse/*.pxd qcourse/csrc/*.h qcourse/csrc/*.c)

$(KERNEL_STAMP): $(STAMP) $(KERNEL_SOURCES)
	@if [ ! -e $@ ] || [ -n "$$(find $(KERNEL_SOURCES) -newer $@)" ]; then \
	  echo "$(BIN)/python -m pip install --quiet --no-build-isolation --no-deps -e ."; \
	  $(BIN)/python -m pip install --quiet --no-build-isolation --no-deps -e . && touch $@; \
	fi

book: venv
	$(BIN)/jupyter-book build . -W -n --keep-going
	@echo "The book is in _build/html/index.html"

# The PDF edition: the built HTML pages printed by headless Chromium (offline), joined by
# pdfunite (Debian's poppler-utils); also copied to _build/html/book.pdf, which the book links.
pdf: book
	$(BIN)/python book/_ext/qcourse_pdf.py _build/html _build/pdf/book.pdf

test: venv
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=25

# The course's JupyterHub (nbgrader/hub/): configurable-http-proxy from npm (pinned by
# nbgrader/hub/package-lock.json) and a Python every local account can run, both in .venv/hub/.
# tests/test_hub.py needs them; it runs only with QCOURSE_HUB_TEST=1 (`make hub-test`, which
# .ci/run runs as its own step after `make test`: a few minutes, outside make test's budget).
HUB_STAMP := $(VENV)/hub/.qcourse-hub

hub: $(HUB_STAMP)

$(HUB_STAMP): $(STAMP) nbgrader/hub/package.json nbgrader/hub/package-lock.json nbgrader/hub/user_python.py
	rm -rf $(VENV)/hub && mkdir -p $(VENV)/hub/proxy
	cp nbgrader/hub/package.json nbgrader/hub/package-lock.json $(VENV)/hub/proxy/
	cd $(VENV)/hub/proxy && npm ci --no-audit --no-fund --loglevel=error
	$(BIN)/python nbgrader/hub/user_python.py $(VENV)/hub/python
	touch $@

# A class on the Hub (tests/test_hub.py): needs root (useradd) and `make hub`; -rsP prints why
# it skips (no root, or a checkout other accounts cannot read) and the phase times when it passes.
hub-test: hub
	QCOURSE_HUB_TEST=1 $(BIN)/python -m pytest tests/test_hub.py -n 0 -p no:cacheprovider -rsP \
	  --durations=5

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf _build build .pytest_cache .hypothesis .ruff_cache qcourse/_kernels.c qcourse/*.so \
	       qcourse.egg-info
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# Instructors (see book/grading.md): the student release of every exercise notebook, grading a
# folder of submissions, a drill with known scores, and the self-study pages.
COURSE      ?= _build/course
SUBMISSIONS ?= submissions
.PHONY: release grade drill self-study

release: venv
	$(BIN)/python -m qcourse.grading release --course $(COURSE)

grade: venv
	$(BIN)/python -m qcourse.grading grade $(SUBMISSIONS) --course $(COURSE) -v

drill: venv
	$(BIN)/python -m qcourse.grading drill --course _build/drill

self-study: venv
	$(BIN)/python -m qcourse.grading self-study notebooks/*.ipynb --out book/exercises
