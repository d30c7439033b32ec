#!/usr/bin/env bash
# Builds the initramfs that boots a test VM: a static busybox, vm/init.sh as /init, the
# kernel modules that init loads (with everything they depend on, in load order, taken
# from the unpacked Debian kernel package and decompressed), and optionally a payload
# directory copied to /payload (the aarch64 VM carries its test binaries there).
#   vm/mkinitramfs.sh KERNEL_ROOT BUSYBOX OUT.cpio.gz "MODULE..." [PAYLOAD_DIR]
# KERNEL_ROOT is a package unpacked by vm/fetch-kernel.sh; a module built into the kernel
# (modules.builtin) is skipped. KVER picks the module tree where KERNEL_ROOT holds more
# than one kernel (arm64 and arm64-16k).
set -euo pipefail
kroot=$1 busybox=$2 out=$3 wanted=$4 payload=${5:-}
moddir=""
for d in "$kroot"/lib/modules/${KVER:-*} "$kroot"/usr/lib/modules/${KVER:-*}; do
  [ -d "$d" ] && moddir=$d && break
done
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
[ -d "$moddir" ] || { echo "mkinitramfs: no modules under $kroot" >&2; exit 1; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,dev,proc,sys,tmp,newroot,results,modules}
cp "$busybox" "$stage/bin/busybox"
cp "$(dirname "$0")/init.sh" "$stage/init"
chmod +x "$stage/init"

declare -A done_mods=()
order=()
# Module names treat - and _ alike.
norm() { echo "${1//-/_}"; }
find_mod() {
  local n; n=$(norm "$1")
  find "$moddir/kernel" -regextype posix-extended \
    -regex ".*/$(echo "$n" | sed 's/_/[-_]/g')\.ko(\.xz|\.zst|\.gz)?" | head -1
}
add_mod() {
  local n f deps d; n=$(norm "$1")
  [ -n "${done_mods[$n]:-}" ] && return 0
  done_mods[$n]=1
  if sed "s/-/_/g" "$moddir/modules.builtin" | grep "/$n\.ko$" >/dev/null; then return 0; fi
  f=$(find_mod "$n")
  [ -n "$f" ] || { echo "mkinitramfs: module $n not found in $moddir" >&2; exit 1; }
  case $f in
    *.xz) xz -dc "$f" > "$stage/modules/$n.ko" ;;
    *.zst) zstd -qdc "$f" > "$stage/modules/$n.ko" ;;
    *.gz) gzip -dc "$f" > "$stage/modules/$n.ko" ;;
    *) cp "$f" "$stage/modules/$n.ko" ;;
  esac
  deps=$(strings -a "$stage/modules/$n.ko" | sed -n 's/^depends=//p' | head -1 | tr ',' ' ')
  for d in $deps; do add_mod "$d"; done
  order+=("$n")
}
for m in $wanted; do add_mod "$m"; done
printf '%s\n' "${order[@]}" > "$stage/modules/order"
if [ -n "$payload" ]; then cp -a "$payload" "$stage/payload"; fi
(cd "$stage" && find . | cpio -o -H newc --quiet) | gzip -1 > "$out"
