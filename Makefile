# Two commands for a new machine: `make demo` and `make test`. Everything runs from .venv.
PYTHON_FOR_VENV := $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test lint check clean

venv: $(STAMP)

# Re-install only when a requirements file changed since the last install.
$(STAMP): $(wildcard requirements/*.txt)
	@test -n "$(PYTHON_FOR_VENV)" && "$(PYTHON_FOR_VENV)" -c "import sys; sys.exit(sys.version_info < (3, 11))" \
		|| { echo "Python 3.11 or newer is needed (looked for python3.11, then python3)" >&2; exit 1; }
	test -x $(PY) || $(PYTHON_FOR_VENV) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev.txt
	touch $(STAMP)

demo: venv
	DJANGO_DEBUG=1 $(PY) manage.py demo

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	DJANGO_DEBUG=1 $(VENV)/bin/mypy .

# Production-like settings; any deploy warning fails. HSTS preload is an opt-in commitment
# (DJANGO_HSTS_PRELOAD, off by default), so it is switched on here rather than silenced.
# The checks never contact Redis; port 1 makes sure nothing is there if one ever tried.
check: venv
	DJANGO_DEBUG=1 $(PY) manage.py makemigrations --check --dry-run
	DJANGO_DEBUG=0 DJANGO_ALLOWED_HOSTS=ops.example.com DJANGO_HSTS_PRELOAD=1 \
	REDIS_URL=redis://127.0.0.1:1/0 \
	DJANGO_SECRET_KEY="$$($(PY) -c 'import secrets; print(secrets.token_urlsafe(64))')" \
	$(PY) manage.py check --deploy --fail-level WARNING

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
