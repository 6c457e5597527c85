# Two commands work on a fresh Debian 12 machine as root:
#   make demo   installs what it needs, then runs the demo on an embedded default
#   make test   installs what it needs, then runs the whole test suite: the unit tier as nobody, then the rest as root
# Both are idempotent: a second run installs nothing. `make unit` runs the unit tier alone (tests/unit/:
# no root, FUSE or servers needed; started as root, it runs the tests as nobody).

VENV := .venv
PY := $(VENV)/bin/python
# Debian's python3, not whichever is first on PATH: `make unit` runs the venv as nobody, who must be
# able to reach its interpreter (a python3 under /root, e.g. pyenv's, is out of nobody's reach).
SYSTEM_PYTHON := /usr/bin/python3
STAMP := $(VENV)/.installed
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc libc6-dev python3-venv python3-dev fio e2fsprogs tmux cpio \
	qemu-system-x86 qemu-utils busybox-static \
	nfs-ganesha nfs-ganesha-vfs rpcbind libnfs13 iproute2 util-linux \
	libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev debootstrap

PYTEST := $(PY) -m pytest -q -rs -p no:cacheprovider --timeout=900
UNIT_USER := nobody

.PHONY: setup deps venv demo test unit lint bench clean

setup: deps venv

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,libvirt,bench]'
	touch $(STAMP)

demo: setup
	$(PY) -m examples.demo

test: setup lint unit
	$(PYTEST) tests --ignore=tests/unit

# Run as root, the unit tier runs as $(UNIT_USER) with a scratch HOME and TMPDIR of its own (and nothing
# else from root's environment): that it passes there is what shows it needs no root, FUSE or servers.
unit: venv
	@if [ "$$(id -u)" -ne 0 ]; then exec $(PYTEST) tests/unit; fi; \
	if ! runuser -u $(UNIT_USER) -- $(PY) -c '' 2>/dev/null; then \
		echo "make unit: $(UNIT_USER) cannot run $(PY) (built on $$(readlink -f $(PY))?): rebuild the venv with 'rm -rf $(VENV) && make venv'" >&2; \
		exit 1; \
	fi; \
	scratch=$$(mktemp -d /tmp/fusecache-unit.XXXXXX) && chown $(UNIT_USER) "$$scratch" || exit 1; \
	echo "unit tier as $(UNIT_USER) (HOME and TMPDIR: $$scratch)"; \
	runuser -u $(UNIT_USER) -- env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$$scratch" TMPDIR="$$scratch" \
		PYTHONDONTWRITEBYTECODE=1 HYPOTHESIS_STORAGE_DIRECTORY="$$scratch/hypothesis" $(PYTEST) tests/unit; \
	rc=$$?; rm -rf "$$scratch"; exit $$rc

lint: venv
	$(VENV)/bin/ruff check fusecache tests bench examples

bench: setup
	for b in passthrough hitpath qemu_bench amplification handoff store_profile eviction blocksize nfs_raw nfs secondchance peer_latency cluster guestmem warm; do \
		test -f bench/$$b.py && $(PY) -m bench.$$b || exit 1; \
	done

clean:
	rm -rf $(VENV) .cache build *.egg-info
