# carepath: set-up, demo and tests. Every target creates or updates .venv first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# optional extras installed into .venv (CI: make test EXTRAS=dev,postgres)
EXTRAS ?= dev
comma := ,
# one stamp per set of extras: asking for another set installs it
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: help venv demo test lint typecheck pytest calibration benchmarks tensorboard lock clean browser audit device-wheels

help:
	@echo "make demo        set up .venv and run the main job end to end on the default configuration"
	@echo "make test        set up .venv and run ruff, mypy and the test suite"
	@echo "make calibration full calibration table, JSON and plot (benchmarks/results/)"
	@echo "make benchmarks  performance benchmarks (benchmarks/results/*.json)"
	@echo "make tensorboard TensorBoard over runs/ (training runs of train.py)"
	@echo "make lock        refresh constraints.txt from the current .venv"
	@echo "make audit       dependency audit of constraints.txt (pip-audit; needs the PyPI or OSV vulnerability service)"
	@echo "make browser     install Debian's chromium for the clinician page tests (apt-get)"
	@echo "make device-wheels  wheels a GPU machine lacks, for benchmarks/device_check.sh (into .whl/)"

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "carepath needs Python 3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/carepath simulate --patients 5000 --weeks 26
	$(BIN)/carepath calibrate --plot reports/demo/trajectories.png --json reports/demo/calibration.json
	@echo
	@echo "An offline agent (CQL) trained on the logged data, then certified on the patients it did not train on:"
	$(BIN)/python train.py overwrite=true
	@echo
	@echo "An agent trained in the simulator (MaskablePPO), then certified on every logged patient:"
	$(BIN)/python train.py agent=maskable_ppo overwrite=true
	@echo
	@echo "The certified policy's certificate (what the logged data vouch for):"
	$(BIN)/carepath certify --show --policy runs/maskable_ppo/seed0/policy
	@echo
	@echo "The policy on textbook cases (guideline vignettes; a critical failure blocks certification):"
	$(BIN)/carepath vignettes --policy runs/maskable_ppo/seed0/policy --out reports/demo/vignettes.json
	@echo
	@echo "A sample recommendation for a synthetic patient (examples/patient.json), with the policy's certificate:"
	$(BIN)/carepath recommend --policy runs/maskable_ppo/seed0/policy --patient examples/patient.json
	@echo
	@echo "Serve it to clinicians (REST API, CDS Hooks, the page at http://127.0.0.1:8000/):"
	@echo "  $(BIN)/carepath tokens create clinic      # prints a bearer token once: paste it into the page"
	@echo "  $(BIN)/carepath serve --policy runs/maskable_ppo/seed0/policy   # refused unless certified"
	@echo "  (serve refuses a bundle no certificate vouches for unless --allow-uncertified is given,"
	@echo "   and then shows a banner saying so; carepath certify --show --policy runs/cql/seed0/policy"
	@echo "   prints what the logged data vouch for in the CQL run)"
	@echo
	@echo "Decision support only: every figure above comes from simulated patients."

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

calibration: venv
	$(BIN)/python benchmarks/calibration.py

benchmarks: venv
	$(BIN)/python benchmarks/sim_throughput.py
	$(BIN)/python benchmarks/data_throughput.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/ope_speed.py
	$(BIN)/python benchmarks/ope_accuracy.py --truth-patients 100000 --model-repeats 2 --fqe-updates 100 --fqe-refits 5
	$(BIN)/python benchmarks/serve_latency.py
	$(BIN)/python benchmarks/serve_soak.py --seconds 300
	$(BIN)/python benchmarks/serve_soak.py --seconds 0 --kill-after 20 --out benchmarks/results/serve_crash.json
	$(BIN)/python benchmarks/api_fuzz.py --requests 20000
	$(BIN)/python benchmarks/calibration.py
	$(BIN)/python benchmarks/certify.py --logs 100 --patients 3000 --default-size 50000 \
		$(foreach b,runs/cql/seed0/policy runs/maskable_ppo/seed0/policy,$(if $(wildcard $(b)/bundle.json),--bundle $(b)))

tensorboard: venv
	$(BIN)/tensorboard --logdir runs

# every extra installed first, so that their pins stay in the file
lock:
	$(MAKE) venv EXTRAS=dev,postgres
	$(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/' > constraints.txt.new
	{ head -2 constraints.txt; cat constraints.txt.new; } > constraints.txt.tmp && rm constraints.txt.new && mv constraints.txt.tmp constraints.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# Known vulnerabilities in the pinned dependencies (the static security lint is ruff's S rules, in make test).
audit: venv
	$(BIN)/pip-audit --requirement constraints.txt --no-deps --disable-pip --strict --progress-spinner off

# The clinician page tests drive the system chromium (never a browser download).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
	  $$sudo apt-get update && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; \
	fi
	@/usr/bin/chromium --version 2>/dev/null

# The device machine (benchmarks/device_check.sh) has torch but not gymnasium: its Python 3.12
# wheels, at constraints.txt's versions, into .whl/ (git-ignored), carried with the run.
DEVICE_WHEELS := gymnasium Farama-Notifications
device-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  $$(for name in $(DEVICE_WHEELS); do grep -i "^$$name==" constraints.txt; done)
	@ls .whl
