#!/usr/bin/env bash
# make test-kernels: the suites on Debian's x86_64 kernels, one VM per kernel.
#   vm/test-kernels.sh TESTS_LIST
# TESTS_LIST holds "name path" lines of the cargo test binaries (unit tests: memsnap,
# scenarios, model). For each suite in KERNEL_SUITES (default: bullseye bookworm trixie,
# i.e. 5.10, 6.1, 6.12) it fetches linux-image-amd64 (vm/fetch-kernel.sh), builds an
# initramfs (vm/mkinitramfs.sh), boots it (vm/run-vm.sh: KVM, or TCG where KVM cannot run
# the kernel) over the host's root and runs vm/guest-tests.sh there under BACKENDS. Prints
# the guest's ROW lines and the time each kernel took; writes them all to
# build/kernels/results.txt; fails if any kernel's run failed.
# Knobs: KERNEL_SUITES, BACKENDS, KERNEL_MODEL_SEQUENCES (default 100), KERNEL_CPP_BACKENDS
# (the backends the C++ suite runs under; default all), KERNEL_GTEST_FILTER.
set -uo pipefail
list=$1
repo=$(pwd)
kdir=$repo/build/kernels
: "${KERNEL_SUITES:=bullseye bookworm trixie}" "${BACKENDS:=mprotect uffd uffd-async}"
exe() { awk -v n="$1" '$1 == n {print $2}' "$list"; }
summary=$kdir/results.txt
mkdir -p "$kdir"
: > "$summary"
failed=""
all_start=$(date +%s)
for suite in $KERNEL_SUITES; do
  root=$(vm/fetch-kernel.sh "$suite" amd64 linux-image-amd64) || { failed="$failed $suite(fetch)"; continue; }
  vmlinuz=$(ls "$root"/boot/vmlinuz-* | head -1)
  initrd=$kdir/$suite-amd64/initrd.gz
  vm/mkinitramfs.sh "$root" "$(command -v busybox)" "$initrd" "virtio_pci 9pnet_virtio 9p" ||
    { failed="$failed $suite(initramfs)"; continue; }
  res=$kdir/$suite-amd64/results
  rm -rf "$res"; mkdir -p "$res"
  cat > "$res/config" <<CONF
PROBE=$repo/build/memsnap-probe
UNIT=$(exe memsnap)
SCENARIOS=$(exe scenarios)
MODEL=$(exe model)
CPP=$repo/build/memsnap-tests
BACKENDS="$BACKENDS"
CPP_BACKENDS="${KERNEL_CPP_BACKENDS:-$BACKENDS}"
MODEL_SEQUENCES=${KERNEL_MODEL_SEQUENCES:-100}
GTEST_FILTER="${KERNEL_GTEST_FILTER:-}"
CONF
  t0=$(date +%s)
  vm/run-vm.sh x86_64 "$vmlinuz" "$initrd" "$res" "$repo/vm/guest-tests.sh" | tee -a "$summary"
  st=${PIPESTATUS[0]}
  echo "== $suite ($(basename "$vmlinuz")): $(( $(date +%s) - t0 )) s, status $st" | tee -a "$summary"
  [ "$st" = 0 ] || failed="$failed $suite"
done
echo "== all kernels: $(( $(date +%s) - all_start )) s" | tee -a "$summary"
python3 vm/results-table.py "x86_64 kernels: make test-kernels" "$summary" > "$kdir/results.md"
if [ -n "$failed" ]; then echo "make test-kernels: failed on:$failed (logs: $kdir/<suite>-amd64/results/)"; exit 1; fi
