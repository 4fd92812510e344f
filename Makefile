# The two commands of the README contract: `make demo` and `make test`.
# Both create .venv on a fresh machine, install the local CPU torch wheel FIRST (an open `torch`
# requirement would otherwise pull a multi-GB CUDA build), then the project.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
TORCH   ?= torch==2.13.0
STAMP   := .venv/.installed
DEBS    := wordnet-base dict-gcide dict-foldoc dict-jargon dict-elements

.PHONY: setup demo test lint debs clean

$(PY):
	python3 -m venv .venv

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test,eval,encoder,quant]"
	touch $(STAMP)

setup: $(STAMP) debs

# Real text for the task suite comes from Debian packages; install them where missing.
debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: setup
	$(PY) -m slimpeft.demo

test: setup
	$(PY) -m pytest -q -x

lint: setup
	.venv/bin/ruff check src tests

clean:
	rm -rf .venv build *.egg-info
