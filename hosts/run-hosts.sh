#!/usr/bin/env bash
# The real-allocator and runtime matrix of issue 12 (`make test-hosts`, which builds what
# this runs). One line per cell (suite, allocator, backend, snapshot page):
#   PASS                      every check held
#   REFUSED(memsnap: ...)     memsnap aborted with its one-line message
#   FAIL(diverged: ...)       wrong state after a rewind and no memsnap message (a silent
#                             divergence: a wrong hash, an integrity failure, a corrupt
#                             block, malloc returning null)
#   FAIL(...)                 any other end without a memsnap message: a crash, a hang,
#                             a host that could not set itself up
#   SKIPPED(...)              the backend is not available here (memsnap's reason)
# and exits non-zero if any cell failed.
#
# Suites: the C++ AllocatorTest cases and the Rust model test once per allocator under the
# default backend and under mprotect; sqlite_host and threaded_host under every allocator
# x backend x page size; python_host (glibc malloc, pymalloc on) under every backend and
# page size. Allocators come in by LD_PRELOAD (Debian's libjemalloc2,
# libtcmalloc-minimal4, libmimalloc2.0), each told to give freed memory back at once
# (HOSTS_PURGE=0 keeps their defaults and the hosts' explicit purge calls off).
#
# Environment: BUILD (build), CARGO (cargo), HOSTS_SUITES, HOSTS_ALLOCATORS,
# HOSTS_BACKENDS, HOSTS_PAGES, HOSTS_PURGE, HOSTS_TIMEOUT (seconds per cell, 240),
# HOSTS_MODEL_SEQUENCES (400), HOSTS_KEEP_LOGS (a directory for every cell's output).
set -u

BUILD=${BUILD:-build}
CARGO=${CARGO:-cargo}
SUITES=${HOSTS_SUITES:-allocator-tests model sqlite threaded python}
ALLOCATORS=${HOSTS_ALLOCATORS:-glibc jemalloc tcmalloc mimalloc}
BACKENDS=${HOSTS_BACKENDS:-mprotect uffd uffd-async}
PAGES=${HOSTS_PAGES:-4096 16384}
PURGE=${HOSTS_PURGE:-1}
CELL_TIMEOUT=${HOSTS_TIMEOUT:-240}
# make test runs 2000 sequences under glibc; here 400 per allocator and backend keep the
# whole target within minutes (mimalloc purging at once costs the model test 10x).
MODEL_SEQUENCES=${HOSTS_MODEL_SEQUENCES:-400}
start=$SECONDS

passed=0 refused=0 failed=0 diverged=0 skipped=0
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# The shared object of an allocator, from the loader's cache.
allocator_lib() {
  local soname
  case $1 in
    jemalloc) soname=libjemalloc.so.2 ;;
    tcmalloc) soname=libtcmalloc_minimal.so.4 ;;
    mimalloc) soname=libmimalloc.so.2 ;;
    *) return 0 ;;
  esac
  /sbin/ldconfig -p | awk -v s="$soname" '$1 == s { print $NF; exit }'
}

# The environment (NAME=value words) that puts allocator $1 under the program, purging
# freed memory at once unless HOSTS_PURGE=0. Option names are those of the Debian
# versions: jemalloc 5.3, gperftools 2.10, mimalloc 2.0.9 (decommit_delay is what later
# versions call purge_delay).
allocator_env() {
  local lib
  [ "$1" = glibc ] && return 0
  lib=$(allocator_lib "$1")
  [ -n "$lib" ] || return 1
  printf 'LD_PRELOAD=%s MEMSNAP_HOST_ALLOCATOR=%s' "$lib" "$1"
  if [ "$PURGE" = 0 ]; then printf ' MEMSNAP_HOST_PURGE=0'; return 0; fi
  case $1 in
    jemalloc) printf ' MALLOC_CONF=dirty_decay_ms:0,muzzy_decay_ms:0' ;;
    tcmalloc) printf ' TCMALLOC_RELEASE_RATE=10 TCMALLOC_AGGRESSIVE_DECOMMIT=true' ;;
    mimalloc) printf ' MIMALLOC_DECOMMIT_DELAY=0 MIMALLOC_SEGMENT_DECOMMIT_DELAY=0 MIMALLOC_PAGE_RESET=1' ;;
  esac
}

page_label() { [ "$1" = 4096 ] && echo 4k || echo "$(($1 / 1024))k"; }

