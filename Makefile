# The README's two commands:  `make generate`  and  `make test`.
# Each builds .venv with Python 3.12 (found by scripts/find-python312) the first time.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PROMPT  ?= What is machine learning?
PYTEST_ARGS ?=

.PHONY: generate test venv clean

$(VENV)/.created:
	@python=$$(scripts/find-python312) && "$$python" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(PY) -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

generate: $(VENV)/.installed
	$(VENV)/bin/jaxllm generate "$(PROMPT)"

test: $(VENV)/.installed-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
