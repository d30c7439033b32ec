# memsnap: build, test, demo and install.
#   make            the release library and include/MemorySnapshot.h
#   make test       installs GoogleTest if missing, runs the Rust and C++ suites (the C++
#                   suite and the Rust scenarios once per available backend: BACKENDS,
#                   and once in the default configuration: test-auto)
#   make demo       runs the checkpoint/rewind demo with a timeline
#   make install PREFIX=/usr/local

CARGO    ?= cargo
CXX      ?= c++
PREFIX   ?= /usr/local
BUILD    := build
LIBDIR   := target/release
UNAME    := $(shell uname -s)

ifeq ($(UNAME),Darwin)
  LIBFILE  := libmemsnap.dylib
  # -bind_at_load is macOS's -z now: hosts must bind eagerly (see docs/hazards.md).
  RPATH    := -Wl,-rpath,$(abspath $(LIBDIR)) -Wl,-bind_at_load
  PC_BIND  := -Wl,-bind_at_load
  GTEST_PREFIX := $(shell brew --prefix googletest 2>/dev/null)
  GTEST_CFLAGS := $(if $(GTEST_PREFIX),-I$(GTEST_PREFIX)/include)
  GTEST_LIBS   := $(if $(GTEST_PREFIX),-L$(GTEST_PREFIX)/lib) -lgtest -lgtest_main
else
  LIBFILE  := libmemsnap.so
  # Hosts may bind lazily: memsnap binds its own functions' PLT slots ahead (see
  # docs/hazards.md). The suites bind eagerly all the same, as their exact dirty-page counts would
  # also see the GOT pages that other libraries' lazily bound calls write; the lazily bound
  # host is build/memsnap-lazy-tests.
  RPATH    := -Wl,-rpath,$(abspath $(LIBDIR)) -Wl,-z,now
  PC_BIND  :=
  GTEST_CFLAGS :=
  GTEST_LIBS   := -lgtest -lgtest_main
endif

CXXFLAGS ?= -O2 -g
CXXFLAGS += -std=c++17 -Wall -Wextra -Werror -Iinclude -pthread
HOST_LDFLAGS := -L$(LIBDIR) -lmemsnap $(RPATH) -pthread

