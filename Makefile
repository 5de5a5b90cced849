# Two commands a newcomer needs: `make demo` (the main job) and `make test` (the suite).
# Nothing is assumed installed but python3, make and git.
#
# TORCH_SPEC pins PyTorch in one place. The default is the CPU wheel this project is developed
# on; on a GPU machine override it, e.g. `make demo TORCH_SPEC="torch==2.5.1"` or with an index:
# `make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"`.
#
# CONSTRAINTS pins every other dependency to the versions the test suite last passed with, so a
# fresh clone installs what was tested (pyproject.toml keeps compatible ranges for other
# installs). Update it deliberately: scripts/freeze-constraints.py says how. `CONSTRAINTS=`
# (empty) installs the newest versions the ranges allow instead.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: demo test lint format bench gpu-check scale-study mutate fixture constraints clean help

help:
	@echo "make demo   - create $(VENV), install hdee, run the built-in HDEE demo on a CPU"
	@echo "make test   - create $(VENV), install hdee with dev extras, run the test suite"
	@echo "make lint   - ruff check + format check"
	@echo "make bench  - run the benchmarks in benchmarks/ (minutes)"
	@echo "make gpu-check - on a GPU machine: CUDA tests, M-model MFU, evaluation tokens/s (8 min)"
	@echo "make scale-study - the demo's experiment at 3 model widths, 2 repeats; docs/results.md (1 h)"
	@echo "make mutate - mutation testing of the pure maths with their fast unit tests (minutes)"
	@echo "make fixture - write this release's run fixture, tests/fixtures/runs/<version>/ (1 min)"
	@echo "make constraints - rewrite constraints.txt from $(VENV) (after a deliberate upgrade)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp files make the install idempotent: re-running make does not reinstall.
# The demo installs the `tasks` extra too: it ends with lm-evaluation-harness on built-in tasks.
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet $(PIP_CONSTRAINTS) -e ".[tasks]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(CONSTRAINTS) $(VENV)/.installed
	$(BIN)/python -m pip install --quiet $(PIP_CONSTRAINTS) -e ".[dev]"
	touch $@

# The demo's text comes from Debian packages where it can (installed when we may: root or
# password-less sudo), else from what any Python install ships; see docs/demo.md.
demo: $(VENV)/.installed
	sh scripts/install-demo-sources.sh
	$(BIN)/hdee demo $(DEMO_ARGS)

# --durations: the ten slowest tests print at the end of every run (CI's log included), so the
# next slow test shows before the suite grows past its time goal (tests/README.md).
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q --durations=10

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(VENV)/.installed-dev
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/bench_prepare.py
	$(BIN)/python benchmarks/bench_train.py --compile
	$(BIN)/python benchmarks/bench_evaluate.py
	$(BIN)/python benchmarks/bench_sparse.py

# Needs a CUDA torch in $(VENV): e.g. `make gpu-check TORCH_SPEC="torch --index-url ..."`.
gpu-check: $(VENV)/.installed-dev
	PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh

# The scale study (docs/results.md): configs/scale-study/ trained and evaluated (each run resumes
# where it stopped), then the page regenerated from the runs with this code. About an hour on 2
# cores; `scripts/results-page.py RUN...` only rewrites the page.
scale-study: $(VENV)/.installed
	sh scripts/install-demo-sources.sh
	$(BIN)/python scripts/scale-study.py

# Mutation testing (mutmut; pyproject's [tool.mutmut] lists the modules and their fast unit
# tests): every mutant of the maths must fail a test. Not in CI: minutes on 2 cores. MUTANTS
# picks the functions: whole modules, and of plan.py only the budget arithmetic, of routing.py
# only the selection maths. `make mutate MUTANTS="hdee.statistics.*"` runs one module; the
# survivors are listed at the end (`mutmut show NAME` prints one), tests/README.md the counts.
MUTANTS ?= hdee.statistics.* hdee.significance.* hdee.shapes.* hdee.ensemble.* \
	hdee.plan.x_job_budget__* hdee.plan.x_configuration_budget__* hdee.plan.x_equalise_steps__* \
	hdee.routing.x_top_k_mask__* \
	hdee.routing.x_feasible_subsets__* hdee.routing.x_budget_mask__* \
	hdee.routing.x_routing_log_posterior__* hdee.routing.x_route__* \
	hdee.routing.x_routed_log_weights__* hdee.routing.x__only_what_ran__* \
	hdee.routing.x_routed_mixture__* hdee.routing.x_routed_flops_per_token__*
MUTATE_JOBS ?= 2
mutate: $(VENV)/.installed-dev
	$(BIN)/mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)
	$(BIN)/mutmut results

# A release's run fixture (docs/releasing.md): the tiny run this version writes, kept so that
# every later version is tested to read, evaluate, export and resume it. Never rewritten.
fixture: $(VENV)/.installed-dev
	$(BIN)/python scripts/make-fixture-run.py

# Pins what $(VENV) holds now; run `make test` on it first (see scripts/freeze-constraints.py).
constraints: $(VENV)/.installed-dev
	$(BIN)/python scripts/freeze-constraints.py > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
