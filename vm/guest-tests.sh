#!/bin/sh
# Runs inside a test VM (vm/init.sh): the suites under every backend the kernel offers,
# printing one "ROW" line per kernel x backend with pass/fail counts, or the probe's reason
# for a skipped backend. POSIX sh: the aarch64 initramfs runs it with busybox.
#   guest-tests.sh RESULTS_DIR
# RESULTS_DIR/config (written by vm/run-vm.sh) sets: PROBE, UNIT, SCENARIOS, MODEL, CPP
# (test binaries; empty = not run), BACKENDS, MODEL_SEQUENCES, GTEST_FILTER (optional),
# CPP_BACKENDS (the backends the C++ suite runs under; default all) and TIMEOUT (seconds
# per binary). Full logs go to RESULTS_DIR/<part>-<backend>.log; the exit status is 0 only
# if every row passed.
res=$1
. "$res/config"
kernel=$(uname -r)
pagesize=$(sed -n 's/^KernelPageSize: *//p' /proc/self/smaps | head -1)
: "${TIMEOUT:=1200}" "${CPP_BACKENDS:=$BACKENDS}"
# The scenarios' 60 s hang watchdog, and the C++ suite's watchdogs and deadlines, assume
# a native machine: emulated, everything runs about ten times slower.
export SCENARIO_WATCHDOG=${SCENARIO_WATCHDOG:-600}
export MEMSNAP_TEST_TIME_SCALE=${MEMSNAP_TEST_TIME_SCALE:-10}
# scattered_writes_stay_under_map_limit sizes itself by vm.max_map_count (5/4 of it, in
# pages, so that one mapping per written page would exceed it). At the default 65530 that
# is 1.3 GiB at 16 KiB pages and 80,000 emulated sync faults: lowered to this for the
# scenarios only, the same test fits the VM. 0 keeps the kernel's value.
: "${SCENARIO_MAX_MAP_COUNT:=16384}"
export MODEL_SEQUENCES
[ -z "${MODEL_HEAP_GROWTH:-}" ] || export MODEL_HEAP_GROWTH
bad=0

# count KIND LOG STATUS: prints "passed/failed" from a runner's closing lines, and a note
# when the binary died without one.
count() {
  kind=$1 log=$2 st=$3
  case $kind in
    unit)
      p=$(sed -n 's/^test result: .* \([0-9]*\) passed; \([0-9]*\) failed.*/\1/p' "$log" | awk '{s+=$1} END {print s+0}')
      f=$(sed -n 's/^test result: .* \([0-9]*\) passed; \([0-9]*\) failed.*/\2/p' "$log" | awk '{s+=$1} END {print s+0}')
      seen=$(grep -c '^test result:' "$log") ;;
    scenarios)
      p=$(sed -n 's/^scenarios: \([0-9]*\) passed, \([0-9]*\) failed/\1/p' "$log")
      f=$(sed -n 's/^scenarios: \([0-9]*\) passed, \([0-9]*\) failed/\2/p' "$log")
      seen=$(grep -c '^scenarios: ' "$log") ;;
    model)
      if grep -q '^model: [0-9]* sequences (' "$log"; then
        p=$(sed -n 's/^model: \([0-9]*\) sequences (.*/\1/p' "$log"); f=0; seen=1
      else
        f=$(sed -n 's/^model: \([0-9]*\) sequence(s) FAILED; \([0-9]*\) passed.*/\1/p' "$log")
        p=$(sed -n 's/^model: \([0-9]*\) sequence(s) FAILED; \([0-9]*\) passed.*/\2/p' "$log")
        seen=$(grep -c 'sequence(s) FAILED' "$log")
      fi ;;
    cpp)
      p=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$log")
      f=$(sed -n 's/^\[  FAILED  \] \([0-9]*\) test.*/\1/p' "$log")
      seen=$(grep -c '^\[==========\] .* ran' "$log") ;;
  esac
  p=${p:-0} f=${f:-0}
  if [ "$seen" = 0 ]; then
    echo "$p/$f (died: status $st)"; return 1
  elif [ "$st" != 0 ] && [ "$f" = 0 ]; then
    echo "$p/$f (status $st)"; return 1
  fi
  echo "$p/$f"
  [ "$f" = 0 ]
}

# part NAME KIND BINARY BACKEND: runs one binary, appends "NAME p/f" to $row.
part() {
  name=$1 kind=$2 bin=$3 be=$4
  [ -n "$bin" ] || return 0
  log="$res/$name-$be.log"
  if [ "$be" = - ]; then
    timeout "$TIMEOUT" "$bin" > "$log" 2>&1; st=$?
  else
    MEMSNAP_BACKEND=$be timeout "$TIMEOUT" "$bin" > "$log" 2>&1; st=$?
  fi
  c=$(count "$kind" "$log" "$st") || rowbad=1
  row="$row${row:+, }$name $c"
}

echo "== kernel $kernel, $(uname -m), page size $pagesize, $(nproc) CPUs"
started=$(date +%s)
rowbad=0 row=""
part unit unit "$UNIT" -
[ -n "$UNIT" ] && { echo "ROW $kernel unit-tests: $row$([ $rowbad = 0 ] && echo ' -- PASS' || echo ' -- FAIL')"; [ $rowbad = 0 ] || bad=1; }

for be in $BACKENDS; do
  out=$(MEMSNAP_BACKEND=$be "$PROBE" 2>&1); rc=$?
  out=$(echo "$out" | tr '\n' ' ')
  if [ $rc = 77 ]; then
    echo "ROW $kernel $be: skipped: $out"; continue
  elif [ $rc != 0 ]; then
    echo "ROW $kernel $be: FAIL: the probe failed (exit status $rc): $out"; bad=1; continue
  fi
  t0=$(date +%s) rowbad=0 row=""
  maps=$(cat /proc/sys/vm/max_map_count)
  [ "$SCENARIO_MAX_MAP_COUNT" = 0 ] || echo "$SCENARIO_MAX_MAP_COUNT" > /proc/sys/vm/max_map_count
  part scenarios scenarios "$SCENARIOS" "$be"
  echo "$maps" > /proc/sys/vm/max_map_count
  part model model "$MODEL" "$be"
  case " $CPP_BACKENDS " in *" $be "*)
    if [ -n "${GTEST_FILTER:-}" ]; then export GTEST_FILTER; fi
    part c++ cpp "$CPP" "$be" ;;
  esac
  echo "ROW $kernel $be: $row ($(( $(date +%s) - t0 )) s)$([ $rowbad = 0 ] && echo ' -- PASS' || echo ' -- FAIL')"
  [ $rowbad = 0 ] || bad=1
done

# What auto picks here, and why it passed over the better backends; and what an
# unprivileged process gets (the suites run as root).
out=$(env -u MEMSNAP_BACKEND "$PROBE" 2>&1 | tr '\n' ' '); rc=$?
echo "ROW $kernel auto: picks $out"
if setpriv --help 2>&1 | grep -q reuid; then
  for be in $BACKENDS; do
    out=$(MEMSNAP_BACKEND=$be setpriv --reuid=65534 --regid=65534 --clear-groups "$PROBE" 2>&1 | tr '\n' ' ')
    echo "ROW $kernel $be as an unprivileged user: $out"
  done
fi
echo "== kernel $kernel: $(( $(date +%s) - started )) s"
exit $bad