CPP_TESTS := $(wildcard cpp-tests/*.cpp)
ifeq ($(UNAME),Darwin)
  CPP_TESTS := $(filter-out cpp-tests/linux_%,$(CPP_TESTS))
endif
DEMO_SRCS := $(wildcard demo/*.cpp)

.PHONY: all lib lint test test-16k test-verify test-auto rust-test cpp-test gtest demo install clean test-aarch64

all: lib

# The library and the generated header are files with real prerequisites, so that the
# C++ binaries below relink only when the library changed (cargo decides what to rebuild;
# the touch makes the library newer than its sources even when cargo had nothing to do).
# On Linux hosts record the library's SONAME (libmemsnap.so.MAJOR, set by build.rs), so
# LIB, what they depend on, is a link of that name to cargo's output (docs/packaging.md).
VERSION   := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ABI_MAJOR := $(firstword $(subst ., ,$(VERSION)))
SONAME    := libmemsnap.so.$(ABI_MAJOR)
CARGO_LIB := $(LIBDIR)/$(LIBFILE)
RUST_SRCS := $(shell find src -name '*.rs') Cargo.toml Cargo.lock build.rs cbindgen.toml memsnap.map
$(CARGO_LIB): $(RUST_SRCS)
	$(CARGO) build --release
	@touch $@
ifeq ($(UNAME),Darwin)
  LIB := $(CARGO_LIB)
else
  LIB := $(LIBDIR)/$(SONAME)
$(LIB): $(CARGO_LIB)
	@ln -sfn $(LIBFILE) $@
endif
include/MemorySnapshot.h: $(CARGO_LIB)
	@touch $@

lib: $(LIB)

# GoogleTest: Debian's libgtest-dev, or Homebrew's googletest on macOS.
gtest:
ifeq ($(UNAME),Darwin)
	@brew list googletest >/dev/null 2>&1 || brew install googletest
else
	@if [ ! -f /usr/include/gtest/gtest.h ]; then \
	  echo "Installing GoogleTest (libgtest-dev)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq libgtest-dev >/dev/null; \
	fi
endif

# The write-tracking backends the suites run under, one pass each (MEMSNAP_BACKEND). Each
# is probed first (build/memsnap-probe takes a first snapshot under it). A backend is
# skipped only on the probe's explicit "unsupported here" answer (exit status 77: memsnap
# refuses it with a reason, printed, and the kernel, asked without memsnap, does not offer
# it either); any other failure of the probe (a crash in the first snapshot, memsnap
# refusing what the kernel offers) fails the target. Under CI=true a skip fails too: CI
# runs as root on a 6.18 kernel, which offers all three, so a missing backend there is a
# regression, not the machine; a CI machine that cannot offer one must say so by setting
# BACKENDS. `auto`, the default, has a pass of its own (test-auto); macOS has one
# mechanism. Override, e.g. BACKENDS=uffd.
ifeq ($(UNAME),Darwin)
  BACKENDS ?= auto
else
  BACKENDS ?= mprotect uffd uffd-async
endif
PROBE := ./$(BUILD)/memsnap-probe

# For each backend in $(BACKENDS) the probe answers available for, runs $(1) with
# MEMSNAP_BACKEND set; every pass runs, and the recipe fails afterwards naming the
# backends whose pass (or probe) failed.
define per_backend
	@failed=""; for b in $(BACKENDS); do \
	  out=$$(MEMSNAP_BACKEND=$$b $(PROBE) 2>&1); rc=$$?; \
	  if [ $$rc = 0 ]; then \
	    echo "== $(2), backend $$b ($$out)"; \
	    MEMSNAP_BACKEND=$$b $(1) || failed="$$failed $$b"; \
	  elif [ $$rc = 77 ] && [ "$$CI" != true ]; then \
	    echo "make test: backend $$b unavailable here: $$out"; \
	  elif [ $$rc = 77 ]; then \
	    echo "make test: backend $$b unavailable, which CI=true does not allow: $$out"; \
	    failed="$$failed $$b"; \
	  else \
	    echo "make test: the probe of backend $$b failed (exit status $$rc): $$out"; \
	    failed="$$failed $$b"; \
	  fi; \
	done; \
	if [ -n "$$failed" ]; then echo "make test: $(2) failed under:$$failed"; exit 1; fi
endef

# The unit tests once (they fork their own userfaultfd cases; bench_report: the bench's
# pure pieces, which its harness-less target cannot test), then the forked scenarios
# (which check that the requested backend is the one running) and the model test once per
# backend.
RUST_SUITES := $(CARGO) test --release --test scenarios --test model
rust-test: $(BUILD)/memsnap-probe
	$(CARGO) test --release --lib --test bench_report
	$(call per_backend,$(RUST_SUITES),Rust scenarios and model)

$(BUILD)/memsnap-tests: $(CPP_TESTS) $(wildcard cpp-tests/*.h) include/MemorySnapshot.h include/MemorySnapshotHelpers.h $(LIB) | gtest
	@mkdir -p $(BUILD)
	$(CXX) $(CXXFLAGS) $(GTEST_CFLAGS) $(CPP_TESTS) -o $@ $(HOST_LDFLAGS) $(GTEST_LIBS)

$(BUILD)/memsnap-probe: cpp-tests/probe/backend_probe.cpp cpp-tests/kernel_offers.h include/MemorySnapshot.h $(LIB)
	@mkdir -p $(BUILD)
	$(CXX) $(CXXFLAGS) $< -o $@ $(HOST_LDFLAGS)

# A host linked with lazy binding (Linux): cpp-tests/lazy, kept out of the eagerly bound
# suite above, and the plugin it dlopens, both linked -z lazy.
LAZY_LDFLAGS := -L$(LIBDIR) -lmemsnap -Wl,-rpath,$(abspath $(LIBDIR)) -Wl,-z,lazy -pthread
ifneq ($(UNAME),Darwin)
  LAZY_TESTS := $(BUILD)/memsnap-lazy-tests
endif

$(BUILD)/libmemsnap-lazy-plugin.so: cpp-tests/lazy/plugin.cpp include/MemorySnapshot.h include/MemorySnapshotHelpers.h $(LIB)
	@mkdir -p $(BUILD)
	$(CXX) $(CXXFLAGS) -fPIC -shared $< -o $@ $(LAZY_LDFLAGS)

$(BUILD)/memsnap-lazy-tests: cpp-tests/lazy/lazy_binding_test.cpp cpp-tests/test_support.h $(BUILD)/libmemsnap-lazy-plugin.so $(LIB) | gtest
	@mkdir -p $(BUILD)
	$(CXX) $(CXXFLAGS) $(GTEST_CFLAGS) $< -o $@ $(LAZY_LDFLAGS) $(GTEST_LIBS) -ldl \
	  -Wl,--export-dynamic-symbol=memsnap_timer_record

cpp-test: $(BUILD)/memsnap-tests $(BUILD)/memsnap-probe $(LAZY_TESTS)
	$(call per_backend,./$(BUILD)/memsnap-tests,C++ suite)
ifneq ($(LAZY_TESTS),)
	$(call per_backend,./$(LAZY_TESTS),lazy-binding host)
endif

# The default configuration, MEMSNAP_BACKEND unset (auto), as a host gets it: one more
# pass of the scenarios, the model test and the C++ suite, at the default page size. The
# probe checks first that auto picked the best backend memsnap can provide and prints why
# it passed over better ones (memsnap's reasons), and the choice must be the first of
# uffd-async, uffd and mprotect that the per-backend probes found available. (macOS: the
# BACKENDS pass is already this one.)
test-auto: lib gtest $(BUILD)/memsnap-tests $(BUILD)/memsnap-probe
ifeq ($(UNAME),Darwin)
	@echo "make test-auto: the auto pass of BACKENDS is the default configuration here"
else
	@best=""; for b in uffd-async uffd mprotect; do \
	  if MEMSNAP_BACKEND=$$b $(PROBE) >/dev/null 2>&1; then best=$$b; break; fi; \
	done; \
	out=$$(env -u MEMSNAP_BACKEND $(PROBE) 2>&1) || { \
	  echo "make test: the probe of the default backend failed: $$out"; exit 1; }; \
	if [ "$${out%% *}" != "$$best" ]; then \
	  echo "make test: auto chose $${out%% *}, the per-backend probes say $$best is the best"; \
	  exit 1; \
	fi; \
	echo "== default configuration (MEMSNAP_BACKEND unset): $$out"; \
	failed=""; \
	env -u MEMSNAP_BACKEND $(RUST_SUITES) || failed="$$failed Rust"; \
	env -u MEMSNAP_BACKEND ./$(BUILD)/memsnap-tests || failed="$$failed C++"; \
	if [ -n "$$failed" ]; then echo "make test: the default pass failed:$$failed"; exit 1; fi
endif

# The demo verifies every rewind it makes, so it doubles as an end-to-end check; it runs
# once, under the default backend.
# test-16k runs the suites again with 16 KiB snapshot pages on a 4 KiB kernel, under
# every backend: the page size of Apple Silicon, and snapshot pages only partly covered by
# a mapping (whose shared edges stay on mprotect under userfaultfd).
test: lib gtest rust-test cpp-test test-auto demo test-16k test-verify test-hosts test-package

test-16k: export MEMSNAP_PAGE_SIZE = 16384
test-16k: lib gtest $(BUILD)/memsnap-tests $(BUILD)/memsnap-probe $(LAZY_TESTS)
	$(call per_backend,$(RUST_SUITES),Rust scenarios and model at 16 KiB)
	$(call per_backend,./$(BUILD)/memsnap-tests,C++ suite at 16 KiB)
ifneq ($(LAZY_TESTS),)
	$(call per_backend,./$(LAZY_TESTS),lazy-binding host at 16 KiB)
endif

# The verifying mode (docs/verify.md): the Rust scenarios, the model test, the C++
# suite and the demo once more with MEMSNAP_VERIFY=1, under the default backend
# (MEMSNAP_BACKEND unset). Every part runs; the target fails at the end naming those that
# failed.
test-verify: export MEMSNAP_VERIFY = 1
test-verify: lib gtest $(BUILD)/memsnap-tests $(BUILD)/memsnap-demo
	@echo "== verifying mode (MEMSNAP_VERIFY=1), default backend"; failed=""; \
	 env -u MEMSNAP_BACKEND $(RUST_SUITES) || failed="$$failed rust"; \
	 env -u MEMSNAP_BACKEND ./$(BUILD)/memsnap-tests || failed="$$failed c++"; \
	 env -u MEMSNAP_BACKEND ./$(BUILD)/memsnap-demo || failed="$$failed demo"; \
	 if [ -n "$$failed" ]; then echo "make test-verify: failed:$$failed"; exit 1; fi

$(BUILD)/memsnap-demo: $(DEMO_SRCS) include/MemorySnapshot.h include/MemorySnapshotHelpers.h $(LIB)
	@mkdir -p $(BUILD)
	$(CXX) $(CXXFLAGS) $(DEMO_SRCS) -o $@ $(HOST_LDFLAGS)

demo: $(BUILD)/memsnap-demo
	./$(BUILD)/memsnap-demo

# Real allocators and runtimes, part of `make test`: installs Debian's
# jemalloc, tcmalloc (gperftools' minimal) and mimalloc, SQLite's and CPython's
# development files if missing, builds the hosts in hosts/, and runs hosts/run-hosts.sh:
# the C++ AllocatorTest cases and the model test once per allocator (LD_PRELOAD) under
# the default backend and mprotect; a threaded SQLite host and a threaded allocation host
# under every allocator x backend x snapshot page; an embedded CPython (glibc malloc,
# pymalloc on) under every backend and page. One line per cell: PASS, REFUSED(<memsnap's
# message>) or FAIL(<why>); fails if any cell failed (a silent divergence above all).
# Narrow it with HOSTS_SUITES, HOSTS_ALLOCATORS, HOSTS_BACKENDS, HOSTS_PAGES (see the
# script). The verifying mode is on (MEMSNAP_VERIFY=1; MEMSNAP_VERIFY=0 turns it off):
# every rewind of every cell is also checked page by page against the checkpoint.
HOST_PKGS     := libjemalloc2 libtcmalloc-minimal4 libmimalloc2.0 libsqlite3-dev libpython3-dev
PYTHON_CONFIG ?= $(firstword $(wildcard /usr/bin/python3-config) python3-config)
HOST_HDRS     := hosts/host_support.h include/MemorySnapshot.h include/MemorySnapshotHelpers.h
HOST_BINS     := $(BUILD)/sqlite-host $(BUILD)/threaded-host $(BUILD)/python-host
.PHONY: test-hosts host-deps

host-deps:
	@missing=""; for p in $(HOST_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(BUILD)/sqlite-host: hosts/sqlite_host.cpp $(HOST_HDRS) $(LIB) | host-deps
	@mkdir -p $(BUILD)
	$(CXX) $(CXXFLAGS) $< -o $@ $(HOST_LDFLAGS) -lsqlite3

$(BUILD)/threaded-host: hosts/threaded_host.cpp $(HOST_HDRS) $(LIB)
	@mkdir -p $(BUILD)
	$(CXX) $(CXXFLAGS) $< -o $@ $(HOST_LDFLAGS)

# Debian's interpreter (python3-config --embed), not one a version manager puts first.
$(BUILD)/python-host: hosts/python_host.cpp $(HOST_HDRS) $(LIB) | host-deps
	@mkdir -p $(BUILD)
	$(CXX) $(CXXFLAGS) $$($(PYTHON_CONFIG) --includes) $< -o $@ $(HOST_LDFLAGS) \
	  $$($(PYTHON_CONFIG) --embed --ldflags)

test-hosts: export MEMSNAP_VERIFY ?= 1
test-hosts: host-deps $(BUILD)/memsnap-tests $(BUILD)/memsnap-probe $(HOST_BINS)
	$(CARGO) test --release --test model --no-run
	BUILD=$(BUILD) CARGO=$(CARGO) bash hosts/run-hosts.sh

# The Rust unit tests and scenarios for Linux aarch64, cross-built and run under qemu-user
# (Debian's gcc-aarch64-linux-gnu and qemu-user). Not part of `make test`; the model test
# is left out (too slow emulated, and it trips qemu-user itself: see docs/testing.md,
# Where it runs).
AARCH64_ENV := CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
test-aarch64:
	@command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null; }
	rustup target add aarch64-unknown-linux-gnu
	$(AARCH64_ENV) $(CARGO) test --release --target aarch64-unknown-linux-gnu --lib --test scenarios

# The suites on other kernels, in VMs (docs/kernels.md): Debian's x86_64 kernels 5.10
# (bullseye), 6.1 (bookworm) and 6.12 (trixie) over the host's root file system, and its
# arm64 kernels at 4 KiB and 16 KiB pages (trixie's arm64 and arm64-16k) with cross-built
# binaries under emulation. The kernels come from Debian's archive through a private apt
# configuration in build/kernels (vm/fetch-kernel.sh); Debian's QEMU, busybox, cpio and
# cross compilers are installed if missing, one package per apt-get call. One ROW line
# per kernel x backend, with pass/fail counts or the probe's reason for a skip; each
# kernel's time. Knobs: see vm/test-kernels.sh and vm/test-aarch64-vm.sh.
.PHONY: test-kernels test-aarch64-vm vm-deps-x86 vm-deps-arm
define apt_ensure
	@for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' && continue; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  [ -n "$$updated" ] || { $$SUDO apt-get update -qq; updated=1; }; \
	  echo "Installing $$p"; \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$p >/dev/null || exit 1; \
	done
endef
vm-deps-x86:
	$(call apt_ensure,qemu-system-x86 busybox-static cpio xz-utils zstd binutils)
vm-deps-arm:
	$(call apt_ensure,qemu-system-arm cpio xz-utils zstd binutils gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libgtest-dev)
	rustup target add aarch64-unknown-linux-gnu

test-kernels: vm-deps-x86 lib gtest $(BUILD)/memsnap-tests $(BUILD)/memsnap-probe
	@mkdir -p $(BUILD)/kernels
	$(CARGO) test --release --lib --test scenarios --test model --no-run --message-format=json \
	  | python3 vm/test-exes.py > $(BUILD)/kernels/tests.list
	vm/test-kernels.sh $(BUILD)/kernels/tests.list

test-aarch64-vm: vm-deps-arm
	vm/build-aarch64.sh
	vm/test-aarch64-vm.sh

# docs/kernel-results.md from the last runs' tables (build/kernels/results*.md), each
# headed with its date and the commit its binaries were built from.
.PHONY: kernel-results
kernel-results:
	@{ echo "# Kernel matrix results"; echo; \
	   echo "Written by \`make kernel-results\` from the last \`make test-kernels\` and"; \
	   echo "\`make test-aarch64-vm\` runs; how they run and what the rows mean: [kernels.md](kernels.md)."; \
	   for f in $(BUILD)/kernels/results.md $(BUILD)/kernels/results-aarch64.md; do \
	     [ -f $$f ] && { echo; cat $$f; }; done; } > docs/kernel-results.md
	@echo "wrote docs/kernel-results.md"

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf $(BUILD)

# macOS from Linux: cross-build and link libmemsnap.dylib for both Apple targets with
# cargo-zigbuild (zig is the linker, with its own macOS SDK stubs), lint both with clippy,
# and compile the C++ suite (objects: no macOS GoogleTest libraries here; the headers are
# portable) and the demo (compiled and linked against each dylib) with zig's clang for
# macOS. Nothing runs: Mach-O cannot execute here. On a Mac, `make test` runs it all.
APPLE_TARGETS := x86_64-apple-darwin aarch64-apple-darwin
APPLE_BUILD   := $(BUILD)/apple
APPLE_GTEST   := $(if $(GTEST_PREFIX),$(GTEST_PREFIX)/include,/usr/include)/gtest
APPLE_CPP     := $(filter-out cpp-tests/linux_%,$(wildcard cpp-tests/*.cpp))
.PHONY: apple
# The toolchain pieces come from the network (rustup's and PyPI's servers). Where they
# cannot be installed the target says so loudly and stops; it fails then under CI=true,
# so CI cannot pass without having built and linted both targets.
SKIP_STATUS := $(if $(filter true,$(CI)),1,0)
apple: gtest
	@rustup target add $(APPLE_TARGETS) || { echo "make apple: SKIPPED: cannot install the Apple targets here"; exit $(SKIP_STATUS); }; \
	 { command -v cargo-zigbuild >/dev/null && python3 -m ziglang version >/dev/null 2>&1; } || pip install ziglang cargo-zigbuild || \
	 { echo "make apple: SKIPPED: cannot install ziglang and cargo-zigbuild here"; exit $(SKIP_STATUS); }; \
	 $(MAKE) --no-print-directory apple-build apple-names

.PHONY: apple-build
apple-build:
	@mkdir -p $(APPLE_BUILD)/include && ln -sfn $(APPLE_GTEST) $(APPLE_BUILD)/include/gtest
	@set -e; for t in $(APPLE_TARGETS); do \
	  echo "== $$t"; \
	  $(CARGO) zigbuild --release --target $$t; \
	  lib=target/$$t/release/libmemsnap.dylib; file $$lib; \
	  file $$lib | grep -q 'Mach-O 64-bit .*dynamically linked shared library' || { echo "$$lib is not a Mach-O dylib"; exit 1; }; \
	  $(CARGO) clippy --release --all-targets --target $$t -- -D warnings; \
	  zt=$${t%%-apple-darwin}-macos; out=$(APPLE_BUILD)/$$t; mkdir -p $$out; \
	  for f in $(APPLE_CPP) $(DEMO_SRCS); do \
	    python3 -m ziglang c++ -target $$zt -std=c++17 -O0 -Wall -Wextra -Werror -Iinclude \
	      -isystem $(APPLE_BUILD)/include -c $$f -o $$out/$$(basename $$f .cpp).o; \
	  done; \
	  python3 -m ziglang c++ -target $$zt $(patsubst demo/%.cpp,$$out/%.o,$(DEMO_SRCS)) \
	    -Ltarget/$$t/release -lmemsnap -o $$out/memsnap-demo; \
	  file $$out/memsnap-demo; \
	done

# Speed and memory against fork copy-on-write and full copies, and the end-to-end SQLite
# workloads (bench/e2e.rs), in one run (release profile). Prints a table; writes
# bench/results.json, bench/chart.svg and bench/RESULTS.md (generated from results.json;
# `make bench-report` regenerates it alone). Fails if an end-to-end rewind did not verify.
# The SQLite workloads link the system libsqlite3 (Debian's libsqlite3-dev).
.PHONY: bench bench-report bench-deps
bench: bench-deps
	$(CARGO) bench --bench memsnap

bench-report: bench-deps
	$(CARGO) bench --bench memsnap -- --report

bench-deps:
ifneq ($(UNAME),Darwin)
	@dpkg-query -W -f='$${Status}' libsqlite3-dev 2>/dev/null | grep -q 'ok installed' || { \
	  echo "Installing libsqlite3-dev"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq libsqlite3-dev >/dev/null; }
endif

# Long model-test run (tests/model.rs), not part of `make test`: sequences of SOAK_LEN
# operations for SOAK_SECONDS from base seed SOAK_SEED (printed first; every failure prints
# its own seed and a command that reproduces it). Add MEMSNAP_PAGE_SIZE=16384 to the
# environment for the 16 KiB granularity.
SOAK_SECONDS ?= 600
SOAK_LEN     ?= 400
SOAK_SEED    ?= $(shell date +%s)
.PHONY: soak
soak:
	MODEL_SECONDS=$(SOAK_SECONDS) MODEL_LEN=$(SOAK_LEN) MODEL_SEED=$(SOAK_SEED) \
	  $(CARGO) test --release --test model

# The unit tests of the modules without system calls under Miri (nightly): range
# arithmetic, the free set, dirty-page bookkeeping, page deltas, partial snapshot pages, the page-size
# setting, the maps and /proc parsers, the Mach exception messages, the macOS region
# classifier and exception-server decisions, page-state bits. The other unit tests reach
# mmap through raw syscalls, which Miri cannot run, so
# they are filtered out by name; a new syscall test in these modules needs
# #[cfg_attr(miri, ignore)].
MIRI_TESTS := engine::ranges engine::free engine::dirty engine::delta engine::granule engine::eager engine::tests \
  sys::linux::maps sys::linux::threads::tests::syscall_file_formats sys::linux::threads::tests::stat_flags_parse \
  sys::linux::threads::tests::decimal_names sys::mach_exc sys::mach_regions sys::mach_serve \
  sys::mach_image \
  mem::pool::tests::page_state_bits \
  engine::backend::tests engine::backend::uffd_async::tests engine::verify::tests engine::budget sys::linux::tests::statm_fields_parse
.PHONY: miri
miri:
	@rustup component add --toolchain nightly miri rust-src || { echo "make miri: SKIPPED: no nightly toolchain with Miri can be installed here"; exit $(SKIP_STATUS); }; \
	 $(CARGO) +nightly miri test --lib -- $(MIRI_TESTS)

# ---- Library conventions and packaging (docs/packaging.md) ----------------------------
# Linux: the library's SONAME is libmemsnap.so.MAJOR (build.rs); hosts linked against it
# record that name, so the build tree has it too ($(LIB) above), and an install has the
# file libmemsnap.so.VERSION with the SONAME and development links to it.
REALNAME  := libmemsnap.so.$(VERSION)

# The part of `make test` about the library as a package: its exports, the original ABI,
# and (Linux) the package installed and used from outside.
.PHONY: test-package check-exports test-abi package-deps
ifeq ($(UNAME),Darwin)
test-package: test-abi
else
test-package: check-exports test-abi deb package-deps
	sh packaging/test-package.sh $(BUILD) $(CXX) $(DEBS)
endif

# What test-package needs beyond the build: cmake, for the find_package consumer.
package-deps:
	@command -v cmake >/dev/null || { \
	  echo "Installing cmake"; SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq cmake >/dev/null; }

# The original API as Firefox's headers declare it, C++ linkage (cpp-tests/abi), compiled
# against nothing of memsnap's (no -Iinclude) and linked with -lmemsnap: every call goes
# through the Itanium-mangled aliases, and the link fails if one is missing. Linux also
# checks that the test references every mangled name the library exports, so each is
# exercised, and runs it linked for lazy binding too (memsnap binds the mangled names'
# PLT slots ahead like the others: src/sys/linux/bind.rs). Once per backend.
ABI_TEST   := $(BUILD)/memsnap-abi-test
ABI_CFLAGS := -O2 -g -std=c++17 -Wall -Wextra -Werror -pthread
ABI_SRCS   := cpp-tests/abi/original_abi_test.cpp cpp-tests/abi/original_api.h
$(ABI_TEST): $(ABI_SRCS) $(LIB)
	@mkdir -p $(BUILD)
	$(CXX) $(ABI_CFLAGS) $< -o $@ $(HOST_LDFLAGS)

$(BUILD)/memsnap-abi-test-lazy: $(ABI_SRCS) $(LIB)
	@mkdir -p $(BUILD)
	$(CXX) $(ABI_CFLAGS) $< -o $@ $(LAZY_LDFLAGS)

test-abi: $(ABI_TEST) $(BUILD)/memsnap-probe $(if $(LAZY_TESTS),$(BUILD)/memsnap-abi-test-lazy)
ifneq ($(UNAME),Darwin)
	@nm -u $(ABI_TEST) | awk '$$2 ~ /^_ZN7mozilla12recordreplay/ {print $$2}' | sort > $(BUILD)/abi-refs.txt; \
	 nm -D --defined-only $(LIBDIR)/$(LIBFILE) | awk '$$3 ~ /^_ZN7mozilla12recordreplay/ {print $$3}' | sort > $(BUILD)/abi-exports.txt; \
	 if ! diff $(BUILD)/abi-exports.txt $(BUILD)/abi-refs.txt; then \
	   echo "make test-abi: the test and the library's mangled names differ (<: not exercised)"; exit 1; \
	 fi; \
	 echo "test-abi: the test references all $$(wc -l < $(BUILD)/abi-refs.txt) mangled exports"
endif
	$(call per_backend,./$(ABI_TEST),original-ABI test)
ifneq ($(LAZY_TESTS),)
	$(call per_backend,./$(BUILD)/memsnap-abi-test-lazy,original-ABI test bound lazily)
endif

# The exported symbols must be exactly memsnap.map's list, the reviewed public ABI: the
# linker merges that list with rustc's own (every #[no_mangle] item), so an export
# missing from the map would otherwise slip out unnoticed.
check-exports: lib
	@mkdir -p $(BUILD); nm -D --defined-only $(LIBDIR)/$(LIBFILE) | awk '{print $$3}' | sort > $(BUILD)/exports.txt; \
	 sed -n 's/^ *\([A-Za-z_][A-Za-z0-9_]*\);.*/\1/p' memsnap.map | sort > $(BUILD)/exports.map.txt; \
	 if ! diff $(BUILD)/exports.map.txt $(BUILD)/exports.txt; then \
	   echo "make check-exports: $(LIBFILE) exports differ from memsnap.map (<: only in the map, >: only in the library)"; exit 1; \
	 fi; \
	 echo "check-exports: $$(wc -l < $(BUILD)/exports.txt) exports, as memsnap.map lists"; \
	 readelf -d $(LIBDIR)/$(LIBFILE) | grep -q "SONAME.*\[$(SONAME)\]" || { echo "make check-exports: SONAME is not $(SONAME)"; exit 1; }

# make install DESTDIR=... PREFIX=...: the library, the headers under include/memsnap/,
# memsnap.pc and the CMake package files (find_package(memsnap)). On Linux the library is
# installed stripped, as libmemsnap.so.VERSION with the SONAME link and the development
# link; its debug info is split into a .debug file (linked by .gnu_debuglink), which
# make install-debug puts where gdb looks it up by build id. On macOS the dylib's DWARF
# stays in the build's object files; make install-debug gathers it into a .dSYM.
DIST        := $(BUILD)/dist
INSTALL_LIB  = $(DESTDIR)$(PREFIX)/lib
INSTALL_INC  = $(DESTDIR)$(PREFIX)/include/memsnap
SUBST        = sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@VERSION@|$(VERSION)|g' -e 's|@BIND@|$(PC_BIND)|' \
  -e 's|@SONAME@|$(SONAME)|g' -e 's|@REALNAME@|$(REALNAME)|g' -e 's|@ABI_MAJOR@|$(ABI_MAJOR)|g' -e 's| *$$||'
.PHONY: dist install install-debug deb

dist: lib
	@mkdir -p $(DIST)
ifeq ($(UNAME),Darwin)
	cp $(LIBDIR)/$(LIBFILE) $(DIST)/$(LIBFILE)
else
	objcopy --only-keep-debug --compress-debug-sections $(LIBDIR)/$(LIBFILE) $(DIST)/$(REALNAME).debug
	objcopy --strip-unneeded --add-gnu-debuglink=$(DIST)/$(REALNAME).debug $(LIBDIR)/$(LIBFILE) $(DIST)/$(REALNAME)
endif
	$(SUBST) memsnap.pc.in > $(DIST)/memsnap.pc
	$(SUBST) packaging/memsnapConfig.cmake.in > $(DIST)/memsnapConfig.cmake
	$(SUBST) packaging/memsnapConfigVersion.cmake.in > $(DIST)/memsnapConfigVersion.cmake

install: dist
	install -d $(INSTALL_LIB)/pkgconfig $(INSTALL_LIB)/cmake/memsnap $(INSTALL_INC)
ifeq ($(UNAME),Darwin)
	install -m 0755 $(DIST)/$(LIBFILE) $(INSTALL_LIB)/
else
	install -m 0644 $(DIST)/$(REALNAME) $(INSTALL_LIB)/
	ln -sfn $(REALNAME) $(INSTALL_LIB)/$(SONAME)
	ln -sfn $(SONAME) $(INSTALL_LIB)/$(LIBFILE)
endif
	install -m 0644 include/MemorySnapshot.h include/MemorySnapshotHelpers.h $(INSTALL_INC)/
	install -m 0644 $(DIST)/memsnap.pc $(INSTALL_LIB)/pkgconfig/
	install -m 0644 $(DIST)/memsnapConfig.cmake $(DIST)/memsnapConfigVersion.cmake $(INSTALL_LIB)/cmake/memsnap/

install-debug: dist
ifeq ($(UNAME),Darwin)
	dsymutil $(LIBDIR)/$(LIBFILE) -o $(INSTALL_LIB)/$(LIBFILE).dSYM
else
	@id=$$(readelf -n $(DIST)/$(REALNAME) | sed -n 's/.*Build ID: *//p'); \
	 [ -n "$$id" ] || { echo "make install-debug: $(REALNAME) has no build id"; exit 1; }; \
	 dir=$(DESTDIR)$(PREFIX)/lib/debug/.build-id/$$(echo $$id | cut -c1-2); \
	 file=$$dir/$$(echo $$id | cut -c3-).debug; \
	 install -d $$dir && install -m 0644 $(DIST)/$(REALNAME).debug $$file && echo "installed $$file"
endif

# make deb: Debian binary packages built with dpkg-deb from `make install PREFIX=/usr`:
# libmemsnapMAJOR (the library) and libmemsnap-dev (headers, links, .pc, CMake files), in
# $(BUILD)/ (packaging/deb.sh).
DEB_ARCH  = $(shell dpkg --print-architecture)
DEB_STAGE = $(abspath $(BUILD))/deb-stage
DEBS      = $(BUILD)/libmemsnap$(ABI_MAJOR)_$(VERSION)_$(DEB_ARCH).deb \
            $(BUILD)/libmemsnap-dev_$(VERSION)_$(DEB_ARCH).deb
deb:
	@command -v dpkg-deb >/dev/null || { echo "make deb: needs dpkg-deb (Debian, Ubuntu)"; exit 1; }
	rm -rf $(DEB_STAGE)
	$(MAKE) --no-print-directory install DESTDIR=$(DEB_STAGE) PREFIX=/usr
	sh packaging/deb.sh $(DEB_STAGE) $(BUILD) $(VERSION) $(ABI_MAJOR) $(DEB_ARCH)

# The Apple dylibs' exports and identity, checked in `make apple` with Debian's llvm tools
# (they read Mach-O): every C name, mangled alias and memsnap_ extension of memsnap.map
# is exported, with Mach-O's leading underscore (memsnap.map's libc names are interposed
# on Linux only); the install name and the versions build.rs sets; and the original-ABI
# test (cpp-tests/abi) links against each dylib. Only that the public
# names are present: zig's linker ignores rustc's -exported_symbols_list, so these
# cross-built dylibs export Rust's internal symbols too, which ld64 on a Mac does not.
APPLE_COMPAT := $(shell echo $$(($(ABI_MAJOR) + 1))).0.0
.PHONY: apple-names
apple-names:
	@command -v llvm-nm >/dev/null && command -v llvm-objdump >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq llvm >/dev/null; }
	@set -e; for t in $(APPLE_TARGETS); do \
	  lib=target/$$t/release/libmemsnap.dylib; out=$(APPLE_BUILD)/$$t; mkdir -p $$out; \
	  sed -n 's/^ *\([A-Z_][A-Za-z0-9_]*\|memsnap_[a-z0-9_]*\);.*/_\1/p' memsnap.map | sort > $$out/exports.expected; \
	  llvm-nm -gU $$lib | awk '{print $$3}' | sort > $$out/exports.txt; \
	  comm -23 $$out/exports.expected $$out/exports.txt > $$out/exports.missing; \
	  [ ! -s $$out/exports.missing ] || { echo "$$lib does not export:"; cat $$out/exports.missing; exit 1; }; \
	  echo "$$t: exports all $$(wc -l < $$out/exports.expected) public names of memsnap.map, $$(grep -c '^__ZN7mozilla12recordreplay' $$out/exports.expected) of them mangled"; \
	  llvm-objdump --macho --private-headers $$lib | grep -A6 'cmd LC_ID_DYLIB' > $$out/id.txt; \
	  grep -q 'name @rpath/libmemsnap.dylib' $$out/id.txt && \
	  grep -q 'current version $(VERSION)$$' $$out/id.txt && \
	  grep -q 'compatibility version $(APPLE_COMPAT)$$' $$out/id.txt || { \
	    echo "$$lib: LC_ID_DYLIB is not @rpath/libmemsnap.dylib $(VERSION) (compatibility $(APPLE_COMPAT))"; cat $$out/id.txt; exit 1; }; \
	  echo "$$t: $$(sed -n 's/^ *name \(.*\) (offset.*/\1/p' $$out/id.txt), current $(VERSION), compatibility $(APPLE_COMPAT)"; \
	  python3 -m ziglang c++ -target $${t%%-apple-darwin}-macos -std=c++17 -O1 -Wall -Wextra -Werror \
	    cpp-tests/abi/original_abi_test.cpp -Ltarget/$$t/release -lmemsnap -o $$out/memsnap-abi-test; \
	  echo "$$t: the original-ABI test links against the dylib through its mangled names"; \
	done
