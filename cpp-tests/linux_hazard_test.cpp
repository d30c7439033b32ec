// docs/hazards.md's "Hazards" table, one claim per test (suite HazardTest): real crashes and
// stack overflows reach the previous handler on the alternate stack; kernel-written areas
// (the rseq area, errno, thread stacks, cached thread stacks) are never protected; malloc
// is pinned to the brk heap and heap growth after a checkpoint reads as zero after a
// rewind; unmapped or re-protected tracked memory is refused loudly, naming the range; a
// replaced SIGSEGV handler is noticed; fork children keep their own tracking; other
// threads wait while memory changes are disallowed.
//
// Every scenario runs in a forked child (MS_IN_CHILD / EXPECT_EXIT) and arms mstest::Alarm(30)
// first, so a hang fails instead of blocking CI. Expected values live on the stack or in
// untracked memory (AllocateMemory(Generic)); /proc files are read with read(2) into stack
// buffers (stdio and the heap are tracked). Helpers live in namespace hazard_test.

#include <dirent.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/rseq.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "test_support.h"

using namespace mozilla::recordreplay;
using mstest::ms_say;

namespace hazard_test {

using mstest::Rewind;
using mstest::Stats;

// ---------------------------------------------------------------------------------------
// Helpers (no heap objects; usable after the first snapshot)

size_t Page() { return mstest::SnapshotPage(); }

void Begin() {
  mstest::Alarm(30);
  InitializeMemorySnapshots();
}



template <typename T>
T* Untracked() {
  return new (AllocateMemory(sizeof(T), MemoryKind::Generic)) T();
}

bool AllBytes(const void* p, size_t n, uint8_t v) {
  const volatile uint8_t* b = (const volatile uint8_t*)p;
  for (size_t i = 0; i < n; i++) {
    if (b[i] != v) return false;
  }
  return true;
}

// Sleeps with the raw system call: no libc bookkeeping (cancellation state) is written.
void RawSleepMs(long ms) {
  struct timespec ts;
  ts.tv_sec = ms / 1000;
  ts.tv_nsec = (ms % 1000) * 1000000L;
  while (syscall(SYS_nanosleep, &ts, &ts) != 0 && errno == EINTR) {
  }
}

void FutexWait(std::atomic<int>* word, int expected) {
  syscall(SYS_futex, (int*)word, FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}

void FutexWake(std::atomic<int>* word) {
  syscall(SYS_futex, (int*)word, FUTEX_WAKE_PRIVATE, 1 << 30, nullptr, nullptr, 0);
}

uintptr_t ParseHex(const char*& s) {
  uintptr_t v = 0;
  for (;; s++) {
    char c = *s;
    if (c >= '0' && c <= '9') {
      v = v * 16 + (uintptr_t)(c - '0');
    } else if (c >= 'a' && c <= 'f') {
      v = v * 16 + (uintptr_t)(c - 'a' + 10);
    } else {
      return v;
    }
  }
}

struct Mapping {
  uintptr_t lo, hi;
  char perms[5];
  const char* name;  // valid during the callback only
};

// Calls f(const Mapping&) for every line of /proc/self/maps until f returns false. Reads
// with read(2) into a stack buffer: nothing is allocated.
template <typename F>
void ForEachMapping(F f) {
  int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
  MS_CHECK(fd >= 0);
  char buf[16384];
  size_t len = 0;
  bool stop = false;
  for (;;) {
    ssize_t n = read(fd, buf + len, sizeof buf - 1 - len);
    if (n < 0 && errno == EINTR) continue;
    MS_CHECK(n >= 0);
    len += (size_t)n;
    if (n == 0 && len > 0 && buf[len - 1] != '\n') buf[len++] = '\n';
    size_t start = 0;
    for (size_t i = 0; i < len && !stop; i++) {
      if (buf[i] != '\n') continue;
      buf[i] = 0;
      const char* s = buf + start;
      start = i + 1;
      Mapping m;
      m.lo = ParseHex(s);
      if (*s++ != '-') continue;
      m.hi = ParseHex(s);
      if (*s++ != ' ') continue;
      memcpy(m.perms, s, 4);
      m.perms[4] = 0;
      // Skip perms, offset, device, inode, then the padding before the name.
      for (int field = 0; field < 4; field++) {
        while (*s && *s != ' ') s++;
        while (*s == ' ') s++;
      }
      m.name = s;
      if (!f(m)) stop = true;
    }
    if (stop || n == 0) break;
    memmove(buf, buf + start, len - start);
    len -= start;
    MS_CHECK(len < sizeof buf - 2);  // one line never fills the buffer
  }
  close(fd);
}

// Whether [p, p + n) lies in mappings the kernel labels [heap] (it labels every VMA
// between the start of the brk area and the break).
bool InHeap(const void* p, size_t n) {
  uintptr_t first = (uintptr_t)p, last = (uintptr_t)p + n - 1;
  bool firstIn = false, lastIn = false;
  ForEachMapping([&](const Mapping& m) {
    bool heap = strcmp(m.name, "[heap]") == 0;
    if (m.lo <= first && first < m.hi) firstIn = heap;
    if (m.lo <= last && last < m.hi) lastIn = heap;
    return true;
  });
  return firstIn && lastIn;
}

// An address range that is free in this (parent) process, so that a forked child can map
// exactly there (before InitializeMemorySnapshots) and a death-test regex can name it.
uintptr_t FreeAddress(size_t pages) {
  void* p = mmap(nullptr, (pages + 2) * Page(), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return 0;
  munmap(p, (pages + 2) * Page());
  return (uintptr_t)p + Page();
}

uint8_t* MapAt(uintptr_t addr, size_t pages, uint8_t fill) {
  void* p = mmap((void*)addr, pages * Page(), PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  MS_CHECK(p != MAP_FAILED);
  MS_CHECK((uintptr_t)p == addr);
  memset(p, fill, pages * Page());
  return (uint8_t*)p;
}

std::string Hex(uintptr_t v) {
  char b[32];
  snprintf(b, sizeof b, "0x%lx", (unsigned long)v);
  return b;
}

// ---------------------------------------------------------------------------------------
// Tracked global test data (external linkage, volatile scalars: reloaded after restores).

volatile int gSlots[4096];
alignas(65536) uint8_t gPageData[4 * 65536];  // whole pages at any page size up to 64 KiB
alignas(65536) char gAltStack[1 << 16];

// ---------------------------------------------------------------------------------------
// 1, 2. A stack overflow reaches the previous handler on the alternate stack; without one
// the process dies with its own SIGSEGV.

void AltStackExitHandler(int, siginfo_t*, void*) {
  volatile char here = 0;
  uintptr_t a = (uintptr_t)&here;
  // 42 only when running on our alternate stack.
  bool onAlt = a >= (uintptr_t)gAltStack && a < (uintptr_t)gAltStack + sizeof gAltStack;
  _exit(onAlt ? 42 : 43);
}

volatile int gRecursionLimit = 1 << 30;  // never reached: the stack overflows first

__attribute__((noinline)) int Recurse(int depth) {
  volatile char frame[1024];
  frame[0] = (char)depth;
  frame[sizeof frame - 1] = (char)(depth >> 3);
  if (depth >= gRecursionLimit) return frame[0];
  int r = Recurse(depth + 1);
  return r + frame[sizeof frame - 1] + frame[0];
}

void StackOverflowScenario(bool withHandler) {
  mstest::Alarm(30);
  stack_t ss;
  memset(&ss, 0, sizeof ss);
  ss.ss_sp = gAltStack;
  ss.ss_size = sizeof gAltStack;
  MS_CHECK(sigaltstack(&ss, nullptr) == 0);
  if (withHandler) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = AltStackExitHandler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    MS_CHECK(sigaction(SIGSEGV, &sa, nullptr) == 0);
  }
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  // memsnap's handler is in front (the overflow goes through it), and the alternate
  // stack is not tracked.
  struct sigaction cur;
  MS_CHECK(sigaction(SIGSEGV, nullptr, &cur) == 0);
  MS_CHECK((void*)cur.sa_sigaction != (void*)AltStackExitHandler);
  MS_CHECK(cur.sa_flags & SA_ONSTACK);
  MS_CHECK(!MemoryRangeIsTracked(gAltStack, sizeof gAltStack));
  gSlots[0] = 1;  // a handled tracked fault first
  int r = Recurse(0);
  _exit(r == 12345 ? 3 : 4);  // not reached
}

TEST(HazardTest, StackOverflowReachesPreviousHandlerOnAltStack) {
  EXPECT_EXIT(StackOverflowScenario(true), ::testing::ExitedWithCode(42), "");
}

void StackOverflowWithoutHandler() { StackOverflowScenario(false); }

// Any SIGSEGV would do for a plain death test, one inside memsnap's handler included: the
// fatal fault must be the overflow itself, raised by Recurse (the host's code) just below
// the main thread's stack mapping.
void StackOverflowDeathScenario() {
  const mstest::TracedDeath d = mstest::TraceDeath(StackOverflowWithoutHandler);
  const bool ok = d.traced && d.termsig == SIGSEGV &&
                  mstest::FaultedInObjectOf(d, (const void*)&Recurse) && d.stack_low != 0 &&
                  d.addr < d.stack_low && d.stack_low - d.addr <= (1u << 20);
  if (!ok) {
    mstest::SayDeath("the stack overflow", d);
    _exit(1);
  }
}

TEST(HazardTest, StackOverflowWithoutHandlerDiesWithSigsegv) {
  MS_IN_CHILD(StackOverflowDeathScenario());
}

// ---------------------------------------------------------------------------------------
// 3. The controller's rseq area is never tracked; the kernel keeps writing it.

bool PinToCpu(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return sched_setaffinity(0, sizeof set, &set) == 0;
}

void RseqScenario() {
  mstest::Alarm(30);
  if (__rseq_size == 0) MS_PASS();  // the TEST skips before forking
  InitializeMemorySnapshots();
  volatile struct rseq* area =
      (volatile struct rseq*)((char*)__builtin_thread_pointer() + __rseq_offset);
  // Registered: the kernel has filled in the CPU number.
  MS_CHECK((int)area->cpu_id >= 0);
  cpu_set_t original;
  MS_CHECK(sched_getaffinity(0, sizeof original, &original) == 0);
  int cpus[2] = {-1, -1};
  for (int c = 0, k = 0; c < CPU_SETSIZE && k < 2; c++) {
    if (CPU_ISSET(c, &original)) cpus[k++] = c;
  }
  TakeFirstMemorySnapshot();
  MS_CHECK(!MemoryRangeIsTracked((void*)area, __rseq_size));
  int migrations = 0;
  for (int round = 0; round < 12; round++) {
    for (int i = 0; i < 300; i++) {
      gSlots[i] = round * 1000 + i;
      sched_yield();
      if (i % 50 == 0) usleep(200);
    }
    // Force a migration when there are two CPUs: the kernel rewrites cpu_id.
    if (cpus[1] >= 0) {
      int target = cpus[round % 2];
      MS_CHECK(PinToCpu(target));
      sched_yield();
      MS_CHECK_EQ((int)area->cpu_id, target);
      MS_CHECK_EQ(sched_getcpu(), target);
      migrations++;
    }
    TakeDiffMemorySnapshot();  // checkpoint round + 1
    if (round % 4 == 3) {
      gSlots[7] = -1;
      Rewind(0);
      MS_CHECK_EQ(gSlots[7], round * 1000 + 7);
    }
  }
  Rewind(4);  // checkpoint 8: values of round 7
  MS_CHECK_EQ(gSlots[299], 7 * 1000 + 299);
  MS_CHECK((int)area->cpu_id >= 0);
  MS_CHECK(sched_setaffinity(0, sizeof original, &original) == 0);
  ms_say("rseq area %p (%u bytes), %d forced migrations\n", (void*)area, __rseq_size,
         migrations);
}

TEST(HazardTest, RseqAreaIsNeverTracked) {
  if (__rseq_size == 0) GTEST_SKIP() << "glibc registered no rseq area";
  MS_IN_CHILD(RseqScenario());
}

// ---------------------------------------------------------------------------------------
// 4. errno is not tracked: a failing system call inside a disallow scope does not abort.

void ErrnoScenario() {
  Begin();
  TakeFirstMemorySnapshot();
  MS_CHECK(!MemoryRangeIsTracked(&errno, sizeof errno));
  gSlots[1] = 5;
  int rc = 0, err = 0, seen = -1;
  {
    AutoDisallowMemoryChanges disallow;
    errno = 0;
    rc = close(-1);
    err = errno;
    RestoreMemoryToLastSavedCheckpoint();
    seen = gSlots[1];
  }
  MS_CHECK_EQ(rc, -1);
  MS_CHECK_EQ(err, EBADF);
  MS_CHECK_EQ(seen, 0);
  MS_CHECK_EQ(gSlots[1], 0);
}

TEST(HazardTest, ErrnoIsNotTracked) { MS_IN_CHILD(ErrnoScenario()); }

// ---------------------------------------------------------------------------------------
// 5. A thread created after the first snapshot, blocked across a checkpoint and two
// rewinds to it, then released.

struct LateGate {
  pthread_mutex_t mutex;
  pthread_cond_t cond;
  int released;
  std::atomic<uintptr_t> stackAddress;
  std::atomic<pid_t> tid;
  std::atomic<int> counter;
};

void* LateThreadMain(void* arg) {
  LateGate* g = (LateGate*)arg;
  volatile int local = 1;
  g->tid = (pid_t)syscall(SYS_gettid);
  g->stackAddress = (uintptr_t)&local;
  pthread_mutex_lock(&g->mutex);
  while (!g->released) pthread_cond_wait(&g->cond, &g->mutex);
  pthread_mutex_unlock(&g->mutex);
  local = local + 1;
  g->counter.fetch_add(local - 1);
  return nullptr;
}

// Waits until thread `tid` is sleeping (state S in /proc/self/task/TID/stat).
void WaitUntilSleeping(pid_t tid) {
  char path[64];
  snprintf(path, sizeof path, "/proc/self/task/%d/stat", (int)tid);
  for (int attempt = 0; attempt < 5000; attempt++) {
    char buf[512];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    MS_CHECK(fd >= 0);
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    MS_CHECK(n > 0);
    buf[n] = 0;
    const char* paren = strrchr(buf, ')');
    if (paren && paren[1] == ' ' && paren[2] == 'S') return;
    RawSleepMs(1);
  }
  MS_CHECK(!"the thread never blocked");
}

void LateThreadScenario() {
  Begin();
  LateGate* g = (LateGate*)AllocateMemory(sizeof(LateGate), MemoryKind::Generic);
  MS_CHECK(pthread_mutex_init(&g->mutex, nullptr) == 0);
  MS_CHECK(pthread_cond_init(&g->cond, nullptr) == 0);
  g->released = 0;
  new (&g->stackAddress) std::atomic<uintptr_t>(0);
  new (&g->tid) std::atomic<pid_t>(0);
  new (&g->counter) std::atomic<int>(0);
  gSlots[2] = 1;
  TakeFirstMemorySnapshot();  // checkpoint 0: no other thread
  pthread_t t;
  MS_CHECK(pthread_create(&t, nullptr, LateThreadMain, g) == 0);
  while (g->stackAddress.load() == 0) sched_yield();
  WaitUntilSleeping(g->tid.load());
  gSlots[2] = 2;
  TakeDiffMemorySnapshot();  // checkpoint 1: the thread is blocked
  MS_CHECK(!MemoryRangeIsTracked((void*)g->stackAddress.load(), sizeof(int)));
  gSlots[2] = 3;
  Rewind(0);
  MS_CHECK_EQ(gSlots[2], 2);
  gSlots[2] = 4;
  Rewind(0);
  MS_CHECK_EQ(gSlots[2], 2);
  pthread_mutex_lock(&g->mutex);
  g->released = 1;
  pthread_cond_broadcast(&g->cond);
  pthread_mutex_unlock(&g->mutex);
  MS_CHECK(pthread_join(t, nullptr) == 0);
  MS_CHECK_EQ(g->counter.load(), 1);
}

TEST(HazardTest, ThreadCreatedAfterSnapshotSurvivesRewinds) {
  MS_IN_CHILD(LateThreadScenario());
}

// ---------------------------------------------------------------------------------------
// 6. Short-lived threads on glibc's cached stacks: their TCB, rseq area and stack buffers
// are never protected.

struct PipeState {
  int fds[2];
  std::atomic<int> efaults;
  std::atomic<int> otherFailures;
  std::atomic<int> reads;
  std::atomic<uintptr_t> stacks[4];  // where each thread of the round had its buffer
};

bool SameStack(uintptr_t a, uintptr_t b) { return (a > b ? a - b : b - a) < 65536; }

// Whether the `n` threads of a round (all alive at once) had distinct stacks.
bool DistinctStacks(const std::atomic<uintptr_t>* stacks, int n) {
  for (int i = 0; i < n; i++) {
    for (int j = 0; j < i; j++) {
      if (stacks[i].load() == 0 || SameStack(stacks[i].load(), stacks[j].load())) return false;
    }
  }
  return true;
}

void* ShortThreadMain(void* arg) {
  PipeState* p = (PipeState*)arg;
  char buf[256];  // on this thread's (possibly cached) stack
  memset(buf, 0, sizeof buf);
  ssize_t n = read(p->fds[0], buf + 100, 1);
  if (n != 1) {
    if (n < 0 && errno == EFAULT) {
      p->efaults++;
    } else {
      p->otherFailures++;
    }
    return nullptr;
  }
  p->reads++;
  int slot = (unsigned char)buf[100];
  if (slot >= 100 && slot < 104) p->stacks[slot - 100] = (uintptr_t)buf;
  gSlots[slot] = gSlots[slot] + 1;  // a tracked write from this thread
  sched_yield();
  return nullptr;
}

// Runs four threads that are alive at once (each blocks reading the pipe until all four
// exist), feeds them one byte each and joins them; returns whether they had distinct stacks.
bool RunFourReaders(PipeState* p) {
  pthread_t threads[4];
  for (int i = 0; i < 4; i++) p->stacks[i] = 0;
  for (int i = 0; i < 4; i++) {
    MS_CHECK(pthread_create(&threads[i], nullptr, ShortThreadMain, p) == 0);
  }
  for (int i = 0; i < 4; i++) {
    char c = (char)(100 + i);
    MS_CHECK(write(p->fds[1], &c, 1) == 1);
  }
  for (int i = 0; i < 4; i++) MS_CHECK(pthread_join(threads[i], nullptr) == 0);
  return DistinctStacks(p->stacks, 4);
}

// Rewinds go only to the checkpoint just taken: no thread was created or exited since.
// The threads of this process the kernel still lists (/proc/self/task).
int ListedThreads() {
  DIR* d = opendir("/proc/self/task");
  if (!d) return -1;
  int n = 0;
  while (struct dirent* e = readdir(d)) n += e->d_name[0] != '.';
  closedir(d);
  return n;
}

// pthread_join returns when the kernel clears the thread's tid, before the kernel has
// finished its exit: on a loaded machine the next checkpoint could still count it and a
// rewind to that checkpoint would then refuse "threads ... exited". This scenario is
// about cached stacks, not that race (ThreadExitTest is), so it waits for the kernel.
void WaitUntilListed(int threads) {
  for (int i = 0; i < 5000 && ListedThreads() != threads; i++) RawSleepMs(1);
}

void CachedStacksScenario() {
  Begin();
  PipeState* p = Untracked<PipeState>();
  MS_CHECK(pipe(p->fds) == 0);
  int* expected = (int*)AllocateMemory(4 * sizeof(int), MemoryKind::Generic);
  uintptr_t* seen = (uintptr_t*)AllocateMemory(80 * sizeof(uintptr_t), MemoryKind::Generic);
  TakeFirstMemorySnapshot();
  const int baseline = ListedThreads();
  int rewinds = 0, reusedStacks = 0;
  for (int round = 0; round < 20; round++) {
    MS_CHECK(RunFourReaders(p));
    WaitUntilListed(baseline);
    for (int i = 0; i < 4; i++) {
      uintptr_t s = p->stacks[i].load();
      bool reused = false;
      for (int k = 0; k < round * 4; k++) reused = reused || SameStack(seen[k], s);
      reusedStacks += reused;
      seen[round * 4 + i] = s;
    }
    for (int i = 0; i < 4; i++) expected[i]++;
    MS_CHECK_EQ(gSlots[100] + gSlots[101] + gSlots[102] + gSlots[103],
                expected[0] + expected[1] + expected[2] + expected[3]);
    TakeDiffMemorySnapshot();  // checkpoint round + 1
    if (round % 4 == 3) {
      gSlots[100] += 50;  // undone by the rewind
      Rewind(0);
      rewinds++;
      for (int i = 0; i < 4; i++) MS_CHECK_EQ(gSlots[100 + i], expected[i]);
    }
  }
  MS_CHECK_EQ(p->efaults.load(), 0);
  MS_CHECK_EQ(p->otherFailures.load(), 0);
  MS_CHECK_EQ(p->reads.load(), 80);
  // Cached stacks were really reused (after checkpoints taken while they sat in the cache).
  MS_CHECK(reusedStacks > 40);
  ms_say("%d rewinds over 80 short-lived threads, %d on reused stacks\n", rewinds,
         reusedStacks);
}

TEST(HazardTest, ThreadsOnCachedStacks) { MS_IN_CHILD(CachedStacksScenario()); }

// 6b. A rewind across threads that were created and exited after the target checkpoint
// (the live thread set is the same at both ends). glibc keeps its stack-cache list heads
// in tracked ld.so data and the list nodes in the cached stacks (untracked), so rewinding
// the heads alone corrupts the list. memsnap notices the exited threads from their CPU
// time and refuses the rewind with the "threads were created or exited" message; anything
// else (two live threads on one stack, a crash, a hang) fails.

void RewindAcrossShortLivedThreadsScenario() {
  Begin();
  PipeState* p = Untracked<PipeState>();
  MS_CHECK(pipe(p->fds) == 0);
  auto round = [p](int k) {
    if (!RunFourReaders(p)) {
      ms_say("round %d: two live threads were given the same stack\n", k);
      _exit(1);
    }
  };
  TakeFirstMemorySnapshot();  // checkpoint 0
  round(0);
  TakeDiffMemorySnapshot();  // checkpoint 1: four stacks in glibc's cache
  round(1);                  // reuses them and returns them in another order
  TakeDiffMemorySnapshot();  // checkpoint 2: same live threads as checkpoint 1
  Rewind(1);                 // back to checkpoint 1
  for (int k = 2; k < 6; k++) round(k);
  MS_CHECK_EQ(p->efaults.load(), 0);
  ms_say("rewind across short-lived threads: ok\n");
}

TEST(HazardTest, RewindAcrossShortLivedThreadsIsRefused) {
  MS_DIES_WITH(RewindAcrossShortLivedThreadsScenario(),
               "^memsnap: RestoreMemoryToLastSavedDiffCheckpoint: threads were created or "
               "exited since checkpoint 2 \\(threads that exited since used [0-9]+ us of CPU\\)");
}

// A thread that appears between a checkpoint and a rewind to it changes the live set.
void* BlockForever(void*) {
  for (;;) pause();
  return nullptr;
}

void RewindAcrossThreadCreationScenario() {
  Begin();
  TakeFirstMemorySnapshot();
  pthread_t t;
  MS_CHECK(pthread_create(&t, nullptr, BlockForever, nullptr) == 0);
  RawSleepMs(20);
  Rewind(0);
}

TEST(HazardTest, RewindAcrossThreadCreationIsRefused) {
  MS_DIES_WITH(RewindAcrossThreadCreationScenario(),
               "^memsnap: RestoreMemoryToLastSavedCheckpoint: threads were created or exited "
               "since checkpoint 1 \\(0 other threads then, 1 now\\)");
}

// ---------------------------------------------------------------------------------------
// 7. Heap growth after a checkpoint reads as zero after a rewind before it.

void HeapGrowthScenario() {
  Begin();
  const int kBlocks = 200;
  const size_t kSize = 256 * 1024;  // above glibc's default mmap threshold
  void** before = (void**)AllocateMemory(kBlocks * sizeof(void*), MemoryKind::Generic);
  TakeFirstMemorySnapshot();  // checkpoint 0
  const uintptr_t brk0 = (uintptr_t)sbrk(0);
  for (int i = 0; i < kBlocks; i++) {
    before[i] = malloc(kSize);
    MS_CHECK(before[i] != nullptr);
    memset(before[i], 0x5A, kSize);
  }
  const uintptr_t brk1 = (uintptr_t)sbrk(0);
  // Pinned malloc: the blocks came from the brk heap, not from mmap (the heap may
  // already have had free room, inherited from the test runner, so only growth is
  // asserted).
  MS_CHECK(brk1 > brk0);
  MS_CHECK(InHeap(before[0], kSize));
  MS_CHECK(InHeap(before[kBlocks - 1], kSize));
  TakeDiffMemorySnapshot();  // checkpoint 1
  for (int i = 0; i < kBlocks; i += 2) free(before[i]);
  Rewind(1);  // checkpoint 0: none of the blocks exists
  const uintptr_t brk2 = (uintptr_t)sbrk(0);
  int reused = 0;
  for (int i = 0; i < kBlocks; i++) {
    void* p = calloc(1, kSize);  // never freed: nothing survives the scenario
    MS_CHECK(p != nullptr);
    MS_CHECK(AllBytes(p, kSize, 0));
    if (p == before[i]) reused++;
  }
  const uintptr_t brk3 = (uintptr_t)sbrk(0);
  // The test means something only if the old addresses were handed out again.
  MS_CHECK(reused > kBlocks / 2);
  int stale = 0;
  for (int i = 0; i < 20; i++) {
    void* p = malloc(kSize);
    MS_CHECK(p != nullptr);
    if (AllBytes(p, kSize, 0x5A)) stale++;
  }
  MS_CHECK_EQ(stale, 0);
  ms_say("sbrk(0): +%lu KiB after the mallocs, %+ld KiB after the rewind (libc's view), "
         "+%lu KiB after the callocs; %d of %d addresses reused\n",
         (unsigned long)((brk1 - brk0) >> 10), ((long)brk2 - (long)brk0) / 1024,
         (unsigned long)((brk3 - brk0) >> 10), reused, kBlocks);
}

TEST(HazardTest, HeapGrowthAfterCheckpointIsZeroedByRewind) {
  MS_IN_CHILD(HeapGrowthScenario());
}

// ---------------------------------------------------------------------------------------
// 8. Whole-process mode pins malloc: even 8 MiB comes from the brk heap.

void MallocPinnedScenario(bool pin) {
  Begin();
  if (!pin) MS_CHECK(memsnap_set_pin_allocator(false) == MemsnapStatus::Ok);
  TakeFirstMemorySnapshot();
  const size_t size = 8 << 20;
  void* big = malloc(size);
  MS_CHECK(big != nullptr);
  const bool inHeap = InHeap(big, size);
  free(big);
  if (pin) {
    MS_CHECK(inHeap);
  } else {
    MS_CHECK(!inHeap);  // the control: without pinning glibc mmaps it
  }
}

TEST(HazardTest, MallocPinnedInWholeProcessMode) { MS_IN_CHILD(MallocPinnedScenario(true)); }

TEST(HazardTest, MallocNotPinnedWhenOptedOut) { MS_IN_CHILD(MallocPinnedScenario(false)); }

// ---------------------------------------------------------------------------------------
// 9, 10. Tracked memory unmapped behind memsnap's back.

// The program unmaps and re-protects tracked memory with raw system calls here, which
// bypass libmemsnap's interposed munmap/mprotect (see linux_host_calls_test.cpp for those).
void UnmappedBetweenCheckpoints(uintptr_t addr, int levels) {
  mstest::Alarm(30);
  uint8_t* p = MapAt(addr, 4, 7);  // before initialization: memsnap maps elsewhere
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();  // checkpoint 0
  MS_CHECK(MemoryRangeIsTracked(p, 4 * Page()));
  MS_CHECK_EQ(Stats().oldest_restorable, 0);
  gSlots[3] = 1;
  MS_CHECK(syscall(SYS_munmap, p, 4 * Page()) == 0);
  TakeDiffMemorySnapshot();  // checkpoint 1 notices
  MS_CHECK_EQ(Stats().oldest_restorable, 1);
  MS_CHECK(!MemoryRangeIsTracked(p, Page()));
  gSlots[3] = 2;
  Rewind(levels);
  MS_CHECK_EQ(gSlots[3], 1);
  MS_CHECK_EQ(Stats().saved_checkpoints, 2);
}

TEST(HazardTest, UnmappedTrackedMemoryMakesOlderCheckpointsUnreachable) {
  uintptr_t a = FreeAddress(4);
  ASSERT_NE(a, 0u);
  std::string re = "^memsnap: RestoreMemoryToLastSavedDiffCheckpoint: checkpoint 1 cannot be "
                   "restored: tracked memory " +
                   Hex(a) + "-" + Hex(a + 4 * Page()) +
                   " was unmapped before checkpoint 2 was saved\n$";
  MS_DIES_WITH(UnmappedBetweenCheckpoints(a, 1), re);
}

TEST(HazardTest, UnmappedTrackedMemoryNewestCheckpointStillRestorable) {
  uintptr_t a = FreeAddress(4);
  ASSERT_NE(a, 0u);
  MS_IN_CHILD(UnmappedBetweenCheckpoints(a, 0));
}

void UnmappedSinceNewest(uintptr_t addr) {
  mstest::Alarm(30);
  uint8_t* p = MapAt(addr, 4, 9);
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  MS_CHECK(MemoryRangeIsTracked(p, 4 * Page()));
  MS_CHECK(syscall(SYS_munmap, p, 4 * Page()) == 0);
  Rewind(0);
}

TEST(HazardTest, UnmapSinceNewestCheckpointAbortsRewind) {
  uintptr_t a = FreeAddress(4);
  ASSERT_NE(a, 0u);
  std::string re = "^memsnap: RestoreMemoryToLastSavedCheckpoint: tracked memory " + Hex(a) +
                   "-" + Hex(a + 4 * Page()) + " was unmapped[^\n]*after checkpoint 1[^\n]*\n$";
  MS_DIES_WITH(UnmappedSinceNewest(a), re);
}

// ---------------------------------------------------------------------------------------
// 11. Protection changed behind memsnap's back.

void ReprotectedSinceNewest() {
  Begin();
  uint8_t* page = gPageData;
  memset(page, 1, 2 * Page());
  TakeFirstMemorySnapshot();
  MS_CHECK(MemoryRangeIsTracked(page, 2 * Page()));
  MS_CHECK(syscall(SYS_mprotect, page, Page(), PROT_READ | PROT_WRITE) == 0);
  page[10] = 2;  // no fault: memsnap cannot see this write
  Rewind(0);
}

// Whether gPageData's first two snapshot pages will be armed by userfaultfd in these
// scenarios (asked of a probe child: it depends on the backend and the page size).
void ProbeGPageData() {
  Begin();
  memset(gPageData, 1, 2 * Page());
  TakeFirstMemorySnapshot();
  _exit(mstest::UffdGuarded(gPageData, 2 * Page()) ? 0 : 1);
}
bool GPageDataOnUffd() {
  static int cached = -1;
  if (cached < 0) cached = mstest::ChildSays(ProbeGPageData) ? 1 : 0;
  return cached == 1;
}

// Under userfaultfd the uffd-wp bit survives the program's mprotect(): the write is still
// tracked, nothing is refused, and every checkpoint stays restorable, exactly.
void ReprotectedUnderUffd(int levels, bool checkpointBetween) {
  Begin();
  uint8_t* page = gPageData;
  memset(page, 1, 2 * Page());
  TakeFirstMemorySnapshot();  // checkpoint 0
  MS_CHECK(mstest::UffdGuarded(page, 2 * Page()));
  MS_CHECK(syscall(SYS_mprotect, page, Page(), PROT_READ | PROT_WRITE) == 0);
  page[10] = 2;
  if (checkpointBetween) {
    TakeDiffMemorySnapshot();  // checkpoint 1
    MS_CHECK_EQ(Stats().oldest_restorable, 0);
    page[10] = 3;
  }
  page[Page() + 10] = 4;
  Rewind(levels);
  MS_CHECK_EQ(page[10], checkpointBetween && levels == 0 ? 2 : 1);
  MS_CHECK_EQ(page[Page() + 10], 1);
  if (!(checkpointBetween && levels == 0)) MS_CHECK(AllBytes(page, 2 * Page(), 1));
  MS_CHECK_EQ(Stats().oldest_restorable, 0);
}

TEST(HazardTest, ProtectionChangedBehindOurBack) {
  if (GPageDataOnUffd()) {
    MS_IN_CHILD(ReprotectedUnderUffd(0, false));
    return;
  }
  uintptr_t a = (uintptr_t)gPageData;
  std::string re = "^memsnap: RestoreMemoryToLastSavedCheckpoint: tracked memory " + Hex(a) +
                   "-" + Hex(a + Page()) +
                   " was made writable by the program[^\n]*after checkpoint 1[^\n]*\n$";
  MS_DIES_WITH(ReprotectedSinceNewest(), re);
}

void ReprotectedBetweenCheckpoints(int levels) {
  Begin();
  uint8_t* page = gPageData;
  memset(page, 1, 2 * Page());
  TakeFirstMemorySnapshot();  // checkpoint 0
  MS_CHECK(syscall(SYS_mprotect, page, Page(), PROT_READ | PROT_WRITE) == 0);
  page[10] = 2;
  TakeDiffMemorySnapshot();  // checkpoint 1: succeeds, raises the floor, re-protects
  MS_CHECK_EQ(Stats().oldest_restorable, 1);
  MS_CHECK(MemoryRangeIsTracked(page, Page()));
  const uint64_t faultsBefore = Stats().faults_handled;
  page[10] = 3;  // tracked again: this write faults and is captured
  MS_CHECK(Stats().faults_handled > faultsBefore);
  page[Page() + 10] = 4;
  Rewind(levels);
  MS_CHECK_EQ(page[10], 2);  // checkpoint 1 holds the write memsnap could not see
  MS_CHECK_EQ(page[Page() + 10], 1);
}

TEST(HazardTest, ProtectionChangedThenCheckpointNewCheckpointRestorable) {
  if (GPageDataOnUffd()) {
    MS_IN_CHILD(ReprotectedUnderUffd(0, true));
    return;
  }
  MS_IN_CHILD(ReprotectedBetweenCheckpoints(0));
}

// Under userfaultfd the older checkpoint stays reachable (see ReprotectedUnderUffd).
TEST(HazardTest, ProtectionChangedThenCheckpointOlderCheckpointUnreachable) {
  if (GPageDataOnUffd()) {
    MS_IN_CHILD(ReprotectedUnderUffd(1, true));
    return;
  }
  uintptr_t a = (uintptr_t)gPageData;
  std::string re = "^memsnap: RestoreMemoryToLastSavedDiffCheckpoint: checkpoint 1 cannot be "
                   "restored: tracked memory " +
                   Hex(a) + "-" + Hex(a + Page()) +
                   " was unprotected by the program before checkpoint 2 was saved\n$";
  MS_DIES_WITH(ReprotectedBetweenCheckpoints(1), re);
}

// ---------------------------------------------------------------------------------------
// 12. A replaced SIGSEGV handler is detected at the next checkpoint.

void OtherHandler(int, siginfo_t*, void*) { _exit(42); }

void HandlerReplacedScenario(bool putBack) {
  Begin();
  TakeFirstMemorySnapshot();
  gSlots[4] = 1;
  struct sigaction sa, old;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = OtherHandler;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  MS_CHECK(sigaction(SIGSEGV, &sa, &old) == 0);
  if (putBack) MS_CHECK(sigaction(SIGSEGV, &old, nullptr) == 0);
  TakeDiffMemorySnapshot();
  // Only reached with memsnap's handler back in place: snapshots work as before.
  gSlots[4] = 2;
  Rewind(0);
  MS_CHECK_EQ(gSlots[4], 1);
}

TEST(HazardTest, HandlerReplacedIsDetected) {
  MS_DIES_WITH(HandlerReplacedScenario(false),
               "^memsnap: TakeDiffMemorySnapshot: memsnap's write-fault handler was replaced[^\n]*"
               "\n$");
}

TEST(HazardTest, HandlerPutBackIsAccepted) { MS_IN_CHILD(HandlerReplacedScenario(true)); }

// ---------------------------------------------------------------------------------------
// 13. fork(): the child keeps its own tracking; the parent's snapshots are unaffected.

void ForkScenario() {
  Begin();
  const size_t page = Page();
  uint8_t* heap = (uint8_t*)malloc(3 * page);
  uint8_t* tracked = (uint8_t*)AllocateMemory(2 * page, MemoryKind::Tracked);
  memset(heap, 1, 3 * page);
  memset(tracked, 1, 2 * page);
  memset(gPageData, 1, 2 * page);
  gSlots[5] = 1;
  TakeFirstMemorySnapshot();  // checkpoint 0: everything 1
  memset(heap, 2, 3 * page);
  memset(gPageData, 2, page);
  gSlots[5] = 2;
  TakeDiffMemorySnapshot();  // checkpoint 1
  pid_t pid = fork();
  MS_CHECK(pid >= 0);
  if (pid == 0) {
    // The grandchild: restores run on this thread (no workers survive fork).
    mstest::Alarm(30);
    if (!mstest::ForkChildRewindsInherited()) {
      // Under userfaultfd only its own checkpoints (ForkTest.UffdChildRefuses...).
      memset(heap, 30, 3 * page);
      TakeDiffMemorySnapshot();
      memset(heap, 50, 3 * page);
      gSlots[5] = 50;
      Rewind(0);
      MS_CHECK(AllBytes(heap, 3 * page, 30));
      MS_CHECK_EQ(gSlots[5], 2);
      _exit(0);
    }
    memset(heap, 30, 3 * page);
    memset(tracked, 30, 2 * page);
    memset(gPageData, 30, 2 * page);
    gSlots[5] = 30;
    Rewind(0);  // checkpoint 1
    MS_CHECK(AllBytes(heap, 3 * page, 2));
    MS_CHECK(AllBytes(tracked, 2 * page, 1));
    MS_CHECK(AllBytes(gPageData, page, 2));
    MS_CHECK(AllBytes(gPageData + page, page, 1));
    MS_CHECK_EQ(gSlots[5], 2);
    memset(tracked, 40, 2 * page);
    gSlots[5] = 40;
    TakeDiffMemorySnapshot();  // its own checkpoint 2
    gSlots[5] = 50;
    memset(heap, 50, 3 * page);
    Rewind(0);
    MS_CHECK_EQ(gSlots[5], 40);
    MS_CHECK(AllBytes(heap, 3 * page, 2));
    Rewind(2);  // checkpoint 0
    MS_CHECK_EQ(gSlots[5], 1);
    MS_CHECK(AllBytes(heap, 3 * page, 1));
    MS_CHECK(AllBytes(tracked, 2 * page, 1));
    MS_CHECK(AllBytes(gPageData, 2 * page, 1));
    MS_CHECK_EQ(Stats().saved_checkpoints, 1);
    _exit(0);
  }
  // Bounded: a grandchild hung inside fork() would otherwise hold the runner's pipe.
  const int status = mstest::WaitStatus(pid);
  MS_CHECK(status != -1);
  MS_CHECK(WIFEXITED(status));
  MS_CHECK_EQ(WEXITSTATUS(status), 0);
  // The parent still has both checkpoints, untouched by the grandchild's rewinds.
  MS_CHECK_EQ(Stats().saved_checkpoints, 2);
  MS_CHECK_EQ(gSlots[5], 2);
  MS_CHECK(AllBytes(heap, 3 * page, 2));
  memset(heap, 3, 3 * page);
  memset(tracked, 3, 2 * page);
  memset(gPageData, 3, 2 * page);
  gSlots[5] = 3;
  Rewind(0);  // checkpoint 1
  MS_CHECK_EQ(gSlots[5], 2);
  MS_CHECK(AllBytes(heap, 3 * page, 2));
  MS_CHECK(AllBytes(tracked, 2 * page, 1));
  MS_CHECK(AllBytes(gPageData, page, 2));
  MS_CHECK(AllBytes(gPageData + page, page, 1));
  Rewind(1);  // checkpoint 0
  MS_CHECK_EQ(gSlots[5], 1);
  MS_CHECK(AllBytes(heap, 3 * page, 1));
  MS_CHECK(AllBytes(gPageData, 2 * page, 1));
}

TEST(HazardTest, ForkChildKeepsItsOwnTracking) { MS_IN_CHILD(ForkScenario()); }

// ---------------------------------------------------------------------------------------
// 14. Another thread's tracked write waits while memory changes are disallowed.

struct WriterState {
  std::atomic<int> go;
  std::atomic<int> aboutToWrite;
  std::atomic<int> wrote;
};

void* DisallowedWriterMain(void* arg) {
  WriterState* w = (WriterState*)arg;
  while (w->go.load() == 0) FutexWait(&w->go, 0);
  w->aboutToWrite = 1;
  gSlots[9] = 99;  // faults; must wait until changes are allowed again
  w->wrote = 1;
  return nullptr;
}

void DisallowedWriteScenario() {
  Begin();
  WriterState* w = Untracked<WriterState>();
  pthread_t t;
  MS_CHECK(pthread_create(&t, nullptr, DisallowedWriterMain, w) == 0);
  RawSleepMs(20);  // let it block in the futex wait
  gSlots[9] = 1;
  TakeFirstMemorySnapshot();
  int wroteWhileDisallowed = -1, valueWhileDisallowed = -1, reached = 0;
  {
    AutoDisallowMemoryChanges disallow;
    w->go = 1;
    FutexWake(&w->go);
    for (int i = 0; i < 5000 && w->aboutToWrite.load() == 0; i++) RawSleepMs(1);
    reached = w->aboutToWrite.load();
    RawSleepMs(50);
    wroteWhileDisallowed = w->wrote.load();
    valueWhileDisallowed = gSlots[9];
  }
  MS_CHECK_EQ(reached, 1);
  MS_CHECK_EQ(wroteWhileDisallowed, 0);
  MS_CHECK_EQ(valueWhileDisallowed, 1);
  MS_CHECK(pthread_join(t, nullptr) == 0);
  MS_CHECK_EQ(w->wrote.load(), 1);
  MS_CHECK_EQ(gSlots[9], 99);
}

TEST(HazardTest, DisallowedWriteFromAnotherThreadWaits) {
  MS_SKIP_UNDER(MemsnapBackend::LinuxUffdAsync,
                "writes never fault, so nothing can make another thread's write wait");
  MS_IN_CHILD(DisallowedWriteScenario());
}

}  // namespace hazard_test
