/* memsnap: the original MemorySnapshot.h's RAII helpers, over the generated C ABI.
 * MPL-2.0. Include this (it includes MemorySnapshot.h) from C++ callers. */

#ifndef MEMSNAP_MEMORY_SNAPSHOT_HELPERS_H
#define MEMSNAP_MEMORY_SNAPSHOT_HELPERS_H

#include "MemorySnapshot.h"

namespace mozilla {
namespace recordreplay {

// Disallows memory changes for its lifetime: SetMemoryChangesAllowed(false) on
// construction, SetMemoryChangesAllowed(true) on destruction. Cannot nest.
struct AutoDisallowMemoryChanges {
  AutoDisallowMemoryChanges() { SetMemoryChangesAllowed(false); }
  ~AutoDisallowMemoryChanges() { SetMemoryChangesAllowed(true); }
  AutoDisallowMemoryChanges(const AutoDisallowMemoryChanges&) = delete;
  AutoDisallowMemoryChanges& operator=(const AutoDisallowMemoryChanges&) = delete;
};

// Arms the countdown watchdog for its lifetime (StartCountdown(aCount), then
// StartCountdown(0)). Cannot nest: the destructor disarms, it does not restore.
struct AutoCountdown {
  explicit AutoCountdown(size_t aCount) { StartCountdown(aCount); }
  ~AutoCountdown() { StartCountdown(0); }
  AutoCountdown(const AutoCountdown&) = delete;
  AutoCountdown& operator=(const AutoCountdown&) = delete;
};

// Adds the time of its lifetime to a timer kind, reported by DumpTimers.
struct AutoTimer {
  explicit AutoTimer(TimerKind aKind) : mKind(aKind), mStart(memsnap_current_time_us()) {}
  ~AutoTimer() { memsnap_timer_record(mKind, mStart); }
  AutoTimer(const AutoTimer&) = delete;
  AutoTimer& operator=(const AutoTimer&) = delete;

 private:
  TimerKind mKind;
  double mStart;
};

}  // namespace recordreplay
}  // namespace mozilla

#endif  // MEMSNAP_MEMORY_SNAPSHOT_HELPERS_H
