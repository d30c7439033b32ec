// Issue 11 (suite HostMemoryTest): memory an ordinary host has that no earlier test was
// written for, each of which a rewind once lost silently under every backend:
//  - thread-local storage, of the controller and of a worker idle at checkpoints;
//  - a tracked allocation placed right beside thread stacks (the kernel merges the
//    mappings, and memsnap used to leave out "the mapping around a stack pointer");
//  - memory committed read-write inside a PROT_NONE reservation (memsnap used to take
//    "read-write right above an inaccessible mapping" for a cached thread stack).
// Each scenario writes, rewinds, and compares every byte with what it was.

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "test_support.h"

using namespace mozilla::recordreplay;

namespace host_memory_test {

constexpr int kTlsWords = 64;
__thread long tTls[kTlsWords];

bool AllEqual(const long* p, int n, long v) {
  for (int i = 0; i < n; i++)
    if (p[i] != v) return false;
  return true;
}

// The controller's own thread-local storage, one and two levels back.
void ControllerTlsScenario() {
  InitializeMemorySnapshots();
  for (int i = 0; i < kTlsWords; i++) tTls[i] = 1;
  TakeFirstMemorySnapshot();
  for (int i = 0; i < kTlsWords; i++) tTls[i] = 2;
  TakeDiffMemorySnapshot();
  for (int i = 0; i < kTlsWords; i++) tTls[i] = 3;
  mstest::Rewind(0);
  MS_CHECK(AllEqual(tTls, kTlsWords, 2));
  for (int i = 0; i < kTlsWords; i++) tTls[i] = 4;
  mstest::Rewind(1);
  MS_CHECK(AllEqual(tTls, kTlsWords, 1));
}

TEST(HostMemoryTest, ControllerThreadLocalStorageIsRewound) {
  MS_IN_CHILD(ControllerTlsScenario());
}

// A worker's thread-local storage: the worker blocks in read() on a pipe between
// commands, so it is idle at every checkpoint and rewind.
struct Worker {
  int cmd[2];
  int reply[2];
};

void* WorkerMain(void* arg) {
  Worker* w = static_cast<Worker*>(arg);
  long c;
  while (read(w->cmd[0], &c, sizeof c) == (ssize_t)sizeof c) {
    long answer = 0;
    if (c > 0) {
      for (int i = 0; i < kTlsWords; i++) tTls[i] = c;
    } else if (c == 0) {
      answer = AllEqual(tTls, kTlsWords, tTls[0]) ? tTls[0] : -1;
    } else {
      break;
    }
    if (write(w->reply[1], &answer, sizeof answer) != (ssize_t)sizeof answer) break;
  }
  return nullptr;
}

long Ask(Worker* w, long c) {
  long answer = -2;
  MS_CHECK(write(w->cmd[1], &c, sizeof c) == (ssize_t)sizeof c);
  MS_CHECK(read(w->reply[0], &answer, sizeof answer) == (ssize_t)sizeof answer);
  return answer;
}

void WorkerTlsScenario() {
  InitializeMemorySnapshots();
  Worker* w = static_cast<Worker*>(AllocateMemory(sizeof(Worker), MemoryKind::Generic));
  MS_CHECK(pipe(w->cmd) == 0 && pipe(w->reply) == 0);
  pthread_t t;
  MS_CHECK(pthread_create(&t, nullptr, WorkerMain, w) == 0);
  MS_CHECK_EQ(Ask(w, 1), 0);
  TakeFirstMemorySnapshot();
  MS_CHECK_EQ(Ask(w, 2), 0);
  TakeDiffMemorySnapshot();
  MS_CHECK_EQ(Ask(w, 3), 0);
  MS_CHECK_EQ(Ask(w, 0), 3);
  mstest::Rewind(0);
  MS_CHECK_EQ(Ask(w, 0), 2);
  mstest::Rewind(1);
  MS_CHECK_EQ(Ask(w, 0), 1);
  long stop = -1;
  MS_CHECK(write(w->cmd[1], &stop, sizeof stop) == (ssize_t)sizeof stop);
  MS_CHECK(pthread_join(t, nullptr) == 0);
}

TEST(HostMemoryTest, IdleWorkerThreadLocalStorageIsRewound) {
  MS_IN_CHILD(WorkerTlsScenario());
}

void* Park(void*) {
  pause();
  return nullptr;
}

void CheckRewound(uint8_t* p, size_t len) {
  memset(p, 1, len);
  TakeFirstMemorySnapshot();
  MS_CHECK(MemoryRangeIsTracked(p, len));
  memset(p, 2, len);
  mstest::Rewind(0);
  for (size_t i = 0; i < len; i++) {
    if (p[i] != 1) {
      mstest::ms_say("byte %zu of %p is %d after the rewind\n", i, (void*)p, p[i]);
      MS_CHECK(p[i] == 1);
    }
  }
}

// Tracked memory with untracked blocks right below and above it in the same mapping, each
// the stack of a thread (pthread_attr_setstack on memory declared untracked, as the README
// asks hosts to place stacks): one kernel mapping holds all three.
void BesideUserStacksScenario() {
  InitializeMemorySnapshots();
  const size_t kMiB = 1 << 20;
  uint8_t* all = static_cast<uint8_t*>(
      mmap(nullptr, 3 * kMiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  MS_CHECK(all != MAP_FAILED);
  uint8_t* tracked = all + kMiB;
  RegisterAllocatedMemory(all, kMiB, MemoryKind::Generic);
  RegisterAllocatedMemory(tracked, kMiB, MemoryKind::Tracked);
  RegisterAllocatedMemory(all + 2 * kMiB, kMiB, MemoryKind::Generic);
  for (uint8_t* stack : {all, all + 2 * kMiB}) {
    pthread_attr_t a;
    pthread_attr_init(&a);
    MS_CHECK(pthread_attr_setstack(&a, stack, kMiB) == 0);
    pthread_t t;
    MS_CHECK(pthread_create(&t, &a, Park, nullptr) == 0);
    pthread_attr_destroy(&a);
  }
  usleep(20000);
  CheckRewound(tracked, kMiB);
}

TEST(HostMemoryTest, TrackedMemoryBesideUserStacksIsRewound) {
  MS_IN_CHILD(BesideUserStacksScenario());
}

#if defined(__linux__)  // glibc's stacks and pthread_getattr_np
// Host memory mapped right above a glibc-mapped thread stack, whose top holds the
// thread's TLS and descriptor: the kernel merges the two mappings into one. The host maps
// `len + stack` bytes and unmaps the lower `stack`, so that the next thread stack of that
// size lands in the hole (the kernel's top-down placement); a try that lands elsewhere is
// undone and repeated with another size (glibc would reuse the cached stack otherwise).
void* WaitOnPipe(void* arg) {
  char c;
  ssize_t got = read(*static_cast<int*>(arg), &c, 1);
  (void)got;
  return nullptr;
}

void AboveGlibcStackScenario() {
  InitializeMemorySnapshots();
  const size_t kpage = (size_t)sysconf(_SC_PAGESIZE);
  const size_t len = 256 << 10;
  static int stop[2];
  MS_CHECK(pipe(stop) == 0);
  for (int attempt = 0; attempt < 16; attempt++) {
    // Under 2 MiB: glibc reuses a cached stack up to four times the size asked, and the
    // 8 MiB default stacks of earlier threads sit on its cache.
    size_t stack = (1 << 20) + attempt * 4 * kpage;
    size_t hole = stack + kpage;  // glibc adds a guard page below the stack size asked
    uint8_t* all = static_cast<uint8_t*>(
        mmap(nullptr, hole + len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    MS_CHECK(all != MAP_FAILED);
    MS_CHECK(munmap(all, hole) == 0);
    pthread_attr_t a;
    pthread_attr_init(&a);
    MS_CHECK(pthread_attr_setstacksize(&a, stack) == 0);
    pthread_t t;
    MS_CHECK(pthread_create(&t, &a, WaitOnPipe, &stop[0]) == 0);
    pthread_attr_destroy(&a);
    MS_CHECK(pthread_getattr_np(t, &a) == 0);
    void* addr;
    size_t size;
    MS_CHECK(pthread_attr_getstack(&a, &addr, &size) == 0);
    pthread_attr_destroy(&a);
    if (static_cast<uint8_t*>(addr) + size == all + hole) {
      usleep(20000);
      CheckRewound(all + hole, len);
      return;
    }
    MS_CHECK(write(stop[1], "x", 1) == 1);
    MS_CHECK(pthread_join(t, nullptr) == 0);
    MS_CHECK(munmap(all + hole, len) == 0);
  }
  mstest::ms_say("no thread stack landed below the host's mapping in 16 tries\n");
  MS_CHECK(false);
}

TEST(HostMemoryTest, MemoryMergedAboveGlibcStackIsRewound) {
  MS_IN_CHILD(AboveGlibcStackScenario());
}
#endif  // __linux__

// A PROT_NONE reservation whose upper half is committed read-write before the first
// snapshot, and another piece committed between checkpoints.
void ReservationScenario() {
  InitializeMemorySnapshots();
  const size_t page = mstest::SnapshotPage();
  const size_t n = 64 * page;
  uint8_t* r = static_cast<uint8_t*>(
      mmap(nullptr, 2 * n, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  MS_CHECK(r != MAP_FAILED);
  uint8_t* upper = r + n;
  MS_CHECK(mprotect(upper, n, PROT_READ | PROT_WRITE) == 0);
  memset(upper, 1, n);
  TakeFirstMemorySnapshot();
  memset(upper, 2, n);
  // Commit a piece of the lower half while running.
  uint8_t* piece = r + n / 2;
  MS_CHECK(mprotect(piece, n / 2, PROT_READ | PROT_WRITE) == 0);
  memset(piece, 5, n / 2);
  TakeDiffMemorySnapshot();
  memset(piece, 6, n / 2);
  memset(upper, 3, n);
  mstest::Rewind(0);
  for (size_t i = 0; i < n; i++) MS_CHECK_EQ(upper[i], 2);
  for (size_t i = 0; i < n / 2; i++) MS_CHECK_EQ(piece[i], 5);
  mstest::Rewind(1);
  for (size_t i = 0; i < n; i++) MS_CHECK_EQ(upper[i], 1);
}

TEST(HostMemoryTest, ReservationCommittedPiecewiseIsRewound) {
  MS_IN_CHILD(ReservationScenario());
}

}  // namespace host_memory_test

namespace host_memory_test {

// The exclusions are visible: the stats count them, and DumpTimers lists each with its
// reason (here the controller's tid word, which makes its descriptor page eager).
void ReportScenario() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  MemsnapStats s = mstest::Stats();
  MS_CHECK(s.excluded_bytes > 0);
  MS_CHECK(s.eager_pages > 0);
#if defined(__linux__) && defined(__GLIBC__)
  MS_CHECK(s.thread_descriptors);
#endif
  DumpTimers();
}

TEST(HostMemoryTest, ExclusionsAreReportedWithReasons) {
  EXPECT_EXIT({ mstest::Alarm(60); ReportScenario(); _exit(0); }, ::testing::ExitedWithCode(0),
              "excluded 0x[0-9a-f]+-0x[0-9a-f]+ \\([0-9]+ bytes\\): a thread's tid word");
}

}  // namespace host_memory_test

namespace host_memory_test {

// A host with large thread-local arrays (400 KiB here, more than the 256 KiB stacks memsnap used to map for its own threads) whose worker exits between
// checkpoints: memsnap's own threads need room for that TLS on the stacks it maps, and
// the exited thread's stack, with its tracked TLS, goes back on glibc's cache, where the
// next thread runs on it. Checkpoints and rewinds after the exit keep working.
__thread long tBig[50000];

void* TouchBig(void*) {
  for (int i = 0; i < 50000; i += 512) tBig[i] = i;
  return nullptr;
}

void BigTlsExitScenario() {
  InitializeMemorySnapshots();
  tBig[0] = 1;
  pthread_t t;
  MS_CHECK(pthread_create(&t, nullptr, TouchBig, nullptr) == 0);
  MS_CHECK(pthread_join(t, nullptr) == 0);
  MS_CHECK(pthread_create(&t, nullptr, TouchBig, nullptr) == 0);
  usleep(10000);
  TakeFirstMemorySnapshot();
  MS_CHECK(pthread_join(t, nullptr) == 0);
  TakeDiffMemorySnapshot();
  MS_CHECK(pthread_create(&t, nullptr, TouchBig, nullptr) == 0);
  MS_CHECK(pthread_join(t, nullptr) == 0);
  TakeDiffMemorySnapshot();
  tBig[0] = 7;
  mstest::Rewind(0);
  MS_CHECK_EQ(tBig[0], 1);
}

TEST(HostMemoryTest, ThreadWithLargeTlsExitsBetweenCheckpoints) {
  MS_IN_CHILD(BigTlsExitScenario());
}

}  // namespace host_memory_test

namespace host_memory_test {

// Anonymous memory that is read-only at a checkpoint and made writable afterwards (a JIT
// flipping code to data, an allocator recommitting) gets its bytes back at a rewind, and
// its read-only protection with them. memsnap once tracked only what was writable at a
// scan, so the memory counted as obtained after the checkpoint and a rewind zeroed it,
// under every backend (found by MEMSNAP_VERIFY=1).
#ifdef __linux__
// The permissions /proc/self/maps shows for the mapping holding `p` ("" if none).
std::string MapsPerms(const void* p) {
  FILE* f = fopen("/proc/self/maps", "r");
  if (!f) return "";
  char line[512];
  std::string found;
  uintptr_t a = reinterpret_cast<uintptr_t>(p);
  while (fgets(line, sizeof line, f)) {
    unsigned long lo, hi;
    char perms[5] = {};
    if (sscanf(line, "%lx-%lx %4s", &lo, &hi, perms) == 3 && lo <= a && a < hi) {
      found = perms;
      break;
    }
  }
  fclose(f);
  return found;
}
#endif

void ReadOnlyThenWritableScenario() {
  InitializeMemorySnapshots();
  const size_t len = 4 * mstest::SnapshotPage();
  uint8_t* p = static_cast<uint8_t*>(mstest::MapSnapshotPages(len));
  MS_CHECK(p != MAP_FAILED);
  memset(p, 9, len);
  MS_CHECK(mprotect(p, len, PROT_READ) == 0);
  TakeFirstMemorySnapshot();
  MS_CHECK(mprotect(p, len, PROT_READ | PROT_WRITE) == 0);
  memset(p, 1, len);
  TakeDiffMemorySnapshot();
  memset(p, 2, len);
  mstest::Rewind(0);
  for (size_t i = 0; i < len; i++) MS_CHECK_EQ(p[i], 1);
  mstest::Rewind(1);
  for (size_t i = 0; i < len; i++) MS_CHECK_EQ(p[i], 9);
  // Read-only again, as it was at the first snapshot: a write now is the host's own
  // fault, which memsnap must not absorb.
#ifdef __linux__
  MS_CHECK(MapsPerms(p) == std::string("r--p"));
#endif
}

TEST(HostMemoryTest, ReadOnlyThenWritableIsRewound) {
  MS_IN_CHILD(ReadOnlyThenWritableScenario());
}

// Read-only memory mapped between two checkpoints and made writable after the second:
// rewound to the second it holds its read-only bytes, to the first it was not there yet
// (zero, as any memory obtained since).
void ReadOnlyMappedBetweenCheckpointsScenario() {
  InitializeMemorySnapshots();
  // Aligned address space, inaccessible (so not tracked) at the first snapshot.
  const size_t len = 2 * mstest::SnapshotPage();
  uint8_t* p = static_cast<uint8_t*>(mstest::MapSnapshotPages(len));
  MS_CHECK(p != MAP_FAILED);
  MS_CHECK(mprotect(p, len, PROT_NONE) == 0);
  TakeFirstMemorySnapshot();
  MS_CHECK(mmap(p, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
                0) == p);
  memset(p, 7, len);
  MS_CHECK(mprotect(p, len, PROT_READ) == 0);
  TakeDiffMemorySnapshot();
  MS_CHECK(mprotect(p, len, PROT_READ | PROT_WRITE) == 0);
  memset(p, 1, len);
  mstest::Rewind(0);
  for (size_t i = 0; i < len; i++) MS_CHECK_EQ(p[i], 7);
  MS_CHECK(mprotect(p, len, PROT_READ | PROT_WRITE) == 0);
  memset(p, 2, len);
  mstest::Rewind(1);
  for (size_t i = 0; i < len; i++) MS_CHECK_EQ(p[i], 0);
}

TEST(HostMemoryTest, ReadOnlyMappedBetweenCheckpointsIsRewound) {
  MS_IN_CHILD(ReadOnlyMappedBetweenCheckpointsScenario());
}

// Read-only memory replaced (MAP_FIXED), re-protected, written and unmapped after a
// checkpoint: each call changes memory that held bytes at the checkpoint, so each is
// made rewindable like one on tracked memory, and a rewind brings back the read-only
// bytes and protection. Before, the replaced bytes were lost (MEMSNAP_VERIFY=1 named
// them).
void ReadOnlyReplacedScenario() {
  InitializeMemorySnapshots();
  const size_t len = 2 * mstest::SnapshotPage();
  uint8_t* p = static_cast<uint8_t*>(mstest::MapSnapshotPages(len));
  uint8_t* q = static_cast<uint8_t*>(mstest::MapSnapshotPages(len));
  MS_CHECK(p != MAP_FAILED && q != MAP_FAILED);
  memset(p, 9, len);
  memset(q, 8, len);
  MS_CHECK(mprotect(p, len, PROT_READ) == 0);
  MS_CHECK(mprotect(q, len, PROT_READ) == 0);
  TakeFirstMemorySnapshot();
  MS_CHECK(mmap(p, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
                0) == p);
  memset(p, 5, len);
  MS_CHECK(mprotect(p, len, PROT_READ) == 0);
  MS_CHECK(mprotect(p, len, PROT_READ | PROT_WRITE) == 0);
  memset(p, 1, len);
  MS_CHECK(munmap(q, len) == 0);
  TakeDiffMemorySnapshot();
  mstest::Rewind(1);
  for (size_t i = 0; i < len; i++) MS_CHECK_EQ(p[i], 9);
  for (size_t i = 0; i < len; i++) MS_CHECK_EQ(q[i], 8);
#ifdef __linux__
  MS_CHECK(MapsPerms(p) == std::string("r--p"));
  MS_CHECK(MapsPerms(q) == std::string("r--p"));
#endif
}

TEST(HostMemoryTest, ReadOnlyReplacedOrUnmappedIsRewound) {
  MS_IN_CHILD(ReadOnlyReplacedScenario());
}

}  // namespace host_memory_test
