# IronClaw: `make demo` runs the main job, `make test` runs the checks and the test suite.
# Both install what they need (Debian packages, the virtualenv) and are idempotent.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMPS := .stamps
APT_PACKAGES := bubblewrap nftables iproute2 libseccomp2 python3 python3-venv \
                procps util-linux coreutils ca-certificates \
                debootstrap qemu-system-x86 e2fsprogs chromium

# Dependencies: ranges in pyproject.toml, exact versions in constraints.txt (regenerate
# with `make lock` after changing a range), so a fresh clone installs what was tested.
.PHONY: lock demo test check lint typecheck unit bench deps venv clean

deps: $(STAMPS)/apt $(STAMPS)/venv

$(STAMPS)/apt:
	@mkdir -p $(STAMPS)
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

$(STAMPS)/venv: pyproject.toml constraints.txt
	@mkdir -p $(STAMPS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,ray]'
	@touch $@

venv: deps

demo: deps
	$(VENV)/bin/ironclaw demo

lint: deps
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

typecheck: deps
	$(VENV)/bin/mypy

unit: deps
	$(PY) -m pytest -q

test: deps lint typecheck unit

bench: deps
	$(PY) benchmarks/rpc.py --json
	$(PY) benchmarks/start.py --json
	$(PY) benchmarks/oneshot.py --json
	$(PY) benchmarks/firewall.py --json
	$(PY) benchmarks/lifecycle.py --json
	$(PY) benchmarks/vm_boot.py --json
	$(PY) benchmarks/procs.py --json
	$(PY) benchmarks/api.py --json
	$(PY) benchmarks/cluster.py --json

clean:
	rm -rf $(VENV) $(STAMPS)

lock: deps
	$(PY) -m pip freeze --exclude-editable | grep -v '^ironclaw' > constraints.txt
