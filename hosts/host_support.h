// Shared pieces of the real-allocator and runtime hosts (issue 12): sqlite_host,
// threaded_host and python_host. Each host is one scenario in its own process, run by
// hosts/run-hosts.sh under LD_PRELOAD'ed allocators, every backend and both snapshot page
// sizes. The contract with the runner:
//  - exit 0 after printing "PASS ..." : every check held;
//  - exit kDiverged after "DIVERGED: ..." : the host saw wrong state after a rewind (or
//    at a checkpoint) and memsnap said nothing: a silent divergence;
//  - exit kHostError after "HOST-ERROR: ..." : the host could not set itself up (before
//    the first snapshot), or memsnap runs a backend other than the one asked for;
//  - exit kHang after "HANG: ..." : the watchdog fired;
//  - SIGABRT with a line "memsnap: <Function>: <message>" on stderr: memsnap refused.
// Anything else (a crash) is a failure too.
//
// The protocol every host follows (README, "Using it"): checkpoints and rewinds on the
// thread that took the first snapshot; other threads idle (parked on a futex in untracked
// memory) at checkpoints and rewinds; rewinds inside AutoDisallowMemoryChanges; what the
// host needs across a rewind on the controlling thread's stack or in untracked memory
// (AllocateMemory(n, MemoryKind::Generic)); printing only with write(2).
#ifndef MEMSNAP_HOST_SUPPORT_H
#define MEMSNAP_HOST_SUPPORT_H

#include <dlfcn.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "MemorySnapshotHelpers.h"

