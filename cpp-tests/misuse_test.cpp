// memsnap misuse: one death test per broken precondition of the original interface.
//
// Every misuse must print exactly one line "memsnap: <Function>: <message>" on stderr
// and abort with SIGABRT. Each scenario runs in a forked child (MS_DIES_WITH /
// MS_IN_CHILD), initializes memsnap itself, and prints only with ms_say after the first
// snapshot. Scenario bodies are plain functions so that commas never split a macro
// argument. The MisuseEdgeCases suite holds calls that look suspicious but must not abort.

#include "test_support.h"

#include <pthread.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <thread>

using namespace mozilla::recordreplay;

// The whole of the child's stderr: one line naming `fn`, starting with `msg`.
// (POSIX extended regex without REG_NEWLINE: ^ and $ anchor the whole output, and the
// bracket holds a literal newline.)
#define ONE_LINE(fn, msg) "^memsnap: " fn ": " msg "[^\n]*\n$"
// The whole of the child's stderr: exactly the line "memsnap: <fn>: <msg>".
#define EXACT_LINE(fn, msg) "^memsnap: " fn ": " msg "\n$"

namespace {

size_t Page() { return mstest::SnapshotPage(); }

// The highest page-aligned address: [HighPage(), HighPage() + 2 pages) wraps.
uintptr_t HighPage() { return ~(uintptr_t)0 & ~(uintptr_t)(Page() - 1); }

void SleepMs(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

// Memory the tests write after the first snapshot (tracked in whole-process mode).
volatile int gTrackedGlobal = 0;

// A page-aligned static buffer for alignment cases.
alignas(65536) unsigned char gAlignedBuf[65536];

// ---- Before InitializeMemorySnapshots ------------------------------------------------

void PreInitTakeFirst() { TakeFirstMemorySnapshot(); }
void PreInitTakeDiff() { TakeDiffMemorySnapshot(); }
void PreInitSetAllowed() { SetMemoryChangesAllowed(false); }
void PreInitAllocate() { AllocateMemory(4096, MemoryKind::Generic); }
void PreInitRangeIsTracked() { (void)MemoryRangeIsTracked(gAlignedBuf, 16); }
void PreInitRestoreLast() { RestoreMemoryToLastSavedCheckpoint(); }
void PreInitRestoreDiff() { RestoreMemoryToLastSavedDiffCheckpoint(); }
void PreInitErase() { EraseLastSavedDiffMemorySnapshot(); }
void PreInitCheckFixed() { CheckFixedMemory(gAlignedBuf, 4096); }
void PreInitStartCountdown() { StartCountdown(10); }
void PreInitGetMemoryUsage() { (void)GetMemoryUsage(MemoryKind::Tracked); }
void PreInitHandleFault() { (void)HandleDirtyMemoryFault(gAlignedBuf); }

// ---- Lifecycle order -----------------------------------------------------------------

void InitTwice() {
  InitializeMemorySnapshots();
  InitializeMemorySnapshots();
}

void TakeFirstTwice() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  TakeFirstMemorySnapshot();
}

void TakeDiffBeforeFirst() {
  InitializeMemorySnapshots();
  TakeDiffMemorySnapshot();
}

void EraseBeforeFirst() {
  InitializeMemorySnapshots();
  EraseLastSavedDiffMemorySnapshot();
}

void FixupBeforeFirst() {
  InitializeMemorySnapshots();
  FixupFreeRegionsAfterRewind();
}

// ---- Unaligned ranges ----------------------------------------------------------------

void RegisterUnalignedBase() {
  InitializeMemorySnapshots();
  RegisterAllocatedMemory(gAlignedBuf + 8, Page(), MemoryKind::Generic);
}

void RegisterUnalignedSize() {
  InitializeMemorySnapshots();
  RegisterAllocatedMemory(gAlignedBuf, Page() + 1, MemoryKind::Tracked);
}

void CheckFixedUnaligned() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  CheckFixedMemory(gAlignedBuf + 16, Page());
}

void RestoreWritableFixedUnaligned() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  RestoreWritableFixedMemory(gAlignedBuf, 100);
}

void AllocateTryAddressUnalignedHint() {
  InitializeMemorySnapshots();
  AllocateMemoryTryAddress((void*)(uintptr_t)0x7f0000001001ULL, Page(), MemoryKind::Generic);
}

void AddUntrackedUnalignedBase() {
  InitializeMemorySnapshots();
  AddInitialUntrackedMemoryRegion(gAlignedBuf + 1, Page());
}

