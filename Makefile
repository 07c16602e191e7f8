# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test proto clean

$(BIN)/pvmig: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/pvmig
	$(BIN)/pvmig demo

test: $(BIN)/pvmig
	$(BIN)/python -m pytest -q

# Regenerate pvmig/_proto from proto/ (tests/test_proto.py checks they match).
proto: $(BIN)/pvmig
	$(BIN)/python -m grpc_tools.protoc -Ipvmig/_proto=proto --python_out=. \
		--grpc_python_out=. --pyi_out=. proto/pvmig.proto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
