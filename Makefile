# Farpage build, test, demo and benchmark entry points.
# `make demo` and `make test` work as root on a fresh Debian 12 machine with the
# Swift 6 toolchain on PATH: they install the Debian packages they need first.

SHELL := /bin/bash
SWIFT ?= swift
CC ?= cc
PREFIX ?= /usr/local
RELEASE := .build/release
DEBUG := .build/debug
DEB_PACKAGES := liburing-dev libibverbs-dev librdmacm-dev libxxhash-dev pkg-config util-linux python3-numpy
# What `make test-vm` boots and runs in its guests (Debian 12's 6.1 kernel under qemu, Soft-RoCE).
# Kept apart from DEB_PACKAGES: `make demo` and `make build` do not pull qemu.
VM_DEB_PACKAGES := qemu-system-x86 linux-image-amd64 busybox-static cpio kmod iproute2 rdma-core \
	ibverbs-utils ibverbs-providers rdmacm-utils perftest
CFLAGS_LIB := -O2 -g -Wall -Wextra -Werror -fPIC -fvisibility=hidden -D_GNU_SOURCE \
	-ISources/CFarpageClient/include -ISources/CFarpageClient -ISources/CFarpageKernel/include
LIB_SOURCES := Sources/CFarpageClient/farpage.c Sources/CFarpageKernel/fp_kernel.c Shim/farpage_preload.c
LIB_HEADERS := Sources/CFarpageClient/include/farpage.h Sources/CFarpageClient/farpage_wire.h \
	Sources/CFarpageClient/farpage_internal.h Sources/CFarpageKernel/include/fp_kernel.h

# Swift lives outside Debian's packages; /opt/swift is where our machines keep it.
export PATH := $(PATH):/opt/swift/usr/bin

.PHONY: all deps vm-deps build lib demo test test-vm vm-run bench install clean

all: build lib

# Install missing Debian packages: one `apt-get update`, then `apt-get install`.
deps:
	@missing=""; for p in $(DEB_PACKAGES) $(EXTRA_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make: missing Debian packages:$$missing — run as root or apt-get install them" >&2; exit 1; fi; \
	  echo "installing:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@command -v $(SWIFT) >/dev/null || { echo "make: the Swift 6 toolchain is required on PATH (https://swift.org/install)" >&2; exit 1; }

# The VM tests' packages (exit status 2 with a SKIPPED line where they cannot be installed:
# not root, not Debian).
vm-deps:
	@scripts/vm/install-deps.sh $(VM_DEB_PACKAGES)

build: deps
	$(SWIFT) build -c release --static-swift-stdlib

lib: $(RELEASE)/libfarpage.so $(RELEASE)/fp-shim-exercise

# libfarpage.so: the C API and the LD_PRELOAD shim. Exports only farpage_* and the
# interposed symbols (everything else is hidden).
$(RELEASE)/libfarpage.so: $(LIB_SOURCES) $(LIB_HEADERS)
	@mkdir -p $(RELEASE)
	$(CC) $(CFLAGS_LIB) -shared -Wl,-soname,libfarpage.so.1 -o $@ $(LIB_SOURCES) -lpthread -ldl

# The shim's test program: every interposed function, run with and without LD_PRELOAD.
$(RELEASE)/fp-shim-exercise: Tests/Shim/shim_exercise.c Sources/CFarpageClient/include/farpage.h
	@mkdir -p $(RELEASE)
	$(CC) -O1 -g -Wall -Wextra -Werror -Wno-maybe-uninitialized -D_GNU_SOURCE -ISources/CFarpageClient/include -o $@ $< -lpthread -ldl

demo: build lib
	scripts/demo.sh $(RELEASE)

test: deps
	$(SWIFT) build --build-tests
	$(MAKE) lib
	@mkdir -p .build
	@set -o pipefail; FARPAGE_BIN_DIR=$(CURDIR)/$(DEBUG) FARPAGE_LIB=$(CURDIR)/$(RELEASE)/libfarpage.so \
	  $(SWIFT) test --skip-build --parallel --num-workers 1 2>&1 | tee .build/test.log || { \
	  echo; echo "==== failed tests (full log: .build/test.log) ===="; \
	  grep -E '✘|error:|Fatal error|signal' .build/test.log | grep -v 'passed after' | head -60; exit 1; }
	@# The VM tests, where their packages can be installed (root on Debian); otherwise a SKIPPED line.
	@rc=0; scripts/vm/install-deps.sh $(VM_DEB_PACKAGES) || rc=$$?; \
	if [ $$rc = 2 ]; then echo "make test: VM tests SKIPPED (see the line above)"; \
	elif [ $$rc != 0 ]; then exit 1; \
	else $(MAKE) --no-print-directory vm-run; fi

# Boots Debian's 6.1 kernel under qemu, one boot per scenario (scripts/vm/scenarios): Soft-RoCE
# verbs, the agent and a memory server with the connection broken mid-run, the agent on 6.1's
# userfaultfd. docs/vm-testing.md. Needs root on Debian (it installs VM_DEB_PACKAGES).
# The guests run the release binaries (`make build`'s): under emulation the debug ones are
# 5-7x slower, and slow enough to trip the agent's io_timeout by themselves.
test-vm: deps vm-deps vm-run

# (The debug build is for the Swift tests run in a guest, swift-tests-6.1; `make test` has it.)
vm-run:
	$(SWIFT) build --build-tests
	$(SWIFT) build -c release --static-swift-stdlib
	FARPAGE_BIN_DIR=$(CURDIR)/$(RELEASE) scripts/vm/test-vm.sh $(VM_SCENARIOS)

# fio measures the disk the NVMe tier is compared with (installed only for the benchmark).
bench: EXTRA_PACKAGES := fio
bench: build lib
	Benchmarks/run.sh $(RELEASE)

install: build lib
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include $(DESTDIR)/etc/systemd/system $(DESTDIR)/etc/farpage
	install -m 0755 $(RELEASE)/farpaged $(RELEASE)/farpagectl $(DESTDIR)$(PREFIX)/bin/
	install -m 0755 $(RELEASE)/libfarpage.so $(DESTDIR)$(PREFIX)/lib/libfarpage.so.1
	ln -sf libfarpage.so.1 $(DESTDIR)$(PREFIX)/lib/libfarpage.so
	install -m 0644 Sources/CFarpageClient/include/farpage.h $(DESTDIR)$(PREFIX)/include/
	install -m 0644 systemd/farpaged-agent.service systemd/farpaged-memserver.service $(DESTDIR)/etc/systemd/system/
	[ -e $(DESTDIR)/etc/farpage/agent.toml ] || install -m 0644 config/agent.toml $(DESTDIR)/etc/farpage/agent.toml
	[ -e $(DESTDIR)/etc/farpage/memserver.toml ] || install -m 0644 config/memserver.toml $(DESTDIR)/etc/farpage/memserver.toml

clean:
	rm -rf .build bench-results
