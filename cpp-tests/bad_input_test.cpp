// Issue 3, part 7 (suites BadInputDeathTest, BadInput): null, garbage (unmapped),
// unaligned, zero-length and wrapping arguments to every exported function that takes a
// pointer or a range, in the cases misuse_test.cpp and ext_test.cpp do not already cover.
// Each call must end in one of: a one-line "memsnap: <Function>: ..." message and SIGABRT;
// a status; a documented no-op or answer. Never a crash, a hang or changed memory. After
// every call that returns, the scenario takes or restores a checkpoint and checks that
// tracking still works (a rewind restores a tracked global exactly).
//
// docs/hazards.md's bad-input table lists these cases together with the ones of misuse_test.cpp
// and ext_test.cpp.

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

#include "test_support.h"

using namespace mozilla::recordreplay;

#define ONE_LINE(fn, msg) "^memsnap: " fn ": " msg "[^\n]*\n$"

namespace bad_input_test {

using mstest::Granule;
using mstest::Rewind;
using mstest::Stats;

alignas(65536) volatile int gCanary[65536 / sizeof(int)];  // tracked, whole granules

uintptr_t HighPage() { return ~(uintptr_t)0 & ~(uintptr_t)(Granule() - 1); }

// An address range that is not mapped, aligned to the snapshot granule (garbage, not
// misaligned: misalignment has cases of its own): reserved, then released.
uint8_t* Unmapped(size_t bytes) {
  const size_t g = Granule();
  void* p = mmap(nullptr, bytes + 2 * g, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  MS_CHECK(p != MAP_FAILED);
  MS_CHECK(munmap(p, bytes + 2 * g) == 0);
  return (uint8_t*)(((uintptr_t)p + g) & ~(uintptr_t)(g - 1));
}

// Garbage no mapping can ever occupy: the kernel half of the address space. (A hole made
// with mmap and munmap may be filled by memsnap's own mappings at the first snapshot.)
void* KernelHalf() { return (void*)(uintptr_t)0xffff800000000000ULL; }

// Tracking still works: a write to a tracked global is undone by a rewind.
void StillTracking() {
  gCanary[3] = 77;
  Rewind(0);
  MS_CHECK_EQ(gCanary[3], 0);
}

void Init() {
  mstest::Alarm(30);
  InitializeMemorySnapshots();
}

// ---- Calls that must return --------------------------------------------------------------

void RangeQueries() {
  Init();
  const size_t g = Granule();
  uint8_t* gone = Unmapped(4 * g);
  TakeFirstMemorySnapshot();
  // MemoryRangeIsTracked: garbage is untracked; an empty range is vacuously tracked (as in
  // the original, which loops over no page); an unaligned empty range asks about its page.
  MS_CHECK(!MemoryRangeIsTracked(gone, g));
  MS_CHECK(!MemoryRangeIsTracked(nullptr, 1));
  MS_CHECK(MemoryRangeIsTracked(nullptr, 0));
  MS_CHECK(MemoryRangeIsTracked((void*)((uintptr_t)gCanary + 3), 0));
  MS_CHECK(!MemoryRangeIsTracked(gone + 3, 0));
  // HandleDirtyMemoryFault: not ours.
  MS_CHECK(!HandleDirtyMemoryFault(nullptr));
  MS_CHECK(!HandleDirtyMemoryFault(gone));
  // CheckFixedMemory and RestoreWritableFixedMemory with an empty range do nothing;
  // RestoreWritableFixedMemory on null or garbage does nothing (no tracked page there).
  CheckFixedMemory(nullptr, 0);
  CheckFixedMemory(gone, 0);
  RestoreWritableFixedMemory(nullptr, 0);
  RestoreWritableFixedMemory(nullptr, g);
  RestoreWritableFixedMemory(gone, 4 * g);
  StillTracking();
}

TEST(BadInput, RangeQueriesAndFixedMemory) { MS_IN_CHILD(RangeQueries()); }

void Allocations() {
  Init();
  const size_t g = Granule();
  TakeFirstMemorySnapshot();
  uint8_t* gone = Unmapped(4 * g);  // after the snapshot's own mappings
  // DeallocateMemory: null or zero size does nothing (misuse_test); garbage of an
  // untracked kind is unmapped (a no-op where nothing is mapped). Garbage of the tracked
  // kind aborts (DeallocateMemoryNotAllocatedByMemsnap).
  uint8_t* gone2 = Unmapped(4 * g);
  DeallocateMemory(gone2, 4 * g, MemoryKind::Generic);
  MS_CHECK(!MemoryRangeIsTracked(gone2, g));
  // An odd size is rounded up to whole pages.
  uint8_t* odd = (uint8_t*)AllocateMemory(1, MemoryKind::Tracked);
  MS_CHECK(MemoryRangeIsTracked(odd, g));
  // RegisterAllocatedMemory with size 0 does nothing; registering untracked kinds for
  // null or garbage only adds an untracked range.
  RegisterAllocatedMemory((void*)gCanary, 0, MemoryKind::Tracked);
  RegisterAllocatedMemory(nullptr, 0, MemoryKind::Generic);
  RegisterAllocatedMemory(gone, 4 * g, MemoryKind::Generic);
  StillTracking();
  TakeDiffMemorySnapshot();
  StillTracking();
}

TEST(BadInput, AllocationCalls) { MS_IN_CHILD(Allocations()); }

// Hints are hints: inside an existing mapping, in the kernel half, at the top of the
// address space, or unmapped. Each gives zeroed memory elsewhere (or at the hint when it
// is free), never null, and deallocating that block (a legitimate pair of calls) leaves
// memsnap working.
void GarbageHints() {
  Init();
  const size_t g = Granule();
  TakeFirstMemorySnapshot();
  uint8_t* gone = Unmapped(4 * g);
  // A hint inside an existing mapping, a kernel-half hint and a hint near the top of the
  // address space are hints only: zeroed memory elsewhere, never null.
  void* hints[] = {(void*)gCanary, KernelHalf(), (void*)HighPage(), gone};
  for (void* h : hints) {
    uint8_t* p = (uint8_t*)AllocateMemoryTryAddress(h, 2 * g, MemoryKind::Generic);
    MS_CHECK(p != nullptr);
    MS_CHECK(p != (uint8_t*)gCanary);
    for (size_t i = 0; i < 2 * g; i++) MS_CHECK_EQ(p[i], 0);
    p[0] = 1;
    DeallocateMemory(p, 2 * g, MemoryKind::Generic);
  }
  StillTracking();
}

TEST(BadInput, AllocateWithGarbageHintsThenDeallocate) { MS_IN_CHILD(GarbageHints()); }

void ExtensionCalls() {
  Init();
  const size_t g = Granule();
  uint8_t* gone = Unmapped(4 * g);
  // Before the first snapshot: untracking null, garbage or an unaligned range is accepted
  // (widened to whole pages); an empty one is refused.
  MS_CHECK(memsnap_untrack_region(nullptr, g) == MemsnapStatus::Ok);
  MS_CHECK(memsnap_untrack_region(gone + 1, 1) == MemsnapStatus::Ok);
  MS_CHECK(memsnap_untrack_region(nullptr, 0) == MemsnapStatus::InvalidArgument);
  MS_CHECK(memsnap_untrack_region((void*)HighPage(), SIZE_MAX) == MemsnapStatus::InvalidArgument);
  MS_CHECK(memsnap_track_region((void*)1, g) == MemsnapStatus::InvalidArgument);  // widens to 0
  TakeFirstMemorySnapshot();
  // prepare_write: garbage is not tracked; an unaligned range prepares its pages; an
  // empty range is Ok and prepares nothing.
  MS_CHECK(memsnap_prepare_write(gone, g) == MemsnapStatus::NotTracked);
  const size_t dirty0 = Stats().active_dirty_pages;
  // Asked while the page is clean: armed by userfaultfd or by mprotect.
  const bool kernelWrites = mstest::KernelWritesTracked((const void*)gCanary);
  MS_CHECK(memsnap_prepare_write((void*)gCanary, 0) == MemsnapStatus::Ok);
  MS_CHECK_EQ(Stats().active_dirty_pages, dirty0);
  MS_CHECK(memsnap_prepare_write((uint8_t*)gCanary + 3, 5) == MemsnapStatus::Ok);
  // Preparing captures the page, except under uffd-async (which never blocks a write
  // and finds written pages at the checkpoint).
  (void)kernelWrites;
  const bool asyncGuarded = mstest::ActiveBackend() == MemsnapBackend::LinuxUffdAsync &&
                            mstest::UffdGuarded((const void*)gCanary, 1);
  MS_CHECK_EQ(Stats().active_dirty_pages, dirty0 + (asyncGuarded ? 0 : 1));
  MS_CHECK(memsnap_prepare_write((void*)gCanary, SIZE_MAX) == MemsnapStatus::InvalidArgument);
  // Status strings: any value gives a static string.
  MS_CHECK(strcmp(memsnap_status_string((MemsnapStatus)-1), "unknown status") == 0);
  MS_CHECK(strcmp(memsnap_status_string((MemsnapStatus)99), "unknown status") == 0);
  // get_stats: a record claiming a huge size is accepted (a newer caller) only up to what
  // memsnap writes; a null record is refused (ext_test).
  StillTracking();
}

TEST(BadInput, ExtensionCalls) { MS_IN_CHILD(ExtensionCalls()); }

// ---- Calls that must abort with one line ---------------------------------------------------

void RegisterWraps() {
  Init();
  RegisterAllocatedMemory((void*)HighPage(), 2 * Granule(), MemoryKind::Generic);
}

void RestoreWritableWraps() {
  Init();
  TakeFirstMemorySnapshot();
  RestoreWritableFixedMemory((void*)HighPage(), 2 * Granule());
}

void TryAddressWraps() {
  Init();
  AllocateMemoryTryAddress((void*)HighPage(), SIZE_MAX - Granule(), MemoryKind::Generic);
}

void CheckFixedNull() {
  Init();
  TakeFirstMemorySnapshot();
  CheckFixedMemory(nullptr, Granule());
}

void CheckFixedGarbage() {
  Init();
  uint8_t* gone = Unmapped(Granule());
  TakeFirstMemorySnapshot();
  CheckFixedMemory(gone, Granule());
}

void RegisterTrackedGarbageAfterFirst() {
  Init();
  TakeFirstMemorySnapshot();
  RegisterAllocatedMemory((uint8_t*)KernelHalf(), Granule(), MemoryKind::Tracked);
}

void RegisterTrackedNullAfterFirst() {
  Init();
  TakeFirstMemorySnapshot();
  RegisterAllocatedMemory(nullptr, Granule(), MemoryKind::Tracked);
}

void AddTrackedGarbage() {
  Init();
  AddInitialTrackedMemoryRegions((uint8_t*)KernelHalf(), Granule(), false);
  TakeFirstMemorySnapshot();
}

void TrackRegionGarbage() {
  Init();
  MS_CHECK(memsnap_track_region((uint8_t*)KernelHalf(), Granule()) == MemsnapStatus::Ok);
  TakeFirstMemorySnapshot();
}

void UnalignedRegisterTracked() {
  Init();
  TakeFirstMemorySnapshot();
  RegisterAllocatedMemory((uint8_t*)gCanary + 4, Granule(), MemoryKind::Tracked);
}

TEST(BadInputDeathTest, WrappingRanges) {
  MS_DIES_WITH(RegisterWraps(), ONE_LINE("RegisterAllocatedMemory", "range 0x[0-9a-f]+ \\+ 0x[0-9a-f]+ wraps around the address space"));
  MS_DIES_WITH(RestoreWritableWraps(), ONE_LINE("RestoreWritableFixedMemory", "range 0x[0-9a-f]+ \\+ 0x[0-9a-f]+ wraps around the address space"));
  MS_DIES_WITH(TryAddressWraps(), ONE_LINE("AllocateMemoryTryAddress", "(invalid size|out of memory)"));
}

TEST(BadInputDeathTest, NullAndGarbageFixedMemory) {
  MS_DIES_WITH(CheckFixedNull(), ONE_LINE("CheckFixedMemory", "fixed memory 0x0-0x[0-9a-f]+ is not tracked"));
  MS_DIES_WITH(CheckFixedGarbage(), ONE_LINE("CheckFixedMemory", "fixed memory 0x[0-9a-f]+-0x[0-9a-f]+ is not tracked"));
}

TEST(BadInputDeathTest, TrackingUnmappedMemory) {
  MS_DIES_WITH(RegisterTrackedGarbageAfterFirst(),
               ONE_LINE("RegisterAllocatedMemory", "cannot write-protect tracked memory 0x[0-9a-f]+-0x[0-9a-f]+"));
  MS_DIES_WITH(RegisterTrackedNullAfterFirst(),
               ONE_LINE("RegisterAllocatedMemory", "cannot write-protect tracked memory 0x0-0x[0-9a-f]+"));
  MS_DIES_WITH(AddTrackedGarbage(),
               ONE_LINE("TakeFirstMemorySnapshot", "cannot write-protect tracked memory 0x[0-9a-f]+-0x[0-9a-f]+"));
  MS_DIES_WITH(TrackRegionGarbage(),
               ONE_LINE("TakeFirstMemorySnapshot", "cannot write-protect tracked memory 0x[0-9a-f]+-0x[0-9a-f]+"));
  MS_DIES_WITH(UnalignedRegisterTracked(),
               ONE_LINE("RegisterAllocatedMemory", "range 0x[0-9a-f]+ \\+ 0x[0-9a-f]+ is not page-aligned"));
}

// DeallocateMemory with an untracked kind over tracked memory would unmap it under a
// rewind's feet: refused on the spot, naming the range.
void DeallocateTrackedAsGeneric() {
  Init();
  TakeFirstMemorySnapshot();
  void* p = AllocateMemory(Granule(), MemoryKind::Tracked);
  TakeDiffMemorySnapshot();
  DeallocateMemory(p, Granule(), MemoryKind::Generic);
  Rewind(0);
}

TEST(BadInputDeathTest, DeallocateTrackedMemoryAsUntrackedKind) {
  MS_DIES_WITH(DeallocateTrackedAsGeneric(),
               ONE_LINE("DeallocateMemory", "range 0x[0-9a-f]+-0x[0-9a-f]+ is tracked memory"));
}

// DeallocateMemory(Tracked) takes only memory obtained with AllocateMemory or
// RegisterAllocatedMemory: were a global's page to join the free set, the next tracked
// allocation would hand it out zeroed, overwriting the global. A one-line abort instead.
void DeallocateGlobalAsTracked() {
  Init();
  gCanary[0] = 42;
  TakeFirstMemorySnapshot();
  DeallocateMemory((void*)gCanary, Granule(), MemoryKind::Tracked);
  void* p = AllocateMemory(Granule(), MemoryKind::Tracked);
  MS_CHECK(p != (void*)gCanary);
  MS_CHECK_EQ(gCanary[0], 42);
}

TEST(BadInputDeathTest, DeallocateMemoryNotAllocatedByMemsnap) {
  MS_DIES_WITH(DeallocateGlobalAsTracked(),
               ONE_LINE("DeallocateMemory", "range 0x[0-9a-f]+-0x[0-9a-f]+ was not allocated"));
}

// DeallocateMemory refuses an unaligned base with a one-line abort, as
// RegisterAllocatedMemory does (the original's munmap failed with EINVAL and unmapped
// nothing), instead of widening it to whole pages and unmapping the memory around it.
void DeallocateUnaligned() {
  Init();
  const size_t k = (size_t)sysconf(_SC_PAGESIZE);
  uint8_t* p = (uint8_t*)AllocateMemory(2 * Granule(), MemoryKind::Generic);
  p[0] = 1;
  DeallocateMemory(p + k + 8, 16, MemoryKind::Generic);
  MS_CHECK_EQ(p[0], 1);  // the first page must still be mapped
}

TEST(BadInputDeathTest, DeallocateMemoryUnalignedIsRefused) {
  MS_DIES_WITH(DeallocateUnaligned(), ONE_LINE("DeallocateMemory", "range 0x[0-9a-f]+ \\+ 0x[0-9a-f]+ is not page-aligned"));
}

// With snapshot pages larger than the kernel's (MEMSNAP_PAGE_SIZE=16384 on a 4 KiB
// kernel), untracked allocations honour any kernel-page-aligned hint, and
// DeallocateMemory of such a block unmaps whole kernel pages only: a legitimate
// AllocateMemoryTryAddress/DeallocateMemory pair leaves the neighbouring mapping alone
// (once it was memsnap's own engine state, and the next call died with SIGSEGV).
void DeallocateKeepsNeighbours() {
  Init();
  const size_t g = Granule(), k = (size_t)sysconf(_SC_PAGESIZE);
  uint8_t* r = (uint8_t*)mmap(nullptr, 6 * g, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  MS_CHECK(r != MAP_FAILED);
  uint8_t* base = (uint8_t*)(((uintptr_t)r + g) & ~(uintptr_t)(g - 1));
  base[0] = 9;                                        // the live neighbour: [base, base + k)
  MS_CHECK(munmap(base + k, 2 * g) == 0);             // a hole right above it
  uint8_t* p = (uint8_t*)AllocateMemoryTryAddress(base + k, g, MemoryKind::Generic);
  MS_CHECK(p == base + k);                            // a free, kernel-aligned hint is honoured
  DeallocateMemory(p, g, MemoryKind::Generic);
  MS_CHECK(msync(base, k, MS_ASYNC) == 0);            // still mapped
  MS_CHECK_EQ(base[0], 9);
}

TEST(BadInput, DeallocateMemoryKeepsNeighbouringMappings) {
  MS_IN_CHILD(DeallocateKeepsNeighbours());
}

}  // namespace bad_input_test
