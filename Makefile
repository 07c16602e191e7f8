# The set-up commands of the README: `make demo`, `make test` (the unit tier and a quick
# end-to-end set) and `make test-all` (everything; what .ci/run runs).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-all lint proto clean

$(BIN)/pvmig: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/pvmig
	$(BIN)/pvmig demo

test: $(BIN)/pvmig
	$(BIN)/python -m pytest -q -m "unit or quick"

test-all: $(BIN)/pvmig
	$(BIN)/python -m pytest -q --all

# The layer contracts alone (tests/unit/test_layers.py runs them with the suite).
lint: $(BIN)/pvmig
	$(BIN)/lint-imports

# Regenerate pvmig/_proto from proto/ (tests/unit/rpc/test_proto.py checks they match).
proto: $(BIN)/pvmig
	$(BIN)/python -m grpc_tools.protoc -Ipvmig/_proto=proto --python_out=. \
		--grpc_python_out=. --pyi_out=. proto/pvmig.proto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
