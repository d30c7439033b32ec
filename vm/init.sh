#!/bin/busybox sh
# /init of the test VMs (vm/mkinitramfs.sh). Loads the modules in /modules/order, then
# either mounts the host's root file system read-only over 9p (x86_64: the host-built
# test binaries run unchanged) and runs the command in ms.run= chrooted there, or runs
# /payload/run.sh from the initramfs (aarch64). A writable 9p share "results" receives the
# full logs. Prints "ms-exit: STATUS" last and powers off; vm/run-vm.sh reads that line.
/bin/busybox --install -s /bin
echo; echo "init: up"
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in $(cat /modules/order); do
  insmod "/modules/$m.ko" || echo "init: insmod $m failed"
done
run="" repo=""
for arg in $(cat /proc/cmdline); do
  case $arg in ms.run=*) run=${arg#ms.run=} ;; ms.repo=*) repo=${arg#ms.repo=} ;; esac
done
status=1
if [ -n "$run" ]; then
  # The host's root, read-only, with the kernel's own /proc, /sys, /dev and a fresh /tmp;
  # the results share at /tmp/results.
  mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /newroot &&
  mount -t proc proc /newroot/proc &&
  mount -t sysfs sys /newroot/sys &&
  mount -t devtmpfs dev /newroot/dev &&
  mount -t tmpfs tmp /newroot/tmp &&
  mkdir -p /newroot/tmp/results &&
  mount -t 9p -o trans=virtio,version=9p2000.L results /newroot/tmp/results || {
    echo "init: cannot mount the host's root or the results share"; echo "ms-exit: 1"; poweroff -f; }
  mkdir -p /newroot/dev/shm && mount -t tmpfs shm /newroot/dev/shm
  # A checkout under /tmp is hidden by the fresh /tmp: mount its own share there.
  case $repo in /tmp/*)
    mkdir -p "/newroot$repo" &&
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose repo "/newroot$repo" ||
      echo "init: cannot mount the checkout at $repo" ;;
  esac
  chroot /newroot /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root /bin/bash "$run" /tmp/results
  status=$?
else
  mount -t 9p -o trans=virtio,version=9p2000.L results /results 2>/dev/null
  cd /payload && sh ./run.sh /results
  status=$?
fi
sync
echo "ms-exit: $status"
poweroff -f