report() {  # suite allocator backend page verdict
  printf '%-16s %-9s %-10s %-4s %s\n' "$1" "$2" "$3" "$(page_label "$4")" "$5"
}

# The first line matching $2 in file $1, trimmed to one line of at most 300 characters.
first() { grep -m1 -E -- "$2" "$1" | cut -c1-300; }

signame() { kill -l "$1" 2>/dev/null || echo "$1"; }

# Verdict for a host process (exit-status contract in hosts/host_support.h).
classify_host() {  # log rc
  local log=$1 rc=$2 m
  m=$(first "$log" '^memsnap: ')
  if [ "$rc" = 0 ] && grep -q '^PASS' "$log"; then echo PASS
  elif [ "$rc" = 134 ] && [ -n "$m" ]; then echo "REFUSED($m)"
  elif [ "$rc" = 3 ]; then echo "DIVERGED($(first "$log" '^DIVERGED: ' | sed 's/^DIVERGED: //'))"
  elif [ "$rc" = 4 ]; then echo "FAIL(host error: $(first "$log" '^HOST-ERROR: ' | sed 's/^HOST-ERROR: //'))"
  elif [ "$rc" = 5 ]; then echo "FAIL(hang: $(first "$log" '^HANG: ' | sed 's/^HANG: //'))"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "FAIL(hang: killed after ${CELL_TIMEOUT} s)"
  elif [ "$rc" -gt 128 ]; then
    echo "FAIL(killed by SIG$(signame $((rc - 128)))${m:+ after: $m}${m:- without a memsnap message})"
  else echo "FAIL(exit status $rc: $(tail -n 1 "$log" | cut -c1-200))"
  fi
}

# Verdict for a gtest run, from each failed test's death-test output: a memsnap line is a
# refusal; a check that failed (state differs, a block lost its contents) is a silent
# divergence; a death by signal without a memsnap line is a crash. Any failed test that
# is not a refusal makes the cell a failure.
classify_gtest() {  # log rc
  local log=$1 rc=$2 n
  if [ "$rc" = 0 ] && grep -q '^\[  PASSED  \]' "$log"; then
    n=$(sed -n 's/^\[  SKIPPED \] \([0-9]*\) tests\{0,1\}, listed below:/\1/p' "$log")
    echo "PASS${n:+ ($n skipped: glibc-only)}"
    return
  fi
  awk '
    function line(s) { sub(/^\[  DEATH   \] /, "", s); gsub(/^ +/, "", s); return s }
    /^\[ RUN      \]/ { test = $4; msg = ""; chk = ""; sig = ""; next }
    /^\[  DEATH   \] memsnap: / && msg == "" { msg = line($0) }
    /check failed|lost its contents|differs from|not zero|returned null/ && chk == "" { chk = line($0) }
    /Terminated by signal/ && sig == "" { sig = line($0) }
    /^\[  FAILED  \] .*\(/ {
      if (msg != "") { if (ref == "") ref = test ": " msg }
      else if (chk != "") { if (div == "") div = test ": " chk }
      else if (bad == "") bad = test ": " (sig == "" ? "failed" : sig " without a memsnap message")
    }
    END {
      if (div != "") print "DIVERGED(" substr(div, 1, 300) ")"
      else if (bad != "") print "FAIL(" substr(bad, 1, 300) ")"
      else if (ref != "") print "REFUSED(" substr(ref, 1, 300) ")"
      else print "FAIL(the test runner ended without a verdict)"
    }' "$log"
}

# Verdict for a model-test run: its first failing sequence. A check of memory or of an
# allocation (Current, Rewound, Untracked, Allocation) is a silent divergence; a Stats
# check (memsnap reporting fewer restorable checkpoints than the model expects: it noticed
# something) or a crash is a plain failure; a SIGABRT with a memsnap line a refusal.
classify_model() {  # log rc
  local log=$1 rc=$2 line m
  if [ "$rc" = 0 ]; then echo PASS; return; fi
  line=$(first "$log" 'FAILED \(seed' | sed 's/^model: //')
  m=$(first "$log" '^memsnap: ')
  if [ -n "$m" ] && echo "$line" | grep -q SIGABRT; then echo "REFUSED($m)"
  elif echo "$line" | grep -qE '(Current|Rewound|Untracked|Allocation) check failed'; then
    echo "DIVERGED($line)"
  else echo "FAIL(${line:-model test exit status $rc})"
  fi
}

# Runs one cell: suite allocator backend page classifier command...
cell() {
  local suite=$1 alloc=$2 backend=$3 page=$4 classifier=$5 env rc verdict log
  shift 5
  log=$out/cell.log
  if ! env=$(allocator_env "$alloc"); then
    report "$suite" "$alloc" "$backend" "$page" "FAIL($alloc is not installed: run make test-hosts)"
    failed=$((failed + 1))
    return
  fi
  local -a backend_env=(-u MEMSNAP_BACKEND)
  [ "$backend" != default ] && backend_env=("MEMSNAP_BACKEND=$backend")
  # The model test gets the allocator through cargo's runner, so that cargo and rustc
  # themselves run without it.
  local -a alloc_env=()
  if [ "$suite" = model ]; then alloc_env=("$runner_var=env $env")
  else read -ra alloc_env <<<"$env"; fi
  # (The braces keep bash's own "Segmentation fault" job notice out of the report.)
  { timeout -s KILL "$CELL_TIMEOUT" env "${backend_env[@]}" MEMSNAP_PAGE_SIZE="$page" \
      "${alloc_env[@]}" "$@" >"$log" 2>&1 </dev/null; } 2>/dev/null
  rc=$?
  if grep -q 'cannot be preloaded' "$log"; then
    verdict="FAIL($(first "$log" 'cannot be preloaded'))"
  else
    verdict=$($classifier "$log" "$rc")
  fi
  case $verdict in
    PASS*) passed=$((passed + 1)) ;;
    REFUSED*) refused=$((refused + 1)) ;;
    DIVERGED*) failed=$((failed + 1)); diverged=$((diverged + 1)); verdict="FAIL(diverged: ${verdict#DIVERGED(}" ;;
    *) failed=$((failed + 1)) ;;
  esac
  report "$suite" "$alloc" "$backend" "$page" "$verdict"
  if [ -n "${HOSTS_KEEP_LOGS:-}" ]; then
    mkdir -p "$HOSTS_KEEP_LOGS"
    cp "$log" "$HOSTS_KEEP_LOGS/$suite-$alloc-$backend-$page.log"
  fi
}

