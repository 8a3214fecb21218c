# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: install demo test lint bench clean

$(BIN)/ssn-deploy: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[cpu,dev,serve,train]"
	touch $@

install: $(BIN)/ssn-deploy

demo: install
	bash scripts/demo.sh $(BIN) $(DEMO)

test: install
	$(BIN)/ruff check ssn_deploy tests benchmarks scripts
	$(BIN)/ruff format --check ssn_deploy tests benchmarks scripts
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check --fix ssn_deploy tests benchmarks scripts
	$(BIN)/ruff format ssn_deploy tests benchmarks scripts

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
