// Issue 12 (suite HostCallsTest): the host's own memory calls on tracked memory, seen by
// libmemsnap's interposed madvise, munmap, mprotect and mremap before they take effect,
// and rewound. Each scenario runs in a forked child under every backend and at 16 KiB
// snapshot pages (ranges are whole snapshot pages). Readability is probed with write(2)
// from the address into a pipe (EFAULT when the page is inaccessible), which needs no
// signal handler; a write the host's protection forbids runs in a grandchild.

#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstring>

#include "test_support.h"

using namespace mozilla::recordreplay;

namespace host_calls_test {

using mstest::Rewind;

size_t Page() { return mstest::SnapshotPage(); }

bool Readable(const void* p) {
  int fds[2];
  if (pipe(fds) != 0) return false;
  ssize_t n = write(fds[1], p, 1);
  close(fds[0]);
  close(fds[1]);
  return n == 1;
}

void Fill(uint8_t* p, size_t n, uint8_t v) { memset(p, v, n); }

bool Holds(const uint8_t* p, size_t n, uint8_t v) {
  for (size_t i = 0; i < n; i++) {
    if (p[i] != v) return false;
  }
  return true;
}

uint8_t* Map(size_t pages, uint8_t v) {
  uint8_t* p = (uint8_t*)mstest::MapSnapshotPages(pages * Page());
  MS_CHECK(p != MAP_FAILED);
  Fill(p, pages * Page(), v);
  return p;
}

// madvise zaps pages that are clean since the newest checkpoint (no write fault under
// mprotect or sync uffd, and no "written" bit under uffd-async): a rewind must give
// back their bytes at that checkpoint (levels 1) and at the one before (levels 2).
void MadviseScenario(int advice, int levels) {
  const size_t n = 4 * Page();
  uint8_t* p = Map(4, 1);
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();  // 0: ones
  Fill(p, n, 2);
  TakeDiffMemorySnapshot();  // 1: twos
  MS_CHECK(madvise(p, n, advice) == 0);
  // Only the page written next is read: under uffd-async, reading a zapped page maps the
  // zero page, which the next checkpoint's scan would report as written.
  if (advice == MADV_DONTNEED) MS_CHECK(Holds(p, Page(), 0));
  p[0] = 7;  // an allocator reusing a purged page
  MS_CHECK_EQ(p[0], 7);
  TakeDiffMemorySnapshot();  // 2
  Rewind(levels);
  MS_CHECK(Holds(p, n, levels == 1 ? 2 : 1));
  // Still tracked: a write after the rewind is undone by the next one.
  TakeDiffMemorySnapshot();
  p[Page()] = 9;
  Rewind(0);
  MS_CHECK(Holds(p, n, levels == 1 ? 2 : 1));
}

TEST(HostCallsTest, MadviseDontneedRewoundOneLevel) { MS_IN_CHILD(MadviseScenario(MADV_DONTNEED, 1)); }
TEST(HostCallsTest, MadviseDontneedRewoundTwoLevels) { MS_IN_CHILD(MadviseScenario(MADV_DONTNEED, 2)); }
TEST(HostCallsTest, MadviseFreeRewoundOneLevel) { MS_IN_CHILD(MadviseScenario(MADV_FREE, 1)); }
TEST(HostCallsTest, MadviseFreeRewoundTwoLevels) { MS_IN_CHILD(MadviseScenario(MADV_FREE, 2)); }

// munmap of tracked memory: inaccessible to the program from then on, rewound to before
// the unmap mapped again with its bytes, writable and tracked.
void MunmapScenario() {
  const size_t n = 4 * Page();
  uint8_t* p = Map(4, 1);
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();  // 0: ones
  Fill(p, n, 2);
  TakeDiffMemorySnapshot();  // 1: twos
  p[Page()] = 3;             // dirty when unmapped
  MS_CHECK(munmap(p, n) == 0);
  MS_CHECK(!Readable(p));
  MS_CHECK(!Readable(p + n - 1));
  // Unmapped memory refuses what unmapped memory refuses.
  errno = 0;
  MS_CHECK_EQ(mprotect(p, Page(), PROT_READ), -1);
  MS_CHECK_EQ(errno, ENOMEM);
  MS_CHECK_EQ(munmap(p, n), 0);
  TakeDiffMemorySnapshot();  // 2: unmapped
  Rewind(0);                 // to 2: still unmapped
  MS_CHECK(!Readable(p));
  Rewind(1);  // to 1: back, with its bytes
  MS_CHECK(Readable(p) && Readable(p + n - 1));
  MS_CHECK(Holds(p, n, 2));
  MS_CHECK(MemoryRangeIsTracked(p, n));
  p[0] = 5;  // writable as before
  MS_CHECK_EQ(p[0], 5);
  TakeDiffMemorySnapshot();
  p[0] = 6;  // and tracked again
  Rewind(0);
  MS_CHECK_EQ(p[0], 5);
  p[0] = 2;
  Rewind(2);  // to 0: ones
  MS_CHECK(Holds(p, n, 1));
}

TEST(HostCallsTest, MunmapRewoundToBeforeAndAfter) { MS_IN_CHILD(MunmapScenario()); }

// Decommit (RW -> NONE) and commit (NONE -> RW) with mprotect across checkpoints: never
// taken for corruption, and every rewind gives the host's protection at its checkpoint.
void CommitScenario() {
  const size_t n = 4 * Page();
  uint8_t* p = Map(4, 1);
  uint8_t* hi = p + 2 * Page();
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();  // 0: ones, all committed
  hi[0] = 4;
  MS_CHECK(mprotect(hi, 2 * Page(), PROT_NONE) == 0);  // decommit (bytes intact)
  MS_CHECK(!Readable(hi));
  MS_CHECK(Readable(p));
  TakeDiffMemorySnapshot();  // 1: hi decommitted
  MS_CHECK(mprotect(hi, 2 * Page(), PROT_READ | PROT_WRITE) == 0);  // commit
  MS_CHECK_EQ(hi[0], 4);
  hi[1] = 9;
  TakeDiffMemorySnapshot();  // 2: hi committed
  hi[1] = 10;
  Rewind(0);  // to 2
  MS_CHECK(Readable(hi));
  MS_CHECK_EQ(hi[1], 9);
  Rewind(1);  // to 1: decommitted again
  MS_CHECK(!Readable(hi));
  MS_CHECK(Readable(p));
  Rewind(1);  // to 0: committed, ones, writable
  MS_CHECK(Readable(hi));
  MS_CHECK(Holds(p, n, 1));
  hi[0] = 8;
  MS_CHECK_EQ(hi[0], 8);
  TakeDiffMemorySnapshot();
  hi[0] = 11;
  Rewind(0);
  MS_CHECK_EQ(hi[0], 8);
}

TEST(HostCallsTest, MprotectCommitAndDecommitRewoundBothWays) { MS_IN_CHILD(CommitScenario()); }

uint8_t* gReadOnly;
void WriteReadOnly(void*) {
  gReadOnly[0] = 1;
  _exit(0);
}

// A write the host's own protection forbids dies with SIGSEGV, as without memsnap (it is
// not a tracked first write); a rewind to before the mprotect makes the page writable.
void HostReadOnlyScenario() {
  uint8_t* p = Map(2, 1);
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();  // 0: writable
  TakeDiffMemorySnapshot();   // 1
  MS_CHECK(mprotect(p, Page(), PROT_READ) == 0);
  MS_CHECK(Readable(p));
  gReadOnly = p;
  int status = mstest::StatusOfChild(WriteReadOnly, nullptr);
  MS_CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV);
  MS_CHECK_EQ(p[0], 1);
  Rewind(0);  // to 1: writable again
  p[0] = 6;
  MS_CHECK_EQ(p[0], 6);
  Rewind(0);
  MS_CHECK_EQ(p[0], 1);
}

