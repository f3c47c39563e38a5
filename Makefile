# `make demo` and `make test` each bootstrap .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test system-deps clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# redis-server (tests and the embedded default), ffmpeg (live sources in tests) and openssl (TLS test
# certificates) come from Debian.
system-deps:
	@command -v redis-server >/dev/null && command -v ffmpeg >/dev/null && command -v openssl >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server ffmpeg openssl; }

test: $(STAMP) system-deps
	$(BIN)/ruff check .
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q

demo: $(STAMP) system-deps
	RAY_AUTH_MODE=disabled $(BIN)/python -m pipeline.demo

clean:
	rm -rf $(VENV) .pytest_cache