// ---- Wrapping ranges -----------------------------------------------------------------

void CheckFixedWraps() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  CheckFixedMemory((void*)HighPage(), 2 * Page());
}

void DeallocateWraps() {
  InitializeMemorySnapshots();
  DeallocateMemory((void*)HighPage(), 2 * Page(), MemoryKind::Generic);
}

void AddTrackedWraps() {
  InitializeMemorySnapshots();
  AddInitialTrackedMemoryRegions((uint8_t*)HighPage(), 2 * Page(), false);
}

void AddUntrackedWraps() {
  InitializeMemorySnapshots();
  AddInitialUntrackedMemoryRegion((uint8_t*)HighPage(), 2 * Page());
}

// ---- Tracking required ---------------------------------------------------------------

void CheckFixedUntracked() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  void* p = AllocateMemory(Page(), MemoryKind::Generic);
  CheckFixedMemory(p, Page());
}

void CheckFixedFree() {
  InitializeMemorySnapshots();
  void* p = AllocateMemory(2 * Page(), MemoryKind::Tracked);
  TakeFirstMemorySnapshot();
  MS_CHECK(MemoryRangeIsTracked(p, 2 * Page()));
  CheckFixedMemory(p, 2 * Page());  // tracked and in use: fine
  DeallocateMemory(p, 2 * Page(), MemoryKind::Tracked);
  CheckFixedMemory(p, 2 * Page());
}

// ---- Restores ------------------------------------------------------------------------

void RestoreLastNothingSaved() {
  InitializeMemorySnapshots();
  AutoDisallowMemoryChanges disallow;
  RestoreMemoryToLastSavedCheckpoint();
}

void RestoreDiffOneCheckpoint() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  AutoDisallowMemoryChanges disallow;
  RestoreMemoryToLastSavedCheckpoint();
  RestoreMemoryToLastSavedDiffCheckpoint();
}

void RestoreDiffWhileDirty() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  gTrackedGlobal = 1;
  TakeDiffMemorySnapshot();
  gTrackedGlobal = 2;
  AutoDisallowMemoryChanges disallow;
  RestoreMemoryToLastSavedDiffCheckpoint();
}

void RestoreLastWhileAllowed() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  RestoreMemoryToLastSavedCheckpoint();
}

void RestoreDiffWhileAllowed() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  gTrackedGlobal = 3;
  TakeDiffMemorySnapshot();
  RestoreMemoryToLastSavedDiffCheckpoint();
}

void EraseOneCheckpoint() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  EraseLastSavedDiffMemorySnapshot();
}

// ---- SetMemoryChangesAllowed alternation ---------------------------------------------

void AllowWhenAllowed() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  SetMemoryChangesAllowed(true);
}

void AllowWhenAllowedBeforeSnapshot() {
  InitializeMemorySnapshots();
  SetMemoryChangesAllowed(true);
}

void DisallowTwice() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  SetMemoryChangesAllowed(false);
  SetMemoryChangesAllowed(false);
}

void NestedAutoDisallow() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  AutoDisallowMemoryChanges outer;
  AutoDisallowMemoryChanges inner;
}

void WriteTrackedWhileDisallowed() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  MS_CHECK(MemoryRangeIsTracked((void*)&gTrackedGlobal, sizeof gTrackedGlobal));
  AutoDisallowMemoryChanges disallow;
  gTrackedGlobal = 42;
}

// Another thread's first write waits while changes are disallowed; a write by the thread
// that disallowed them, made after it, must still be examined and abort. (Under sync
// userfaultfd one fault server serves both: it once waited on behalf of the first writer
// and never read the second fault, so the process hung.)
struct WaitingWriter {
  int go[2];
  uint8_t* target;
};

void* WriteOneByteOnGo(void* arg) {
  WaitingWriter* w = static_cast<WaitingWriter*>(arg);
  char c;
  if (read(w->go[0], &c, 1) == 1) *(volatile uint8_t*)w->target = 1;
  return nullptr;
}

void WriteTrackedWhileAnotherWriterWaits() {
  InitializeMemorySnapshots();
  const size_t page = mstest::SnapshotPage();
  uint8_t* a = (uint8_t*)AllocateMemory(2 * page, MemoryKind::Tracked);
  static WaitingWriter w;  // written before the first snapshot only
  MS_CHECK(pipe(w.go) == 0);
  w.target = a + page;
  pthread_t t;
  MS_CHECK(pthread_create(&t, nullptr, WriteOneByteOnGo, &w) == 0);
  TakeFirstMemorySnapshot();
  AutoDisallowMemoryChanges disallow;
  char c = 1;
  MS_CHECK(write(w.go[1], &c, 1) == 1);
  SleepMs(200);  // the other thread is waiting in its first write by now
  *(volatile uint8_t*)a = 2;
}

