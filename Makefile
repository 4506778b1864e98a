# peftune: the two set-up commands are `make demo` and `make test`; both install first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make/installed
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test test-all lint bench clean

install:
	@mkdir -p .make
	@# torch first (a local CPU wheel here); then everything else pinned to the installed torch,
	@# so the resolver never swaps in a multi-GB CUDA build or replaces a user's own torch.
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install --quiet "torch==$(TORCH_VERSION)"
	@TORCH=$$($(PYTHON) -c 'import torch; print(torch.__version__.split("+")[0])') && \
	  echo "torch==$$TORCH" > .make/constraints.txt && \
	  $(PIP) install --quiet --disable-pip-version-check -c .make/constraints.txt -e ".[dev]"
	@# jemalloc, which the `peftune` command preloads where installed (peftune/allocator.py:
	@# a training step's peak RSS less than half of glibc's); skipped where apt is not ours
	@ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1 || { command -v apt-get >/dev/null && \
	  [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -q libjemalloc2 >/dev/null 2>&1; } || \
	  echo "note: libjemalloc2 not installed: peftune runs with the system allocator"
	@touch $(STAMP)
	@echo "peftune installed (torch $$($(PYTHON) -c 'import torch; print(torch.__version__)'))"

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory install

demo: $(STAMP)
	$(PYTHON) scripts/demo.py

# One pytest-xdist worker per core (tests/conftest.py gives each worker one compute thread).
test: $(STAMP)
	$(PYTHON) -m pytest -q -n auto --dist worksteal

test-all: $(STAMP)
	$(PYTHON) -m pytest -q -n auto --dist worksteal -m ""

lint: $(STAMP)
	$(PYTHON) -m ruff check peftune tests scripts

bench: $(STAMP)
	@# the reference packages bench_select.py compares against (data-selection, zip-fit)
	@$(PIP) install --quiet --disable-pip-version-check -c .make/constraints.txt -e ".[bench]"
	$(PYTHON) scripts/bench_train.py
	$(PYTHON) scripts/bench_select.py
	$(PYTHON) scripts/bench_eval.py
	$(PYTHON) scripts/bench_merge.py
	$(PYTHON) scripts/bench_optimizer_memory.py
	$(PYTHON) scripts/bench_preference.py
	$(PYTHON) scripts/bench_export.py

clean:
	rm -rf .make runs/demo runs/tiny build *.egg-info