# Which of BACKENDS this machine provides: the others are reported as skipped, with
# memsnap's reason, once per suite that would run them.
declare -A unavailable=()
for b in $BACKENDS; do
  if ! why=$(MEMSNAP_BACKEND=$b "$BUILD/memsnap-probe" 2>&1); then
    unavailable[$b]=$(echo "$why" | tail -n 1 | cut -c1-200)
  fi
done

# cargo's runner variable for this host (the model test's allocator goes through it).
triple=$(rustc -vV | sed -n 's/^host: //p')
runner_var="CARGO_TARGET_$(echo "$triple" | tr 'a-z-' 'A-Z_')_RUNNER"

want() { case " $SUITES " in *" $1 "*) return 0 ;; esac; return 1; }

for alloc in $ALLOCATORS; do
  for backend in default mprotect; do
    if [ "$backend" != default ] && [ -n "${unavailable[$backend]:-}" ]; then
      report allocator-tests "$alloc" "$backend" 4096 "SKIPPED(${unavailable[$backend]})"
      skipped=$((skipped + 1))
      continue
    fi
    if want allocator-tests; then
      cell allocator-tests "$alloc" "$backend" 4096 classify_gtest \
        "$BUILD/memsnap-tests" --gtest_filter='AllocatorTest.*'
    fi
    if want model; then
      cell model "$alloc" "$backend" 4096 classify_model \
        env MODEL_SHRINK=0 MODEL_SEQUENCES="$MODEL_SEQUENCES" "$CARGO" test --release --quiet --test model
    fi
  done
done

for suite in sqlite threaded python; do
  want "$suite" || continue
  for alloc in $ALLOCATORS; do
    # CPython runs under glibc malloc only (pymalloc serves its small objects).
    [ "$suite" = python ] && [ "$alloc" != glibc ] && continue
    for backend in $BACKENDS; do
      for page in $PAGES; do
        if [ -n "${unavailable[$backend]:-}" ]; then
          report "$suite" "$alloc" "$backend" "$page" "SKIPPED(${unavailable[$backend]})"
          skipped=$((skipped + 1))
          continue
        fi
        cell "$suite" "$alloc" "$backend" "$page" classify_host "$BUILD/$suite-host"
      done
    done
  done
done

echo "test-hosts: $passed passed, $refused refused, $failed failed ($diverged diverged silently), $skipped skipped in $((SECONDS - start)) s"
[ "$failed" = 0 ]