void TakeDiffWhileDisallowed() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  AutoDisallowMemoryChanges disallow;
  TakeDiffMemorySnapshot();
}

void TakeFirstWhileDisallowed() {
  InitializeMemorySnapshots();
  SetMemoryChangesAllowed(false);
  TakeFirstMemorySnapshot();
}

// ---- Wrong thread --------------------------------------------------------------------

// A thread created before the first snapshot blocks on a pipe; after the snapshot the
// controller wakes it and it calls `call` (which must abort the process).
void FromOtherThread(void (*call)()) {
  InitializeMemorySnapshots();
  int fds[2];
  MS_CHECK(pipe(fds) == 0);
  std::thread other([fds, call] {
    char c;
    if (read(fds[0], &c, 1) == 1) {
      call();
    }
  });
  TakeFirstMemorySnapshot();
  char c = 1;
  MS_CHECK(write(fds[1], &c, 1) == 1);
  other.join();
}

void TakeDiffFromOtherThread() { FromOtherThread([] { TakeDiffMemorySnapshot(); }); }
void RestoreLastFromOtherThread() { FromOtherThread([] { RestoreMemoryToLastSavedCheckpoint(); }); }
void EraseFromOtherThread() { FromOtherThread([] { EraseLastSavedDiffMemorySnapshot(); }); }

// ---- Initial regions after the first snapshot ----------------------------------------

void AddUntrackedAfterFirst() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  AddInitialUntrackedMemoryRegion(gAlignedBuf, Page());
}

void AddTrackedAfterFirst() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  AddInitialTrackedMemoryRegions(gAlignedBuf, Page(), false);
}

// ---- Invalid MemoryKind --------------------------------------------------------------

void AllocateKind42() {
  InitializeMemorySnapshots();
  AllocateMemory(Page(), (MemoryKind)42);
}

void AllocateKindMinus1() {
  InitializeMemorySnapshots();
  AllocateMemory(Page(), (MemoryKind)-1);
}

void AllocateKindCount() {
  InitializeMemorySnapshots();
  AllocateMemory(Page(), MemoryKind::Count);
}

void DeallocateKind42() {
  InitializeMemorySnapshots();
  void* p = AllocateMemory(Page(), MemoryKind::Generic);
  DeallocateMemory(p, Page(), (MemoryKind)42);
}

void DeallocateKindMinus1NullPointer() {
  InitializeMemorySnapshots();
  // The kind is checked even when the call would otherwise do nothing.
  DeallocateMemory(nullptr, 0, (MemoryKind)-1);
}

void GetMemoryUsageKind42() {
  InitializeMemorySnapshots();
  (void)GetMemoryUsage((MemoryKind)42);
}

void GetMemoryUsageKindMinus1() {
  InitializeMemorySnapshots();
  (void)GetMemoryUsage((MemoryKind)-1);
}

void RegisterKind42() {
  InitializeMemorySnapshots();
  RegisterAllocatedMemory(gAlignedBuf, Page(), (MemoryKind)42);
}

void AllocateTryAddressKindMinus1() {
  InitializeMemorySnapshots();
  AllocateMemoryTryAddress(nullptr, Page(), (MemoryKind)-1);
}

// ---- Sizes ---------------------------------------------------------------------------

void AllocateZeroSize() {
  InitializeMemorySnapshots();
  AllocateMemory(0, MemoryKind::Generic);
}

void AllocateHugeSize() {
  InitializeMemorySnapshots();
  AllocateMemory(SIZE_MAX - 10, MemoryKind::Generic);
}

// ---- MemoryMove / MemoryZero ---------------------------------------------------------

alignas(16) uint32_t gWords[64];

void MoveUnalignedDst() { MemoryMove((char*)gWords + 1, gWords + 32, 16); }
void MoveUnalignedSrc() { MemoryMove(gWords, (char*)(gWords + 32) + 2, 16); }
void MoveUnalignedSize() { MemoryMove(gWords, gWords + 32, 6); }
void MoveOverlapping() { MemoryMove(gWords + 4, gWords, 64); }
void MoveNullDst() { MemoryMove(nullptr, gWords, 8); }
void MoveNullSrc() { MemoryMove(gWords, nullptr, 8); }
void ZeroUnalignedPtr() { MemoryZero((char*)gWords + 2, 8); }
void ZeroUnalignedSize() { MemoryZero(gWords, 7); }
void ZeroNull() { MemoryZero(nullptr, 16); }
void MoveWrappingSource() { MemoryMove(gWords, (void*)(uintptr_t)0xfffffffffffffff0ULL, 32); }
void ZeroWrapping() { MemoryZero((void*)(uintptr_t)0xfffffffffffffff0ULL, 32); }

