#!/usr/bin/env bash
# Cross-builds what the aarch64 test VM runs into build/aarch64/payload (vm/mkinitramfs.sh
# copies it to /payload): the Rust unit-test, scenario and model binaries, libmemsnap.so,
# the backend probe, the C++ suite (against GoogleTest built here from Debian's
# /usr/src/googletest for aarch64), the glibc and libstdc++ the binaries load (Debian's
# cross packages), vm/guest-tests.sh and the payload's run.sh. Binaries are stripped:
# the whole payload sits in the VM's memory.
set -euo pipefail
T=aarch64-unknown-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
CARGO=${CARGO:-cargo}
CXX=aarch64-linux-gnu-g++
out=build/aarch64
pl=$out/payload
rm -rf "$pl"; mkdir -p "$pl/bin" "$pl/lib" "$out/gtest"

$CARGO build --release --target $T
$CARGO test --release --target $T --lib --test scenarios --test model --no-run \
  --message-format=json | python3 vm/test-exes.py > "$out/tests.list"
while read -r name path; do cp "$path" "$pl/bin/$name"; done < "$out/tests.list"
# The C++ binaries record the SONAME (libmemsnap.so.MAJOR, build.rs), so the loader in
# the guest looks for that name.
soname=$(aarch64-linux-gnu-readelf -d target/$T/release/libmemsnap.so | sed -n 's/.*SONAME.*\[\(.*\)\]/\1/p')
cp target/$T/release/libmemsnap.so "$pl/lib/${soname:-libmemsnap.so}"

gt=/usr/src/googletest/googletest
if [ ! -f "$out/gtest/libgtest.a" ]; then
  $CXX -O2 -std=c++17 -pthread -I$gt/include -I$gt -c $gt/src/gtest-all.cc -o "$out/gtest/gtest-all.o"
  $CXX -O2 -std=c++17 -pthread -I$gt/include -I$gt -c $gt/src/gtest_main.cc -o "$out/gtest/gtest_main.o"
  aarch64-linux-gnu-ar rcs "$out/gtest/libgtest.a" "$out/gtest/gtest-all.o" "$out/gtest/gtest_main.o"
fi
FLAGS=(-O2 -std=c++17 -Wall -Wextra -Werror -Iinclude -I$gt/include -pthread)
LINK=(-Ltarget/$T/release -lmemsnap -Wl,-z,now -pthread)
$CXX "${FLAGS[@]}" cpp-tests/*.cpp -o "$pl/bin/memsnap-tests" "${LINK[@]}" "$out/gtest/libgtest.a"
$CXX "${FLAGS[@]}" cpp-tests/probe/backend_probe.cpp -o "$pl/bin/memsnap-probe" "${LINK[@]}"
aarch64-linux-gnu-strip "$pl"/bin/* "$pl/lib/${soname:-libmemsnap.so}"

sysroot=/usr/aarch64-linux-gnu/lib
for l in ld-linux-aarch64.so.1 libc.so.6 libm.so.6 libgcc_s.so.1 libstdc++.so.6 \
         libpthread.so.0 libdl.so.2 librt.so.1; do
  cp -L "$sysroot/$l" "$pl/lib/"
done
cp vm/guest-tests.sh "$pl/"
cat > "$pl/run.sh" <<'RUN'
# /payload/run.sh, run by vm/init.sh with the results share's mount point: the binaries'
# loader at its fixed path, then the suites (RESULTS/config names the binaries).
mkdir -p /lib
ln -sf /payload/lib/ld-linux-aarch64.so.1 /lib/ld-linux-aarch64.so.1
export LD_LIBRARY_PATH=/payload/lib
sh /payload/guest-tests.sh "$1"
RUN
du -sh "$pl"
