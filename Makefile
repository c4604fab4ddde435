# The README's two commands:  `make generate`  and  `make test`.
# `generate` uses .venv, the base install alone (what `pip install jaxllm` gives a user); `test`
# uses .venv-test, the base install plus the test extras. Each is built with Python 3.12 (found by
# scripts/find-python312) the first time.
VENV       ?= .venv
TEST_VENV  ?= .venv-test
PROMPT     ?= What is machine learning?
PYTEST_ARGS ?=
# The suite runs on this many workers (pytest-xdist), each test file on one of them, so that a
# file's shared engines are built once (15-34 minutes on 2 cores in December 2026; 18 when it was
# written, with fewer tests; one worker took about 30 then). A worker
# that dies ends the run at once, naming the test it died in (--max-worker-restart=0): with
# --dist loadfile, pytest-xdist's replacement of a crashed worker can wait forever for work.
TEST_WORKERS ?= 2

.PHONY: generate test venv clean

%/.created:
	@python=$$(scripts/find-python312) && "$$python" -m venv $*
	$*/bin/python -m pip install --quiet --upgrade pip
	@touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(VENV)/bin/python -m pip install --quiet -e .
	@touch $@

$(TEST_VENV)/.installed-test: $(TEST_VENV)/.created pyproject.toml
	$(TEST_VENV)/bin/python -m pip install --quiet -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

generate: $(VENV)/.installed
	$(VENV)/bin/jaxllm generate "$(PROMPT)"

test: $(TEST_VENV)/.installed-test
	$(TEST_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --max-worker-restart=0 --durations=25 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(TEST_VENV)