// ---- Countdown -----------------------------------------------------------------------

void CountdownExpires() {
  InitializeMemorySnapshots();
  InitializeCountdownThread();
  StartCountdown(30);
  SleepMs(1000);
}

void CountdownDisarmed() {
  InitializeMemorySnapshots();
  InitializeCountdownThread();
  StartCountdown(30);
  StartCountdown(0);
  SleepMs(200);
}

void AutoCountdownDisarmsOnExit() {
  InitializeMemorySnapshots();
  InitializeCountdownThread();
  {
    AutoCountdown countdown(30);
    SleepMs(5);
  }
  SleepMs(200);
}

void AutoCountdownExpiresInScope() {
  InitializeMemorySnapshots();
  InitializeCountdownThread();
  AutoCountdown countdown(30);
  SleepMs(1000);
}

void CountdownRearmedKeepsAlive() {
  InitializeMemorySnapshots();
  InitializeCountdownThread();
  InitializeCountdownThread();  // once per process: the second call does nothing
  // Re-arming resets the count: 10 intervals of 150 ms outlast one count of 1000 ms. The
  // margin per interval (850 ms) absorbs a loaded machine's scheduling delays, which a
  // 100 ms count re-armed every 30 ms did not.
  for (int i = 0; i < 10; i++) {
    StartCountdown(1000);
    SleepMs(150);
  }
  StartCountdown(0);
  SleepMs(150);
}

void CountdownWithoutThreadNeverFires() {
  InitializeMemorySnapshots();
  StartCountdown(10);
  SleepMs(200);
}

// ---- Edge cases that must not abort --------------------------------------------------

void DeallocateNullOrZero() {
  InitializeMemorySnapshots();
  DeallocateMemory(nullptr, 0, MemoryKind::Tracked);
  DeallocateMemory(nullptr, 4 * Page(), MemoryKind::Generic);
  void* p = AllocateMemory(Page(), MemoryKind::Generic);
  DeallocateMemory(p, 0, MemoryKind::Generic);
  ((volatile char*)p)[0] = 1;  // still mapped
  TakeFirstMemorySnapshot();
  DeallocateMemory(nullptr, 0, MemoryKind::Tracked);
  DeallocateMemory(nullptr, Page(), MemoryKind::Tracked);
  DeallocateMemory(p, 0, MemoryKind::Generic);
  ((volatile char*)p)[0] = 2;
}

void RangeIsTrackedWrapping() {
  InitializeMemorySnapshots();
  MS_CHECK(!MemoryRangeIsTracked((void*)HighPage(), 2 * Page()));
  MS_CHECK(!MemoryRangeIsTracked((void*)&gTrackedGlobal, SIZE_MAX));
  TakeFirstMemorySnapshot();
  MS_CHECK(MemoryRangeIsTracked((void*)&gTrackedGlobal, sizeof gTrackedGlobal));
  MS_CHECK(!MemoryRangeIsTracked((void*)HighPage(), 2 * Page()));
  MS_CHECK(!MemoryRangeIsTracked((void*)&gTrackedGlobal, SIZE_MAX));
}

void NoOpsBeforeInit() {
  UnrecoverableSnapshotFailure();
  DumpTimers();
  memsnap_timer_record(TimerKind::Default, memsnap_current_time_us());
}

void CheckFixedBeforeFirstSnapshot() {
  InitializeMemorySnapshots();
  // Does nothing before the first snapshot, even for untracked memory.
  void* p = AllocateMemory(Page(), MemoryKind::Generic);
  CheckFixedMemory(p, Page());
  RestoreWritableFixedMemory(p, Page());
}

