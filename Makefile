# Two commands work on a fresh Debian 12 machine as root:
#   make demo   installs what it needs, then runs the demo on an embedded default
#   make test   installs what it needs, then runs the whole test suite
# Both are idempotent: a second run installs nothing.

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev fio e2fsprogs tmux cpio \
	qemu-system-x86 qemu-utils busybox-static \
	nfs-ganesha nfs-ganesha-vfs rpcbind libnfs13 iproute2 util-linux \
	libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev debootstrap

.PHONY: setup deps venv demo test lint bench clean

setup: deps venv

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,libvirt,bench]'
	touch $(STAMP)

demo: setup
	$(PY) -m fusecache.demo

test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 tests

lint: venv
	$(VENV)/bin/ruff check fusecache tests bench

bench: setup
	for b in passthrough hitpath store_profile eviction blocksize nfs_raw nfs secondchance peer_latency cluster guestmem; do \
		test -f bench/$$b.py && $(PY) bench/$$b.py || exit 1; \
	done

clean:
	rm -rf $(VENV) .cache build *.egg-info
