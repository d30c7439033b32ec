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
#include <cstring>
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
