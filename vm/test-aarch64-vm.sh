#!/usr/bin/env bash
# make test-aarch64-vm: the suites on Debian's arm64 kernels, 4 KiB pages (arm64) and
# 16 KiB pages (arm64-16k), under qemu-system-aarch64 (TCG, -cpu max). The binaries are
# cross-built into build/aarch64/payload (vm/build-aarch64.sh) and carried in the
# initramfs; the console and logs land in build/kernels/<suite>-arm64/<flavour>/.
# Emulation is slow (an x86_64 core runs the VM's two CPUs), so the run is reduced:
# A64_MODEL_SEQUENCES model sequences (default 40) and the C++ suite under A64_CPP_BACKENDS
# (default: uffd-async mprotect); the unit tests and the scenarios run in full, the
# scenarios and the model under every backend. Prints the ROW lines and each kernel's time.
# A64_PARTS picks the suites (default: unit scenarios model c++); A64_MODEL_HEAP_GROWTH=0
# runs the model test without heap growth (the configuration qemu-user failed in).
# 8 GiB of guest memory (A64_VM_MEM): at 16 KiB pages scattered_writes_stay_under_map_limit
# needs 3.6 GiB (the kernel's map-count limit in 16 KiB pages, and their copies).
set -uo pipefail
suite=${A64_SUITE:-trixie}
: "${A64_FLAVOURS:=arm64 arm64-16k}" "${BACKENDS:=mprotect uffd uffd-async}"
kdir=build/kernels
pl=build/aarch64/payload
[ -x "$pl/bin/memsnap-probe" ] || { echo "test-aarch64-vm: run vm/build-aarch64.sh first"; exit 1; }
pkgs=""; for f in $A64_FLAVOURS; do pkgs="$pkgs linux-image-$f"; done
root=$(vm/fetch-kernel.sh "$suite" arm64 $pkgs busybox-static) || exit 1
# A64_PARTS: which suites run (default all: unit scenarios model c++).
: "${A64_PARTS:=unit scenarios model c++}"
part() { case " $A64_PARTS " in *" $1 "*) echo "$2" ;; esac; }
summary=$kdir/results-aarch64.txt
: > "$summary"
failed=""
all_start=$(date +%s)
for f in $A64_FLAVOURS; do
  vmlinuz=$(ls "$root"/boot/vmlinuz-*-"$f" | head -1)
  kver=${vmlinuz##*/vmlinuz-}
  dir=$kdir/$suite-arm64/$f
  mkdir -p "$dir"
  KVER=$kver vm/mkinitramfs.sh "$root" "$root/usr/bin/busybox" "$dir/initrd.gz" \
    "9pnet_virtio 9p" "$pl" || { failed="$failed $f(initramfs)"; continue; }
  res=$dir/results
  rm -rf "$res"; mkdir -p "$res"
  cat > "$res/config" <<CONF
PROBE=/payload/bin/memsnap-probe
UNIT=$(part unit /payload/bin/memsnap)
SCENARIOS=$(part scenarios /payload/bin/scenarios)
MODEL=$(part model /payload/bin/model)
CPP=$(part c++ /payload/bin/memsnap-tests)
BACKENDS="$BACKENDS"
CPP_BACKENDS="${A64_CPP_BACKENDS:-uffd-async mprotect}"
MODEL_SEQUENCES=${A64_MODEL_SEQUENCES:-40}
MODEL_HEAP_GROWTH=${A64_MODEL_HEAP_GROWTH:-}
GTEST_FILTER="${A64_GTEST_FILTER:-}"
TIMEOUT=${A64_TIMEOUT:-3000}
CONF
  t0=$(date +%s)
  VM_MEM=${A64_VM_MEM:-8G} VM_TIMEOUT=${A64_VM_TIMEOUT:-10800} vm/run-vm.sh aarch64 "$vmlinuz" "$dir/initrd.gz" "$res" | tee -a "$summary"
  st=${PIPESTATUS[0]}
  echo "== $kver: $(( $(date +%s) - t0 )) s, status $st" | tee -a "$summary"
  [ "$st" = 0 ] || failed="$failed $f"
done
echo "== all arm64 kernels: $(( $(date +%s) - all_start )) s" | tee -a "$summary"
python3 vm/results-table.py "arm64 kernels: make test-aarch64-vm" "$summary" > "$kdir/results-aarch64.md"
if [ -n "$failed" ]; then echo "make test-aarch64-vm: failed on:$failed (logs: $kdir/$suite-arm64/<flavour>/results/)"; exit 1; fi
