// Shared helpers for the memsnap C++ suite.
//
// Every scenario that initializes memsnap runs in a child process (gtest's EXPECT_EXIT
// forks), so one scenario's write protection cannot poison the runner. Inside a child:
//  - check with MS_CHECK / MS_CHECK_EQ: on failure they print file:line and _exit(1);
//  - finish with MS_PASS() (_exit(0));
//  - print only with ms_say (snprintf to the stack + write(2)): stdio buffers live in
//    tracked memory and are rewound like everything else;
//  - keep no heap objects (std::string, std::vector) alive across a rewind, and keep
//    expected values on the stack or in untracked memory (AllocateMemory(Generic)).
#ifndef MEMSNAP_TEST_SUPPORT_H
#define MEMSNAP_TEST_SUPPORT_H

#include <gtest/gtest.h>

#include <csignal>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>
#include <unistd.h>

#include "MemorySnapshotHelpers.h"

namespace mstest {

inline void ms_say(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (n > 0) {
    ssize_t ignored = write(2, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
    (void)ignored;
  }
}

}  // namespace mstest

#define MS_CHECK(cond)                                                              \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      ::mstest::ms_say("%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);      \
      _exit(1);                                                                     \
    }                                                                               \
  } while (0)

#define MS_CHECK_EQ(a, b)                                                           \
  do {                                                                              \
    long long ms_a_ = (long long)(a), ms_b_ = (long long)(b);                       \
    if (ms_a_ != ms_b_) {                                                           \
      ::mstest::ms_say("%s:%d: check failed: %s == %s (%lld vs %lld)\n", __FILE__,  \
                       __LINE__, #a, #b, ms_a_, ms_b_);                             \
      _exit(1);                                                                     \
    }                                                                               \
  } while (0)

#define MS_PASS() _exit(0)

// Runs `body` in a forked child under a 60 s watchdog (SIGALRM turns a hang into a
// failure) and expects it to exit with status 0. `body` must not
// contain a top-level comma (the preprocessor would split it): call a function instead.
#define MS_IN_CHILD(body) \
  EXPECT_EXIT({ alarm(60); body; MS_PASS(); }, ::testing::ExitedWithCode(0), "")

// Runs `body` in a forked child and expects memsnap to abort it with a message
// matching `regex` on stderr.
#define MS_DIES_WITH(body, regex) \
  EXPECT_EXIT({ alarm(60); body; _exit(0); }, ::testing::KilledBySignal(SIGABRT), regex)

namespace mstest {

// The rewind protocol of Firefox's ProcessRewind: RestoreMemoryToLastSavedCheckpoint and
// `levels` RestoreMemoryToLastSavedDiffCheckpoint calls in one disallow scope, then
// FixupFreeRegionsAfterRewind.
inline void Rewind(int levels) {
  {
    mozilla::recordreplay::AutoDisallowMemoryChanges disallow;
    mozilla::recordreplay::RestoreMemoryToLastSavedCheckpoint();
    for (int i = 0; i < levels; i++) {
      mozilla::recordreplay::RestoreMemoryToLastSavedDiffCheckpoint();
    }
  }
  mozilla::recordreplay::FixupFreeRegionsAfterRewind();
}

// memsnap_get_stats into a stack record, checked Ok.
// The snapshot page memsnap uses (tracking unit, tracked-allocation alignment): what
// memsnap_page_size() reports once initialized, and before that what it will pick
// (MEMSNAP_PAGE_SIZE, else the kernel's page). The suite runs at 4 KiB and at 16 KiB.
inline size_t SnapshotPage() {
  size_t p = mozilla::recordreplay::memsnap_page_size();
  if (p != 0) return p;
  const char* env = getenv("MEMSNAP_PAGE_SIZE");
  if (env && *env) {
    char* end = nullptr;
    unsigned long v = strtoul(env, &end, 10);
    if (end && (*end == 'k' || *end == 'K')) v *= 1024;
    if (v != 0) return (size_t)v;
  }
  return (size_t)sysconf(_SC_PAGESIZE);
}

// `bytes` of fresh anonymous read-write memory aligned to the snapshot page (plain mmap
// only aligns to the kernel's page), or MAP_FAILED.
inline void* MapSnapshotPages(size_t bytes) {
  size_t page = SnapshotPage();
  size_t slack = page - (size_t)sysconf(_SC_PAGESIZE);
  void* p = mmap(nullptr, bytes + slack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return p;
  uintptr_t start = ((uintptr_t)p + page - 1) & ~(uintptr_t)(page - 1);
  if (start > (uintptr_t)p) munmap(p, start - (uintptr_t)p);
  uintptr_t end = (uintptr_t)p + bytes + slack;
  if (end > start + bytes) munmap((void*)(start + bytes), end - (start + bytes));
  return (void*)start;
}

inline mozilla::recordreplay::MemsnapStats Stats() {
  mozilla::recordreplay::MemsnapStats s;
  memset(&s, 0, sizeof s);
  s.struct_size = sizeof s;
  MS_CHECK(mozilla::recordreplay::memsnap_get_stats(&s) ==
           mozilla::recordreplay::MemsnapStatus::Ok);
  MS_CHECK_EQ(s.struct_size, sizeof s);
  return s;
}

}  // namespace mstest

#endif  // MEMSNAP_TEST_SUPPORT_H