void HandleFaultByHost() {
  InitializeMemorySnapshots();
  MS_CHECK(!HandleDirtyMemoryFault((uint8_t*)&gTrackedGlobal));  // nothing armed yet
  void* generic = AllocateMemory(Page(), MemoryKind::Generic);
  TakeFirstMemorySnapshot();
  uint8_t onStack = 0;
  MS_CHECK(!HandleDirtyMemoryFault((uint8_t*)generic));
  MS_CHECK(!HandleDirtyMemoryFault(&onStack));
  MS_CHECK(!HandleDirtyMemoryFault((uint8_t*)HighPage()));
  // A tracked address: captured, after which the write does not fault.
  MS_CHECK(HandleDirtyMemoryFault((uint8_t*)&gTrackedGlobal));
  MS_CHECK(HandleDirtyMemoryFault((uint8_t*)&gTrackedGlobal));  // already dirty: still ours
  gTrackedGlobal = 9;
  {
    AutoDisallowMemoryChanges disallow;
    RestoreMemoryToLastSavedCheckpoint();
  }
  MS_CHECK_EQ(gTrackedGlobal, 0);
}

void MoveAndZeroLegal() {
  MemoryMove(nullptr, nullptr, 0);
  MemoryZero(nullptr, 0);
  for (uint32_t i = 0; i < 64; i++) gWords[i] = i;
  // The destination below the source overlaps legally (a forward copy).
  MemoryMove(gWords, gWords + 4, 32);
  for (uint32_t i = 0; i < 8; i++) MS_CHECK_EQ(gWords[i], i + 4);
  MemoryZero(gWords, 16);
  for (uint32_t i = 0; i < 4; i++) MS_CHECK_EQ(gWords[i], 0);
  MS_CHECK_EQ(gWords[4], 8);
}

}  // namespace

// ---- Tests ---------------------------------------------------------------------------

TEST(MisuseDeathTest, CallsBeforeInitialize) {
  MS_DIES_WITH(PreInitTakeFirst(), "^memsnap: TakeFirstMemorySnapshot: called before InitializeMemorySnapshots\n$");
  MS_DIES_WITH(PreInitTakeDiff(), "^memsnap: TakeDiffMemorySnapshot: called before InitializeMemorySnapshots\n$");
  MS_DIES_WITH(PreInitSetAllowed(), "^memsnap: SetMemoryChangesAllowed: called before InitializeMemorySnapshots\n$");
  MS_DIES_WITH(PreInitAllocate(), "^memsnap: AllocateMemory: called before InitializeMemorySnapshots\n$");
  MS_DIES_WITH(PreInitRangeIsTracked(), "^memsnap: MemoryRangeIsTracked: called before InitializeMemorySnapshots\n$");
  MS_DIES_WITH(PreInitRestoreLast(),
               "^memsnap: RestoreMemoryToLastSavedCheckpoint: called before InitializeMemorySnapshots\n$");
  MS_DIES_WITH(PreInitRestoreDiff(),
               "^memsnap: RestoreMemoryToLastSavedDiffCheckpoint: called before InitializeMemorySnapshots\n$");
  MS_DIES_WITH(PreInitErase(), "^memsnap: EraseLastSavedDiffMemorySnapshot: called before InitializeMemorySnapshots\n$");
  MS_DIES_WITH(PreInitCheckFixed(), "^memsnap: CheckFixedMemory: called before InitializeMemorySnapshots\n$");
  MS_DIES_WITH(PreInitStartCountdown(), "^memsnap: StartCountdown: called before InitializeMemorySnapshots\n$");
  MS_DIES_WITH(PreInitGetMemoryUsage(), "^memsnap: GetMemoryUsage: called before InitializeMemorySnapshots\n$");
  MS_DIES_WITH(PreInitHandleFault(), "^memsnap: HandleDirtyMemoryFault: called before InitializeMemorySnapshots\n$");
}

TEST(MisuseDeathTest, InitializeTwice) {
  MS_DIES_WITH(InitTwice(), ONE_LINE("InitializeMemorySnapshots", "called twice"));
}

TEST(MisuseDeathTest, TakeFirstTwice) {
  MS_DIES_WITH(TakeFirstTwice(), ONE_LINE("TakeFirstMemorySnapshot", "a first snapshot was already taken"));
}

TEST(MisuseDeathTest, TakeDiffBeforeFirst) {
  MS_DIES_WITH(TakeDiffBeforeFirst(), ONE_LINE("TakeDiffMemorySnapshot", "no checkpoint has been saved"));
}

TEST(MisuseDeathTest, EraseAndFixupBeforeFirst) {
  MS_DIES_WITH(EraseBeforeFirst(), ONE_LINE("EraseLastSavedDiffMemorySnapshot", "no checkpoint has been saved"));
  MS_DIES_WITH(FixupBeforeFirst(), ONE_LINE("FixupFreeRegionsAfterRewind", "no checkpoint has been saved"));
}

