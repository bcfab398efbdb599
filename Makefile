# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# node-opcua, the independent OPC UA stack the HIL tests use as a second PLC stand-in
NODE_DIR := tests/hil/nodeopcua
NODE_STAMP := $(NODE_DIR)/node_modules/.installed

.PHONY: demo commission-demo test bench lint fmt docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "make test needs Node.js 20 and npm for the node-opcua PLC stand-in ($(NODE_DIR)): install them"; exit 1; }
	npm ci --prefix $(NODE_DIR) --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

demo: $(STAMP)
	$(BIN)/heatloop demo $(or $(ARGS),--minutes 2)

# a whole `heatloop commission --sim --auto` run on the demo site; the record lands in
# build/commission-demo/report (HTML, Markdown, JSON)
commission-demo: $(STAMP)
	$(BIN)/python -m controller.commission_demo build/commission-demo

# The unit tests (CPU-bound) run beside the HIL tests (real processes, mostly waiting on real
# time), and the HIL tests in two halves side by side: the suite is built to stay green with
# both cores busy, and the run then takes about the longer half's time instead of the sum. The
# reports of the background runs follow the foreground one's.
HIL_A := tests/hil/test_commission.py tests/hil/test_commission_controller_hil.py \
	tests/hil/test_metering_hil.py tests/hil/test_service_hil.py tests/hil/test_operator_hil.py
test: $(STAMP) $(NODE_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	@mkdir -p build
	@$(BIN)/pytest -q -p no:cacheprovider tests/unit > build/unit-tests.log 2>&1 & unit=$$!; \
	$(BIN)/pytest -q -p no:cacheprovider --durations=8 $(wildcard $(HIL_A)) > build/hil-a-tests.log 2>&1 & hila=$$!; \
	trap 'kill $$unit $$hila 2>/dev/null' INT TERM; \
	echo "pytest tests/unit and $(words $(wildcard $(HIL_A))) HIL files (in the background, reports below) and the other HIL files"; \
	$(BIN)/pytest -q -p no:cacheprovider --durations=8 tests/hil $(addprefix --ignore=,$(wildcard $(HIL_A))); hil=$$?; \
	wait $$hila; hila=$$?; wait $$unit; unit=$$?; \
	echo "---- $(wildcard $(HIL_A)) ----"; cat build/hil-a-tests.log; \
	echo "---- tests/unit ----"; cat build/unit-tests.log; \
	test $$hil -eq 0 && test $$hila -eq 0 && test $$unit -eq 0

bench: $(STAMP)
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

docs: $(STAMP)
	$(BIN)/python -m controller.docgen

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache $(NODE_DIR)/node_modules
