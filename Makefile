# imageproxy developer commands. `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_KEY := dev-key

.PHONY: run test lint bench clean install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q --config-settings editable_mode=compat -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(DEV_KEY):
	$(BIN)/python -c "import secrets; print(secrets.token_hex(32))" > $(DEV_KEY)
	chmod 600 $(DEV_KEY)

# Start the proxy on 127.0.0.1:8080 with a development key and print an example URL.
run: $(STAMP) $(DEV_KEY)
	@$(BIN)/python -m imgproxy sign --key-file $(DEV_KEY) --base http://127.0.0.1:8080 \
		https://upload.wikimedia.org/wikipedia/commons/4/47/PNG_transparency_demonstration_1.png
	$(BIN)/twistd --nodaemon --pidfile= imageproxy --config etc/dev.ini --key-file $(DEV_KEY)

test: lint
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check imgproxy twisted tests bench
	$(BIN)/mypy imgproxy

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info twisted/plugins/dropin.cache
