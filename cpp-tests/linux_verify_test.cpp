// The verifying mode (memsnap_set_verify, MEMSNAP_VERIFY=1): it hashes every observable
// page at each checkpoint and checks them after each restore call, independently of what
// memsnap tracks.
//  - it stays quiet through an ordinary multi-level workload (globals, heap, tracked
//    allocations, heap growth and host mmaps after checkpoints, an erased checkpoint) and
//    counts the pages it compared;
//  - it catches a write memsnap cannot see: the bytes of a private file mapping that was
//    never written in the process come from the file's page cache, so writing the file
//    with pwrite(2) changes what the program reads there without any fault, under every
//    backend; the rewind leaves those bytes changed, and verify aborts naming the page,
//    its mapping and that it was tracked.
//  - it compares the controller's thread-local storage although the kernel rewrites the
//    rseq area on the same page;
// Every scenario runs in a forked child.

#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/rseq.h>
#include <sys/syscall.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "test_support.h"

using namespace mozilla::recordreplay;

namespace verify_test {

using mstest::Rewind;
using mstest::Stats;

size_t Kpage() { return (size_t)sysconf(_SC_PAGESIZE); }

alignas(65536) uint8_t gData[4 * 65536];

bool All(const void* p, size_t n, uint8_t v) {
  const volatile uint8_t* b = (const volatile uint8_t*)p;
  for (size_t i = 0; i < n; i++) {
    if (b[i] != v) return false;
  }
  return true;
}

void SettingOnlyBeforeTheFirstSnapshot() {
  MS_CHECK(memsnap_set_verify(true) == MemsnapStatus::NotInitialized);
  InitializeMemorySnapshots();
  MS_CHECK(memsnap_set_verify(false) == MemsnapStatus::Ok);
  MS_CHECK(memsnap_set_verify(true) == MemsnapStatus::Ok);
  TakeFirstMemorySnapshot();
  MS_CHECK(memsnap_set_verify(false) == MemsnapStatus::AlreadyStarted);
  gData[0] = 9;
  Rewind(0);
  MS_CHECK_EQ(gData[0], 0);
  MS_CHECK(Stats().verify_pages_checked > 0);
}

TEST(VerifyTest, SettingOnlyBeforeTheFirstSnapshot) {
  MS_IN_CHILD(SettingOnlyBeforeTheFirstSnapshot());
}

void OffChecksNothing() {
  InitializeMemorySnapshots();
  MS_CHECK(memsnap_set_verify(false) == MemsnapStatus::Ok);
  TakeFirstMemorySnapshot();
  gData[0] = 9;
  Rewind(0);
  MS_CHECK_EQ(gData[0], 0);
  MS_CHECK_EQ(Stats().verify_pages_checked, 0);
}

TEST(VerifyTest, OffChecksNothing) { MS_IN_CHILD(OffChecksNothing()); }

// Checkpoints 0..3 with globals, a malloc block, a tracked allocation, heap growth and a
// host mapping obtained after checkpoints, an erased checkpoint, and rewinds of every
// depth; the values are checked by hand and every restore call by verify.
void Workload() {
  InitializeMemorySnapshots();
  MS_CHECK(memsnap_set_verify(true) == MemsnapStatus::Ok);
  const size_t g = mstest::Granule();
  uint8_t* heap = (uint8_t*)malloc(3 * g);
  uint8_t* tracked = (uint8_t*)AllocateMemory(2 * g, MemoryKind::Tracked);
  memset(heap, 1, 3 * g);
  memset(tracked, 1, 2 * g);
  memset(gData, 1, 2 * g);
  TakeFirstMemorySnapshot();  // checkpoint 0: everything 1

  memset(heap, 2, g);
  memset(gData, 2, g);
  uint8_t* later = (uint8_t*)AllocateMemory(g, MemoryKind::Tracked);
  memset(later, 2, g);
  TakeDiffMemorySnapshot();  // checkpoint 1

  memset(tracked, 3, g);
  // Heap growth and a host mapping, both obtained after checkpoint 1: a rewind to it or
  // earlier gives them back zeroed, which verify checks too.
  uint8_t* grown = (uint8_t*)malloc(1 << 20);
  memset(grown, 3, 1 << 20);
  uint8_t* mapped = (uint8_t*)mmap(nullptr, 4 * Kpage(), PROT_READ | PROT_WRITE,
                                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  MS_CHECK(mapped != MAP_FAILED);
  memset(mapped, 3, 4 * Kpage());
  TakeDiffMemorySnapshot();  // checkpoint 2

  memset(gData + g, 4, g);
  DeallocateMemory(later, g, MemoryKind::Tracked);
  TakeDiffMemorySnapshot();  // checkpoint 3

  uint64_t checked = Stats().verify_pages_checked;
  MS_CHECK_EQ(checked, 0);
  memset(heap, 5, 3 * g);
  Rewind(0);  // checkpoint 3
  MS_CHECK(All(heap, g, 2) && All(heap + g, 2 * g, 1));
  MS_CHECK(All(gData + g, g, 4));
  uint64_t now = Stats().verify_pages_checked;
  MS_CHECK(now > checked);
  checked = now;

  // Forget checkpoint 2: its hashes go, the others stay and still match.
  EraseLastSavedDiffMemorySnapshot();
  MS_CHECK_EQ(Stats().saved_checkpoints, 3);
  memset(tracked, 6, 2 * g);
  Rewind(1);  // checkpoint 1, across the erased one
  MS_CHECK(All(tracked, 2 * g, 1));
  MS_CHECK(All(gData, g, 2) && All(gData + g, g, 1));
  MS_CHECK(All(later, g, 2));
  now = Stats().verify_pages_checked;
  MS_CHECK(now > checked);
  checked = now;

  memset(gData, 7, 2 * g);
  Rewind(1);  // checkpoint 0
  MS_CHECK(All(gData, 2 * g, 1));
  MS_CHECK(All(heap, 3 * g, 1));
  MS_CHECK_EQ(Stats().saved_checkpoints, 1);
  MS_CHECK(Stats().verify_pages_checked > checked);
}

TEST(VerifyTest, MultiLevelRewindsPass) { MS_IN_CHILD(Workload()); }

// The controller's thread-local storage shares a kernel page with its rseq area, which the
// kernel rewrites when the thread moves to another CPU. memsnap copies that page eagerly
// and restores it but for the kernel's bytes; verify compares it the same way. Without
// the masking, the migration between the checkpoint and the rewind would be reported.
__thread long tTls[16];

void ThreadLocalStorageBesideRseq() {
  InitializeMemorySnapshots();
  MS_CHECK(memsnap_set_verify(true) == MemsnapStatus::Ok);
  volatile struct rseq* area =
      (volatile struct rseq*)((char*)__builtin_thread_pointer() + __rseq_offset);
  cpu_set_t original;
  MS_CHECK(sched_getaffinity(0, sizeof original, &original) == 0);
  int cpus[2] = {-1, -1};
  for (int c = 0, k = 0; c < CPU_SETSIZE && k < 2; c++) {
    if (CPU_ISSET(c, &original)) cpus[k++] = c;
  }
  MS_CHECK(cpus[1] >= 0);  // the TEST skips on one CPU
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(cpus[0], &one);
  MS_CHECK(sched_setaffinity(0, sizeof one, &one) == 0);
  sched_yield();
  MS_CHECK_EQ((int)area->cpu_id, cpus[0]);
  tTls[3] = 1;
  TakeFirstMemorySnapshot();
  MS_CHECK(Stats().eager_pages > 0);
  CPU_ZERO(&one);
  CPU_SET(cpus[1], &one);
  MS_CHECK(sched_setaffinity(0, sizeof one, &one) == 0);
  sched_yield();
  MS_CHECK_EQ((int)area->cpu_id, cpus[1]);
  tTls[3] = 2;
  Rewind(0);
  MS_CHECK_EQ(tTls[3], 1);
  MS_CHECK_EQ((int)area->cpu_id, cpus[1]);  // the kernel's bytes are not rewound
  MS_CHECK(Stats().verify_pages_checked > 0);
}

TEST(VerifyTest, ThreadLocalStorageBesideRseqIsComparedWithoutTheKernelsBytes) {
  cpu_set_t set;
  ASSERT_EQ(sched_getaffinity(0, sizeof set, &set), 0);
  if (__rseq_size == 0) GTEST_SKIP() << "glibc registered no rseq area";
  if (CPU_COUNT(&set) < 2) GTEST_SKIP() << "one CPU: the rseq area cannot be made to change";
  MS_IN_CHILD(ThreadLocalStorageBesideRseq());
}

// ---------------------------------------------------------------------------------------
// A write memsnap cannot see.

struct Alias {
  int fd;
  uint8_t* base;  // MAP_PRIVATE of the file, snapshot-page aligned
  size_t len;
};

// A private, writable mapping of a memfd of four snapshot pages of 'a', made in the test
// runner before the death test forks, so the expected message can name its address.
Alias MakeAlias() {
  const size_t g = mstest::Granule();
  Alias a;
  a.len = 4 * g;
  a.fd = (int)syscall(SYS_memfd_create, "memsnap-verify", 0);
  EXPECT_GE(a.fd, 0);
  std::string fill(a.len, 'a');
  EXPECT_EQ(pwrite(a.fd, fill.data(), a.len, 0), (ssize_t)a.len);
  void* at = mstest::MapSnapshotPages(a.len);
  EXPECT_NE(at, MAP_FAILED);
  a.base = (uint8_t*)mmap(at, a.len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, a.fd, 0);
  EXPECT_EQ((void*)a.base, at);
  return a;
}

void DropAlias(const Alias& a) {
  munmap(a.base, a.len);
  close(a.fd);
}

// (The mapping reads r--p where mprotect guards it, rw-p under userfaultfd.)
// The kernel page that the scenarios change behind memsnap's back: the first of the
// second snapshot page.
size_t Victim() { return mstest::Granule(); }

// `levels`: 0 changes the file after the first snapshot and rewinds to it; 1 changes it,
// takes a diff snapshot (which records the change) and rewinds two levels, so
// RestoreMemoryToLastSavedCheckpoint passes and the diff restore is the one that fails.
void ChangeBehindMemsnapsBack(Alias a, int levels) {
  InitializeMemorySnapshots();
  MS_CHECK(memsnap_set_verify(true) == MemsnapStatus::Ok);
  // Read, never write: the pages stay the page cache's.
  MS_CHECK(All(a.base, a.len, 'a'));
  TakeFirstMemorySnapshot();
  char b = 'b';
  MS_CHECK(pwrite(a.fd, &b, 1, (off_t)Victim()) == 1);
  MS_CHECK_EQ(a.base[Victim()], 'b');  // the program sees it; memsnap saw no write
  if (levels > 0) TakeDiffMemorySnapshot();
  Rewind(levels);
  ::mstest::ms_say("verify did not notice\n");
}

std::string Expected(const Alias& a, const char* function) {
  char buf[512];
  uintptr_t v = (uintptr_t)a.base + Victim();
  snprintf(buf, sizeof buf,
           "^memsnap: %s: verify: 0x%lx-0x%lx \\(1 of 1 mismatching pages\\) differs from "
           "checkpoint 1; mapping 0x%lx-0x%lx r[-w]-p file; tracked \\(region "
           "0x[0-9a-f]+-0x[0-9a-f]+, (mprotect|userfaultfd)\\)\n$",
           function, (unsigned long)v, (unsigned long)(v + Kpage()), (unsigned long)(uintptr_t)a.base,
           (unsigned long)((uintptr_t)a.base + a.len));
  return buf;
}

TEST(VerifyDeathTest, CatchesAWriteMemsnapCannotSee) {
  Alias a = MakeAlias();
  MS_DIES_WITH(ChangeBehindMemsnapsBack(a, 0), Expected(a, "RestoreMemoryToLastSavedCheckpoint"));
  DropAlias(a);
}

TEST(VerifyDeathTest, CatchesItAtTheDiffRestore) {
  Alias a = MakeAlias();
  MS_DIES_WITH(ChangeBehindMemsnapsBack(a, 1),
               Expected(a, "RestoreMemoryToLastSavedDiffCheckpoint"));
  DropAlias(a);
}

// The same change without verify: the rewind completes and the program reads the changed
// byte, which is the silent loss the mode exists to catch.
void UnnoticedWithoutVerify(Alias a) {
  InitializeMemorySnapshots();
  MS_CHECK(memsnap_set_verify(false) == MemsnapStatus::Ok);
  MS_CHECK(All(a.base, a.len, 'a'));
  TakeFirstMemorySnapshot();
  char b = 'b';
  MS_CHECK(pwrite(a.fd, &b, 1, (off_t)Victim()) == 1);
  Rewind(0);
  MS_CHECK_EQ(a.base[Victim()], 'b');
}

TEST(VerifyTest, TheSameChangeGoesUnnoticedWithoutIt) {
  Alias a = MakeAlias();
  MS_IN_CHILD(UnnoticedWithoutVerify(a));
  DropAlias(a);
}

void BadEnvironment() {
  setenv("MEMSNAP_VERIFY", "yes", 1);
  InitializeMemorySnapshots();
}

TEST(VerifyDeathTest, EnvironmentValueIsChecked) {
  MS_DIES_WITH(BadEnvironment(),
               "^memsnap: InitializeMemorySnapshots: MEMSNAP_VERIFY: expected 1 or 0\n$");
}

}  // namespace verify_test