TEST(HostCallsTest, WriteToHostReadOnlyTrackedPageDies) { MS_IN_CHILD(HostReadOnlyScenario()); }

// mremap: shrinking retains the tail, moving copies and retains the old range; a rewind
// to before gives both back.
void MremapScenario() {
  const size_t n = 4 * Page();
  uint8_t* p = Map(4, 1);
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();  // 0: ones
  Fill(p, n, 2);
  TakeDiffMemorySnapshot();  // 1: twos
  void* q = mremap(p, n, 2 * Page(), 0);
  MS_CHECK(q == p);
  MS_CHECK(!Readable(p + 2 * Page()));
  MS_CHECK(Holds(p, 2 * Page(), 2));
  uint8_t* r = (uint8_t*)mremap(p, 2 * Page(), 64 * Page(), MREMAP_MAYMOVE);
  MS_CHECK(r != MAP_FAILED);
  MS_CHECK(Holds(r, 2 * Page(), 2));
  MS_CHECK(Holds(r + 2 * Page(), 62 * Page(), 0));
  Fill(r, 64 * Page(), 5);
  TakeDiffMemorySnapshot();  // 2
  Rewind(1);                 // to 1
  MS_CHECK(Readable(p + n - 1));
  MS_CHECK(Holds(p, n, 2));
  Rewind(1);  // to 0
  MS_CHECK(Holds(p, n, 1));
  p[n - 1] = 3;
  MS_CHECK_EQ(p[n - 1], 3);
}

TEST(HostCallsTest, MremapShrinkAndMoveRewound) { MS_IN_CHILD(MremapScenario()); }

// With snapshot pages above the kernel's, unmapping untracked kernel pages that share a
// snapshot page with tracked ones changes nothing memsnap tracks: allowed. (An allocator
// unmapping a fresh PROT_NONE mapping the kernel placed right after a partly tracked
// snapshot page once aborted here, "covers part of a tracked snapshot page".)
void UnmapBesideTrackedScenario() {
  InitializeMemorySnapshots();
  const size_t k = (size_t)sysconf(_SC_PAGESIZE);
  uint8_t* p = static_cast<uint8_t*>(mstest::MapSnapshotPages(Page()));
  MS_CHECK(p != MAP_FAILED);
  // The first kernel page tracked (read-write), the rest of the snapshot page not.
  if (Page() > k) MS_CHECK(mprotect(p + k, Page() - k, PROT_NONE) == 0);
  p[0] = 1;
  TakeFirstMemorySnapshot();
  p[0] = 2;
  if (Page() > k) {
    MS_CHECK(munmap(p + k, Page() - k) == 0);
    MS_CHECK(!Readable(p + k));
  }
  Rewind(0);
  MS_CHECK_EQ(p[0], 1);
}

TEST(HostCallsTest, UnmapOfUntrackedPagesBesideTrackedOnes) {
  MS_IN_CHILD(UnmapBesideTrackedScenario());
}

}  // namespace host_calls_test