TEST(MisuseDeathTest, UnalignedRanges) {
  MS_DIES_WITH(RegisterUnalignedBase(), ONE_LINE("RegisterAllocatedMemory", "range 0x[0-9a-f]+ \\+ 0x[0-9a-f]+ is not page-aligned"));
  MS_DIES_WITH(RegisterUnalignedSize(), ONE_LINE("RegisterAllocatedMemory", "range 0x[0-9a-f]+ \\+ 0x[0-9a-f]+ is not page-aligned"));
  MS_DIES_WITH(CheckFixedUnaligned(), ONE_LINE("CheckFixedMemory", "range 0x[0-9a-f]+ \\+ 0x[0-9a-f]+ is not page-aligned"));
  MS_DIES_WITH(RestoreWritableFixedUnaligned(),
               ONE_LINE("RestoreWritableFixedMemory", "range 0x[0-9a-f]+ \\+ 0x64 is not page-aligned"));
  MS_DIES_WITH(AllocateTryAddressUnalignedHint(),
               ONE_LINE("AllocateMemoryTryAddress", "address hint 0x7f0000001001 is not page-aligned"));
  MS_DIES_WITH(AddUntrackedUnalignedBase(), ONE_LINE("AddInitialUntrackedMemoryRegion", "base 0x[0-9a-f]+ is not page-aligned"));
}

TEST(MisuseDeathTest, WrappingRanges) {
  MS_DIES_WITH(CheckFixedWraps(), ONE_LINE("CheckFixedMemory", "range 0x[0-9a-f]+ \\+ 0x[0-9a-f]+ wraps around the address space"));
  MS_DIES_WITH(DeallocateWraps(), ONE_LINE("DeallocateMemory", "range 0x[0-9a-f]+ \\+ 0x[0-9a-f]+ wraps around the address space"));
  MS_DIES_WITH(AddTrackedWraps(),
               ONE_LINE("AddInitialTrackedMemoryRegions", "range 0x[0-9a-f]+ \\+ 0x[0-9a-f]+ wraps around the address space"));
  MS_DIES_WITH(AddUntrackedWraps(),
               ONE_LINE("AddInitialUntrackedMemoryRegion", "range 0x[0-9a-f]+ \\+ 0x[0-9a-f]+ wraps around the address space"));
}

TEST(MisuseDeathTest, CheckFixedMemoryOnUntrackedMemory) {
  MS_DIES_WITH(CheckFixedUntracked(), ONE_LINE("CheckFixedMemory", "fixed memory 0x[0-9a-f]+-0x[0-9a-f]+ is not tracked"));
}

TEST(MisuseDeathTest, CheckFixedMemoryOnFreeMemory) {
  MS_DIES_WITH(CheckFixedFree(), ONE_LINE("CheckFixedMemory", "fixed memory 0x[0-9a-f]+-0x[0-9a-f]+ is currently free"));
}

TEST(MisuseDeathTest, RestoreWithNothingSaved) {
  MS_DIES_WITH(RestoreLastNothingSaved(), ONE_LINE("RestoreMemoryToLastSavedCheckpoint", "no checkpoint has been saved"));
}

TEST(MisuseDeathTest, RestoreDiffWithOneCheckpoint) {
  MS_DIES_WITH(RestoreDiffOneCheckpoint(),
               ONE_LINE("RestoreMemoryToLastSavedDiffCheckpoint", "no saved diff: only one checkpoint is saved"));
}

TEST(MisuseDeathTest, RestoreDiffWhileDirty) {
  MS_DIES_WITH(RestoreDiffWhileDirty(),
               ONE_LINE("RestoreMemoryToLastSavedDiffCheckpoint",
                        "pages were written since the newest checkpoint \\(call RestoreMemoryToLastSavedCheckpoint first\\)"));
}

TEST(MisuseDeathTest, RestoreWhileChangesAllowed) {
  MS_DIES_WITH(RestoreLastWhileAllowed(),
               ONE_LINE("RestoreMemoryToLastSavedCheckpoint", "memory changes are allowed \\(restores must run inside AutoDisallowMemoryChanges\\)"));
  MS_DIES_WITH(RestoreDiffWhileAllowed(),
               ONE_LINE("RestoreMemoryToLastSavedDiffCheckpoint", "memory changes are allowed \\(restores must run inside AutoDisallowMemoryChanges\\)"));
}

TEST(MisuseDeathTest, EraseWithOneCheckpoint) {
  MS_DIES_WITH(EraseOneCheckpoint(),
               ONE_LINE("EraseLastSavedDiffMemorySnapshot", "no saved diff: only one checkpoint is saved"));
}

