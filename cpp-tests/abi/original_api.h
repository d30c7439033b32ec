// The original record/replay memory-snapshot API, declared as Firefox's own headers
// declare it: C++ linkage inside namespace mozilla::recordreplay, no extern "C". Written
// from /work/shared/reference/interface-spec.md (sections 1 and 2): MemorySnapshot.h
// whole, and the memory and timer parts of ProcessRecordReplay.h.
//
// Code compiled against this header references the Itanium-mangled names
// (_ZN7mozilla12recordreplay...), never memsnap's C-linkage ones, so
// original_abi_test.cpp, which includes only this, links against libmemsnap exactly as
// an object built from Firefox's sources would. Nothing of memsnap's include/ is used.
#ifndef MEMSNAP_TEST_ORIGINAL_API_H
#define MEMSNAP_TEST_ORIGINAL_API_H

#include <cstddef>
#include <cstdint>

namespace mozilla {
namespace recordreplay {

// ---- ProcessRecordReplay.h: profiling ----

enum class TimerKind { Default, Count };

struct AutoTimer {
  explicit AutoTimer(TimerKind aKind);
  ~AutoTimer();

 private:
  TimerKind mKind;
  double mStart;
};

void DumpTimers();

// ---- ProcessRecordReplay.h: memory management ----

enum class MemoryKind {
  Tracked,
  Generic,
  ThreadSnapshot,
  TrackedRegions,
  FreeRegions,
  DirtyPageSet,
  SortedDirtyPageSet,
  PageCopy,
  ScriptHits,
  Count
};

void* AllocateMemory(size_t aSize, MemoryKind aKind);
void DeallocateMemory(void* aAddress, size_t aSize, MemoryKind aKind);

// ---- MemorySnapshot.h, in file order ----

void CheckFixedMemory(void* aAddress, size_t aSize);
void RestoreWritableFixedMemory(void* aAddress, size_t aSize);
void* AllocateMemoryTryAddress(void* aAddress, size_t aSize, MemoryKind aKind);
void RegisterAllocatedMemory(void* aBaseAddress, size_t aSize, MemoryKind aKind);
void AddInitialUntrackedMemoryRegion(uint8_t* aBase, size_t aSize);
bool MemoryRangeIsTracked(void* aAddress, size_t aSize);
void InitializeMemorySnapshots();
void TakeFirstMemorySnapshot();
void TakeDiffMemorySnapshot();
void RestoreMemoryToLastSavedCheckpoint();
void RestoreMemoryToLastSavedDiffCheckpoint();
void EraseLastSavedDiffMemorySnapshot();
void SetMemoryChangesAllowed(bool aAllowed);

struct AutoDisallowMemoryChanges {
  AutoDisallowMemoryChanges() { SetMemoryChangesAllowed(false); }
  ~AutoDisallowMemoryChanges() { SetMemoryChangesAllowed(true); }
};

bool HandleDirtyMemoryFault(uint8_t* aAddress);
void UnrecoverableSnapshotFailure();
void FixupFreeRegionsAfterRewind();
void StartCountdown(size_t aCount);

struct AutoCountdown {
  explicit AutoCountdown(size_t aCount);
  ~AutoCountdown();
};

void InitializeCountdownThread();
void MemoryMove(void* aDst, const void* aSrc, size_t aSize);
void MemoryZero(void* aDst, size_t aSize);

// ---- Defined with external linkage by the original MemorySnapshot.cpp but declared in
// no header (callers declare it themselves), and the later GetMemoryUsage
// (interface-spec.md section 0, the Floorp twin). ----

void AddInitialTrackedMemoryRegions(uint8_t* aAddress, size_t aSize, bool aExecutable);
size_t GetMemoryUsage(MemoryKind aKind);

}  // namespace recordreplay
}  // namespace mozilla

#endif  // MEMSNAP_TEST_ORIGINAL_API_H
