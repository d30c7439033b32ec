#!/usr/bin/env bash
# Boots one test VM and waits for it: prints the guest's "ROW" and "==" lines as they come
# and exits with the guest's status (vm/init.sh's "ms-exit:" line; none means the VM died).
#   vm/run-vm.sh x86_64  VMLINUZ INITRD RESULTS_DIR GUEST_SCRIPT
#   vm/run-vm.sh aarch64 VMLINUZ INITRD RESULTS_DIR
# x86_64 shares the host's root read-only over 9p and runs GUEST_SCRIPT there under KVM;
# nested KVM cannot run every kernel (Debian's 6.1 stops in "KVM internal error ...
# emulation failure"), so the CPU models in KVM_CPUS are tried in turn, then TCG.
# aarch64 runs the initramfs's /payload under TCG (-cpu max). RESULTS_DIR/config is
# written by the caller; the console goes to RESULTS_DIR/console.log.
# VM_TIMEOUT (seconds, default 3600) bounds the whole VM, BOOT_TIMEOUT (default 60) its
# boot up to init; VM_MEM and VM_SMP size it.
set -uo pipefail
arch=$1 kernel=$2 initrd=$3 res=$4 script=${5:-}
mkdir -p "$res"
res=$(cd "$res" && pwd)
: "${VM_TIMEOUT:=3600}" "${VM_MEM:=4G}" "${VM_SMP:=2}" "${BOOT_TIMEOUT:=60}"
KVM_CPUS=${KVM_CPUS-host max}
share_res=(-virtfs "local,path=$res,mount_tag=results,security_model=none")

# boot LIMIT QEMU_ARGS...: runs the VM; sets $st to the guest's status, 124 when init did
# not come up within LIMIT seconds (the VM is stopped), or 125 when the VM ended
# without a status line.
boot() {
  local limit=$1; shift
  : > "$res/console.log"
  timeout "$VM_TIMEOUT" "$@" -m "$VM_MEM" -smp "$VM_SMP" -kernel "$kernel" -initrd "$initrd" \
    -nographic -no-reboot -nic none "${share_res[@]}" > "$res/console.log" 2>&1 &
  local vm=$! waited=0
  until grep -aq '^init: up' "$res/console.log"; do
    if ! kill -0 "$vm" 2>/dev/null; then break; fi
    if [ "$waited" -ge "$limit" ]; then
      kill "$vm"; wait "$vm"; st=124; return
    fi
    sleep 2; waited=$((waited + 2))
  done
  tail -n +1 -f --pid="$vm" "$res/console.log" | grep --line-buffered -aE '^(ROW|==) |^init:|Kernel panic'
  wait "$vm"
  st=$(sed -n 's/^ms-exit: \([0-9]*\).*/\1/p' "$res/console.log" | tr -d '\r' | tail -1)
  st=${st:-125}
}

if [ "$arch" = x86_64 ]; then
  # The guest mounts a fresh tmpfs on /tmp, which would hide a checkout under /tmp (as
  # CI's clean clone may be): the checkout (this directory) is shared on its own as well,
  # and init mounts it at the same path when it lies there.
  repo=$(pwd)
  append="console=ttyS0 panic=-1 quiet no_timer_check ms.run=$script ms.repo=$repo"
  common=(qemu-system-x86_64 -append "$append"
    -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
    -virtfs "local,path=$repo,mount_tag=repo,security_model=none,readonly=on,multidevs=remap")
  # PVM (kvm_pvm, a KVM that runs guests without hardware virtualization, as nested
  # cloud machines offer) boots only guest kernels built for it: Debian's stop in its
  # instruction emulator ("KVM internal error ... emulation failure"), or hang silently.
  if [ -d /sys/module/kvm_pvm ] && [ -z "${KVM_CPUS_FORCE:-}" ]; then
    echo "-- /dev/kvm is PVM (kvm_pvm), which cannot boot Debian's kernels: TCG"
    KVM_CPUS=""
  fi
  if [ -w /dev/kvm ] && [ -n "$KVM_CPUS" ]; then
    for cpu in $KVM_CPUS; do
      echo "-- booting $(basename "$kernel") under KVM, -cpu $cpu"
      boot "$BOOT_TIMEOUT" "${common[@]}" -enable-kvm -cpu "$cpu"
      case $st in
        124) echo "-- no init within $BOOT_TIMEOUT s under KVM -cpu $cpu$(grep -a -m1 -o 'KVM internal error.*' "$res/console.log" | sed 's/^/: /')"
             cp "$res/console.log" "$res/console-kvm-$cpu.log"; continue ;;
        125) echo "-- the VM ended without a status (see $res/console.log)"; exit 1 ;;
        *) exit "$st" ;;
      esac
    done
  fi
  echo "-- booting $(basename "$kernel") under TCG"
  boot "$VM_TIMEOUT" "${common[@]}" -accel tcg -cpu max
else
  boot "$VM_TIMEOUT" qemu-system-aarch64 -M virt -accel tcg -cpu max \
    -append "console=ttyAMA0 panic=-1 quiet"
fi
[ "$st" = 125 ] && echo "-- the VM ended without a status (see $res/console.log)"
exit "$st"