TEST(MisuseDeathTest, SetMemoryChangesAllowedMustAlternate) {
  MS_DIES_WITH(AllowWhenAllowed(), ONE_LINE("SetMemoryChangesAllowed", "memory changes are already allowed"));
  MS_DIES_WITH(AllowWhenAllowedBeforeSnapshot(), ONE_LINE("SetMemoryChangesAllowed", "memory changes are already allowed"));
  MS_DIES_WITH(DisallowTwice(), ONE_LINE("SetMemoryChangesAllowed", "memory changes are already disallowed"));
  MS_DIES_WITH(NestedAutoDisallow(),
               ONE_LINE("SetMemoryChangesAllowed", "memory changes are already disallowed[^\n]*AutoDisallowMemoryChanges cannot nest"));
}

TEST(MisuseDeathTest, DisallowingThreadWritesTrackedMemory) {
  MS_SKIP_UNDER(MemsnapBackend::LinuxUffdAsync,
                "writes never fault, so a write inside AutoDisallowMemoryChanges cannot be seen");
  MS_DIES_WITH(WriteTrackedWhileDisallowed(),
               EXACT_LINE("HandleDirtyMemoryFault",
                        "the thread that disallowed memory changes wrote tracked memory at 0x[0-9a-f]+ "
                        "\\(writes to tracked memory are forbidden inside AutoDisallowMemoryChanges\\)"));
}

TEST(MisuseDeathTest, DisallowingThreadWritesWhileAnotherWriterWaits) {
  MS_SKIP_UNDER(MemsnapBackend::LinuxUffdAsync,
                "writes never fault, so a write inside AutoDisallowMemoryChanges cannot be seen");
  MS_DIES_WITH(WriteTrackedWhileAnotherWriterWaits(),
               EXACT_LINE("HandleDirtyMemoryFault",
                        "the thread that disallowed memory changes wrote tracked memory at 0x[0-9a-f]+ "
                        "\\(writes to tracked memory are forbidden inside AutoDisallowMemoryChanges\\)"));
}

TEST(MisuseDeathTest, SnapshotWhileChangesDisallowed) {
  MS_DIES_WITH(TakeDiffWhileDisallowed(), ONE_LINE("TakeDiffMemorySnapshot", "memory changes are disallowed"));
  MS_DIES_WITH(TakeFirstWhileDisallowed(), ONE_LINE("TakeFirstMemorySnapshot", "memory changes are disallowed"));
}

TEST(MisuseDeathTest, SnapshotFromAnotherThread) {
  MS_DIES_WITH(TakeDiffFromOtherThread(),
               ONE_LINE("TakeDiffMemorySnapshot", "must be called on the thread that took the first snapshot"));
  MS_DIES_WITH(RestoreLastFromOtherThread(),
               ONE_LINE("RestoreMemoryToLastSavedCheckpoint", "must be called on the thread that took the first snapshot"));
  MS_DIES_WITH(EraseFromOtherThread(),
               ONE_LINE("EraseLastSavedDiffMemorySnapshot", "must be called on the thread that took the first snapshot"));
}

TEST(MisuseDeathTest, InitialRegionsAfterFirstSnapshot) {
  MS_DIES_WITH(AddUntrackedAfterFirst(), EXACT_LINE("AddInitialUntrackedMemoryRegion", "called after the first snapshot"));
  MS_DIES_WITH(AddTrackedAfterFirst(), EXACT_LINE("AddInitialTrackedMemoryRegions", "called after the first snapshot"));
}

TEST(MisuseDeathTest, InvalidMemoryKind) {
  MS_DIES_WITH(AllocateKind42(), EXACT_LINE("AllocateMemory", "invalid MemoryKind 42"));
  MS_DIES_WITH(AllocateKindMinus1(), EXACT_LINE("AllocateMemory", "invalid MemoryKind -1"));
  MS_DIES_WITH(AllocateKindCount(), EXACT_LINE("AllocateMemory", "invalid MemoryKind 9"));
  MS_DIES_WITH(DeallocateKind42(), EXACT_LINE("DeallocateMemory", "invalid MemoryKind 42"));
  MS_DIES_WITH(DeallocateKindMinus1NullPointer(), EXACT_LINE("DeallocateMemory", "invalid MemoryKind -1"));
  MS_DIES_WITH(GetMemoryUsageKind42(), EXACT_LINE("GetMemoryUsage", "invalid MemoryKind 42"));
  MS_DIES_WITH(GetMemoryUsageKindMinus1(), EXACT_LINE("GetMemoryUsage", "invalid MemoryKind -1"));
  MS_DIES_WITH(RegisterKind42(), EXACT_LINE("RegisterAllocatedMemory", "invalid MemoryKind 42"));
  MS_DIES_WITH(AllocateTryAddressKindMinus1(), EXACT_LINE("AllocateMemoryTryAddress", "invalid MemoryKind -1"));
}