namespace hs {

using namespace mozilla::recordreplay;

constexpr int kDiverged = 3;
constexpr int kHostError = 4;
constexpr int kHang = 5;

// snprintf to the stack, then write(2): stdio's buffers are tracked memory.
inline void Say(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void Say(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (n > 0) {
    ssize_t ignored = write(2, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
    (void)ignored;
  }
}

// ---- Watchdog: SIGALRM turns a hang into a named failure. The phase and step live in
// untracked memory so that a rewind does not move them back.
struct Progress {
  const char* host;
  const char* phase;  // string literals only
  long step;
  long rewinds;       // hs::Rewind counts them
};
inline Progress*& ProgressSlot() {
  static Progress* p = nullptr;  // written before the first snapshot only
  return p;
}
// Set just before the first snapshot (so every checkpoint holds true): failures from then
// on are divergences, before it host errors.
inline bool& Snapshotted() {
  static bool s = false;
  return s;
}

// Prints `tag: message [phase, step, rewinds so far]` on one line and exits with `code`.
#define HS_EXIT_WITH(code, tag)                     \
  do {                                              \
    char hs_buf_[768];                              \
    va_list ap;                                     \
    va_start(ap, fmt);                              \
    vsnprintf(hs_buf_, sizeof hs_buf_, fmt, ap);    \
    va_end(ap);                                     \
    for (char* hs_c_ = hs_buf_; *hs_c_; hs_c_++)    \
      if (*hs_c_ == '\n') *hs_c_ = ' ';              \
    ::hs::Progress* hs_p_ = ::hs::ProgressSlot();   \
    if (hs_p_)                                      \
      ::hs::Say("%s: %s [%s, step %ld, after %ld rewinds]\n", tag, hs_buf_, \
                hs_p_->phase, hs_p_->step, hs_p_->rewinds); \
    else                                            \
      ::hs::Say("%s: %s\n", tag, hs_buf_);          \
    _exit(code);                                    \
  } while (0)

// The host saw state that differs from what it expected after a rewind or checkpoint.
[[noreturn]] inline void Diverged(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] inline void Diverged(const char* fmt, ...) { HS_EXIT_WITH(kDiverged, "DIVERGED"); }

// The host could not set itself up (before any snapshot).
[[noreturn]] inline void HostError(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] inline void HostError(const char* fmt, ...) { HS_EXIT_WITH(kHostError, "HOST-ERROR"); }

// A failure of the host's own operations (an SQLite call, a malloc): a divergence once
// memory is being rewound, a setup error before.
[[noreturn]] inline void Broken(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] inline void Broken(const char* fmt, ...) {
  if (Snapshotted()) HS_EXIT_WITH(kDiverged, "DIVERGED");
  HS_EXIT_WITH(kHostError, "HOST-ERROR");
}

#undef HS_EXIT_WITH

inline void WatchdogFired(int) {
  Progress* p = ProgressSlot();
  Say("HANG: %s: watchdog fired in %s, step %ld\n", p ? p->host : "host",
      p && p->phase ? p->phase : "?", p ? p->step : -1L);
  _exit(kHang);
}
// HOSTS_TRACE=1: hosts print "-- <host>: <event>" at each checkpoint and rewind, as
// markers in an strace or ltrace log of the allocator's system calls.
inline bool& Tracing() {
  static bool t = false;  // written before the first snapshot only
  return t;
}
inline void Mark(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void Mark(const char* fmt, ...) {
  if (!Tracing()) return;
  char buf[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  Progress* p = ProgressSlot();
  Say("-- %s: %s\n", p ? p->host : "host", buf);
}

// Call after InitializeMemorySnapshots and before the first snapshot.
inline Progress* StartWatchdog(const char* host, unsigned seconds) {
  Tracing() = getenv("HOSTS_TRACE") != nullptr;
  Progress* p = (Progress*)AllocateMemory(sizeof(Progress), MemoryKind::Generic);
  p->host = host;
  p->phase = "setup";
  p->step = 0;
  p->rewinds = 0;
  ProgressSlot() = p;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = WatchdogFired;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGALRM, &sa, nullptr);
  alarm(seconds);
  return p;
}

// ---- The rewind protocol of Firefox's ProcessRewind: back to the newest checkpoint, then
// `levels` older ones, in one disallow scope.
inline void Rewind(int levels) {
  {
    AutoDisallowMemoryChanges disallow;
    RestoreMemoryToLastSavedCheckpoint();
    for (int i = 0; i < levels; i++) RestoreMemoryToLastSavedDiffCheckpoint();
  }
  FixupFreeRegionsAfterRewind();
  if (ProgressSlot()) ProgressSlot()->rewinds++;
}

// ---- The checkpoint and rewind bookkeeping the threaded hosts share. The object lives on
// the controller's stack (never rewound): what each checkpoint observed, and after every
// rewind what the host observes now, checked against it. `observe(when)` reads the host's
// state; `check(now, then, when)` calls Diverged on a mismatch.
template <class State, int kLevels>
struct Timeline {
  State expect[kLevels];
  int top = 0, rewinds = 0, rounds = 0;
  char when[128];

  template <class Work>
  void Round(Work work) {
    ProgressSlot()->phase = "round";
    ProgressSlot()->step++;
    work();
    rounds++;
  }

  template <class Observe>
  void Checkpoint(Observe observe) {
    ProgressSlot()->phase = "checkpoint";
    Mark("checkpoint %d", top + 1);
    TakeDiffMemorySnapshot();
    top++;
    snprintf(when, sizeof when, "checkpoint %d", top);
    expect[top] = observe(when);
  }

  template <class Observe, class Check>
  void RewindAndCheck(int levels, Observe observe, Check check) {
    ProgressSlot()->phase = "rewind";
    const int from = top;
    Mark("rewind from checkpoint %d to %d", from, from - levels);
    Rewind(levels);
    Mark("rewound");
    top -= levels;
    rewinds++;
    snprintf(when, sizeof when, "after rewind %d (from checkpoint %d across %d levels to %d)",
             rewinds, from, levels, top);
    const State now = observe(when);
    check(now, expect[top], when);
  }
};

inline MemsnapStats Stats() {
  MemsnapStats s;
  memset(&s, 0, sizeof s);
  s.struct_size = sizeof s;
  if (memsnap_get_stats(&s) != MemsnapStatus::Ok) HostError("memsnap_get_stats failed");
  return s;
}

inline const char* BackendName(MemsnapBackend b) {
  switch (b) {
    case MemsnapBackend::Inactive: return "inactive";
    case MemsnapBackend::LinuxMprotect: return "mprotect";
    case MemsnapBackend::MacExceptionPort: return "mac-exception-port";
    case MemsnapBackend::MacSignal: return "mac-signal";
    case MemsnapBackend::LinuxUffd: return "uffd";
    case MemsnapBackend::LinuxUffdAsync: return "uffd-async";
  }
  return "unknown";
}

// After the first snapshot: the backend running is the one MEMSNAP_BACKEND asked for (a
// silent fallback would test the wrong thing).
inline void CheckBackend() {
  const MemsnapBackend b = Stats().backend;
  const char* env = getenv("MEMSNAP_BACKEND");
  const char* want = env && *env && strcmp(env, "auto") != 0 ? env : nullptr;
  if (b == MemsnapBackend::Inactive || (want && strcmp(want, BackendName(b)) != 0))
    HostError("backend %s is running, %s was asked for", BackendName(b), want ? want : "auto");
}

// ---- FNV-1a, word at a time.
struct Hash {
  uint64_t h = 0xcbf29ce484222325ull;
  void Mix(uint64_t v) { h = (h ^ v) * 0x100000001b3ull; }
  void Bytes(const void* p, size_t n) {
    const uint8_t* b = (const uint8_t*)p;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      uint64_t w;
      memcpy(&w, b + i, 8);
      Mix(w);
    }
    uint64_t tail = 0;
    memcpy(&tail, b + i, n - i);
    Mix(tail ^ ((uint64_t)n << 56));
  }
};

// A reproducible byte pattern of any length from a seed (xorshift64*, a word at a time).
inline void FillPattern(uint8_t* p, size_t n, uint64_t seed) {
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 0x2545f4914f6cdd1dull;
  size_t i = 0;
  for (; i < n; i += 8) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    const uint64_t w = x * 0x2545f4914f6cdd1dull;
    memcpy(p + i, &w, n - i < 8 ? n - i : 8);
  }
}
// Offset of the first byte of [p, p + n) that differs from the pattern, or n.
inline size_t PatternMismatch(const uint8_t* p, size_t n, uint64_t seed) {
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 0x2545f4914f6cdd1dull;
  for (size_t i = 0; i < n; i += 8) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    const uint64_t w = x * 0x2545f4914f6cdd1dull;
    const size_t k = n - i < 8 ? n - i : 8;
    if (memcmp(p + i, &w, k) != 0) {
      for (size_t j = 0; j < k; j++)
        if (p[i + j] != ((const uint8_t*)&w)[j]) return i + j;
    }
  }
  return n;
}

inline uint64_t NextRandom(uint64_t* s) {
  *s += 0x9e3779b97f4a7c15ull;
  uint64_t z = *s;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// ---- Futex parking in untracked memory: how worker threads stay idle at checkpoints.
inline void FutexWait(std::atomic<int>* word, int expected) {
  syscall(SYS_futex, (int*)word, FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}
inline void FutexWakeAll(std::atomic<int>* word) {
  syscall(SYS_futex, (int*)word, FUTEX_WAKE_PRIVATE, 1 << 30, nullptr, nullptr, 0);
}

// Workers run rounds on command; between rounds they are parked on `gen`. Lives in
// untracked memory (AllocateMemory(Generic)).
struct Crew {
  std::atomic<int> gen;   // bumped by the controller to start a round
  std::atomic<int> quit;  // set with the last bump
  std::atomic<int> done;  // workers that finished the current round
  int workers;
};
// Controller: start a round and wait until every worker has finished it (and is parked
// again, or about to be: it touches nothing tracked after counting itself done).
inline void RunRound(Crew* c, void (*alongside)(void*) = nullptr, void* arg = nullptr) {
  c->done.store(0);
  c->gen.fetch_add(1);
  FutexWakeAll(&c->gen);
  if (alongside) alongside(arg);
  for (;;) {
    const int d = c->done.load();
    if (d >= c->workers) break;
    FutexWait(&c->done, d);
  }
}
inline void StopCrew(Crew* c) {
  c->quit.store(1);
  c->done.store(0);
  c->gen.fetch_add(1);
  FutexWakeAll(&c->gen);
}
// Worker: waits for the next round; false when told to quit. `seen` is the worker's own
// (on its stack).
inline bool AwaitRound(Crew* c, int* seen) {
  for (;;) {
    const int g = c->gen.load();
    if (g != *seen) {
      *seen = g;
      return c->quit.load() == 0;
    }
    FutexWait(&c->gen, g);
  }
}
inline void FinishRound(Crew* c) {
  c->done.fetch_add(1);
  FutexWakeAll(&c->done);
}

// ---- Which allocator serves malloc, and how to make it give memory back now. Resolved
// before the first snapshot (dlsym takes the loader's locks and may allocate).
struct Allocator {
  const char* name = "glibc";
  bool purge = true;  // MEMSNAP_HOST_PURGE=0: no explicit purge calls
  int (*mallctl)(const char*, void*, size_t*, void*, size_t) = nullptr;  // jemalloc
  void (*mi_collect)(bool) = nullptr;                                    // mimalloc
  void (*tc_release)() = nullptr;                                        // tcmalloc
};
inline Allocator* TheAllocator() {
  static Allocator a;  // written before the first snapshot only
  return &a;
}
inline void DetectAllocator() {
  Allocator* a = TheAllocator();
  a->mallctl = (int (*)(const char*, void*, size_t*, void*, size_t))dlsym(RTLD_DEFAULT, "mallctl");
  a->mi_collect = (void (*)(bool))dlsym(RTLD_DEFAULT, "mi_collect");
  a->tc_release = (void (*)())dlsym(RTLD_DEFAULT, "MallocExtension_ReleaseFreeMemory");
  if (a->mallctl) a->name = "jemalloc";
  else if (a->mi_collect) a->name = "mimalloc";
  else if (a->tc_release) a->name = "tcmalloc";
  const char* purge = getenv("MEMSNAP_HOST_PURGE");
  a->purge = !(purge && strcmp(purge, "0") == 0);
  // The runner says which allocator it preloaded: one that did not load is a setup error,
  // not a pass under glibc.
  const char* want = getenv("MEMSNAP_HOST_ALLOCATOR");
  if (want && *want && strcmp(want, a->name) != 0)
    HostError("malloc is %s's, %s was preloaded", a->name, want);
}
// Asks the allocator to return free memory to the kernel now (madvise / munmap /
// decommit), from the calling thread: jemalloc flushes this thread's cache and purges
// every arena, mimalloc collects (forced), tcmalloc releases its free page-heap spans.
// glibc's malloc, pinned by memsnap, is left alone (malloc_trim on tracked memory is a
// documented hazard, not allocator behaviour). MEMSNAP_HOST_PURGE=0 turns this off.
inline void PurgeNow() {
  Allocator* a = TheAllocator();
  if (!a->purge) return;
  if (a->mallctl) {
    a->mallctl("thread.tcache.flush", nullptr, nullptr, nullptr, 0);
    a->mallctl("arena.4096.purge", nullptr, nullptr, nullptr, 0);  // MALLCTL_ARENAS_ALL
  } else if (a->mi_collect) {
    a->mi_collect(true);
  } else if (a->tc_release) {
    a->tc_release();
  }
}

// ---- Allocation churn: malloc, realloc and free across every size class, in bursts that
// leave whole runs of pages free so that the allocator purges them. Touches no state that
// outlives the call.
inline void Churn(uint64_t* rng, int rounds) {
  constexpr int kSlots = 48;
  void* slot[kSlots];
  for (int i = 0; i < kSlots; i++) slot[i] = nullptr;
  for (int r = 0; r < rounds; r++) {
    for (int i = 0; i < kSlots; i++) {
      const uint64_t x = NextRandom(rng);
      size_t n;
      switch (x % 16) {
        case 0: n = (512u << 10) + x % (1536u << 10); break;  // large, own mappings
        case 1: case 2: n = (64u << 10) + x % (256u << 10); break;
        default: n = 16 + x % 4096; break;
      }
      if (!slot[i]) {
        slot[i] = malloc(n);
        if (!slot[i]) Broken("malloc(%zu) returned null in the churn", n);
        memset(slot[i], (int)(x >> 40), n);
      } else if (x & 1) {
        void* q = realloc(slot[i], n);
        if (!q) Broken("realloc(%zu) returned null in the churn", n);
        slot[i] = q;
        memset(q, (int)(x >> 40), n);
      } else {
        free(slot[i]);
        slot[i] = nullptr;
      }
    }
  }
  for (int i = 0; i < kSlots; i++) free(slot[i]);
}

}  // namespace hs

#endif  // MEMSNAP_HOST_SUPPORT_H
