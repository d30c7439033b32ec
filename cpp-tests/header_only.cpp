// A translation unit that includes only memsnap's public headers and calls every
// function they declare, compiled with -Wall -Wextra -Werror as part of the suite: the
// proof that the generated header is complete, self-contained C++ with C linkage.
// header_test.cpp runs it in a forked child.
#include "MemorySnapshotHelpers.h"

namespace mozilla {
namespace recordreplay {

// Returns 0 when every call behaved as documented for this simple sequence.
int CallEveryFunction() {
  int failures = 0;
  InitializeMemorySnapshots();
  if (memsnap_page_size() == 0) failures++;
  if (memsnap_set_tracking_mode(MemsnapTrackingMode::WholeProcess) != MemsnapStatus::Ok) failures++;
  if (memsnap_set_restore_threads(2) != MemsnapStatus::Ok) failures++;
  if (memsnap_set_pin_allocator(true) != MemsnapStatus::Ok) failures++;
  if (memsnap_set_verify(true) != MemsnapStatus::Ok) failures++;
  size_t page = memsnap_page_size();
  void* untracked = AllocateMemory(page, MemoryKind::Generic);
  AddInitialUntrackedMemoryRegion(static_cast<uint8_t*>(untracked), page);
  if (memsnap_untrack_region(untracked, page) != MemsnapStatus::Ok) failures++;
  void* extra = AllocateMemory(page, MemoryKind::Tracked);
  AddInitialTrackedMemoryRegions(static_cast<uint8_t*>(extra), page, false);
  if (memsnap_track_region(extra, page) != MemsnapStatus::Ok) failures++;
  InitializeCountdownThread();
  TakeFirstMemorySnapshot();
  uint32_t* tracked = static_cast<uint32_t*>(AllocateMemoryTryAddress(nullptr, page, MemoryKind::Tracked));
  RegisterAllocatedMemory(AllocateMemory(page, MemoryKind::Generic), page, MemoryKind::Generic);
  if (!MemoryRangeIsTracked(tracked, page)) failures++;
  CheckFixedMemory(tracked, page);
  MemoryZero(tracked, page);
  MemoryMove(tracked, untracked, 64);
  RestoreWritableFixedMemory(tracked, page);
  if (!HandleDirtyMemoryFault(reinterpret_cast<uint8_t*>(tracked))) failures++;
  if (memsnap_prepare_write(tracked, page) != MemsnapStatus::Ok) failures++;
  TakeDiffMemorySnapshot();
  tracked[0] = 1;
  TakeDiffMemorySnapshot();
  EraseLastSavedDiffMemorySnapshot();
  {
    AutoCountdown countdown(60000);
    AutoTimer timer(TimerKind::Default);
    AutoDisallowMemoryChanges disallow;
    RestoreMemoryToLastSavedCheckpoint();
    RestoreMemoryToLastSavedDiffCheckpoint();
  }
  SetMemoryChangesAllowed(false);
  SetMemoryChangesAllowed(true);
  StartCountdown(0);
  FixupFreeRegionsAfterRewind();
  if (tracked[0] != 0) failures++;
  // `tracked` went back to the free set with the rewind to before its allocation.
  DeallocateMemory(AllocateMemory(page, MemoryKind::Tracked), page, MemoryKind::Tracked);
  MemsnapStats stats;
  stats.struct_size = sizeof stats;
  if (memsnap_get_stats(&stats) != MemsnapStatus::Ok || stats.rewinds != 2) failures++;
  if (stats.verify_pages_checked == 0) failures++;
  if (GetMemoryUsage(MemoryKind::Generic) < page) failures++;
  if (memsnap_status_string(MemsnapStatus::Ok) == nullptr) failures++;
  memsnap_timer_record(TimerKind::Default, memsnap_current_time_us());
  DumpTimers();
  UnrecoverableSnapshotFailure();
  return failures;
}

}  // namespace recordreplay
}  // namespace mozilla