TEST(MisuseDeathTest, InvalidAllocationSize) {
  MS_DIES_WITH(AllocateZeroSize(), EXACT_LINE("AllocateMemory", "invalid size 0x0"));
  MS_DIES_WITH(AllocateHugeSize(), EXACT_LINE("AllocateMemory", "invalid size 0x[0-9a-f]+"));
}

TEST(MisuseDeathTest, MemoryMoveAndZero) {
  MS_DIES_WITH(MoveUnalignedDst(), ONE_LINE("MemoryMove", "pointers and size must be 4-byte aligned"));
  MS_DIES_WITH(MoveUnalignedSrc(), ONE_LINE("MemoryMove", "pointers and size must be 4-byte aligned"));
  MS_DIES_WITH(MoveUnalignedSize(), EXACT_LINE("MemoryMove", "pointers and size must be 4-byte aligned \\(0x[0-9a-f]+, 0x[0-9a-f]+, 0x6\\)"));
  MS_DIES_WITH(MoveOverlapping(), EXACT_LINE("MemoryMove", "destination 0x[0-9a-f]+ starts inside the source 0x[0-9a-f]+\\+0x40"));
  MS_DIES_WITH(MoveNullDst(), EXACT_LINE("MemoryMove", "null pointer"));
  MS_DIES_WITH(MoveNullSrc(), EXACT_LINE("MemoryMove", "null pointer"));
  MS_DIES_WITH(ZeroUnalignedPtr(), ONE_LINE("MemoryZero", "pointers and size must be 4-byte aligned"));
  MS_DIES_WITH(ZeroUnalignedSize(), ONE_LINE("MemoryZero", "pointers and size must be 4-byte aligned"));
  MS_DIES_WITH(ZeroNull(), EXACT_LINE("MemoryZero", "null pointer"));
  MS_DIES_WITH(MoveWrappingSource(), EXACT_LINE("MemoryMove", "range 0xfffffffffffffff0 \\+ 0x20 wraps around the address space"));
  MS_DIES_WITH(ZeroWrapping(), EXACT_LINE("MemoryZero", "range 0xfffffffffffffff0 \\+ 0x20 wraps around the address space"));
}

TEST(MisuseDeathTest, CountdownExpires) {
  MS_DIES_WITH(CountdownExpires(), ONE_LINE("StartCountdown", "countdown expired"));
  MS_DIES_WITH(AutoCountdownExpiresInScope(), ONE_LINE("StartCountdown", "countdown expired"));
}

TEST(MisuseDeathTest, CountdownDisarmed) {
  EXPECT_EXIT({ CountdownDisarmed(); _exit(0); }, ::testing::ExitedWithCode(0), "^$");
  EXPECT_EXIT({ AutoCountdownDisarmsOnExit(); _exit(0); }, ::testing::ExitedWithCode(0), "^$");
  EXPECT_EXIT({ CountdownRearmedKeepsAlive(); _exit(0); }, ::testing::ExitedWithCode(0), "^$");
  EXPECT_EXIT({ CountdownWithoutThreadNeverFires(); _exit(0); }, ::testing::ExitedWithCode(0), "^$");
}

TEST(MisuseEdgeCases, DeallocateNullOrZeroSizeDoesNothing) { MS_IN_CHILD(DeallocateNullOrZero()); }

TEST(MisuseEdgeCases, MemoryRangeIsTrackedWrappingIsFalse) { MS_IN_CHILD(RangeIsTrackedWrapping()); }

TEST(MisuseEdgeCases, NoOpsBeforeInitialize) {
  // Nothing printed, no abort.
  EXPECT_EXIT({ NoOpsBeforeInit(); _exit(0); }, ::testing::ExitedWithCode(0), "^$");
}

TEST(MisuseEdgeCases, FixedMemoryChecksBeforeFirstSnapshot) { MS_IN_CHILD(CheckFixedBeforeFirstSnapshot()); }

TEST(MisuseEdgeCases, HandleDirtyMemoryFaultCalledByHost) { MS_IN_CHILD(HandleFaultByHost()); }

TEST(MisuseEdgeCases, MemoryMoveAndZeroLegalCalls) { MS_IN_CHILD(MoveAndZeroLegal()); }
