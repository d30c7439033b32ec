// The Linux hazards listed in the README, one claim per test: crashes still reach the
// previous handler, kernel-written areas (rseq, errno, thread stacks) are never
// protected, malloc is pinned, vanished or re-protected tracked memory is refused loudly,
// a replaced SIGSEGV handler is noticed, fork children keep their own tracking, and other
// threads wait while memory changes are disallowed.
//
// Every scenario runs in a forked child under alarm(30), so a hang fails instead of
// blocking the suite.
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/rseq.h>
#include <sys/wait.h>

#include <atomic>
#include <cerrno>
#include <new>

#include "test_support.h"

using namespace mozilla::recordreplay;

namespace linux_hazard_test {

size_t Page() { return (size_t)sysconf(_SC_PAGESIZE); }

void Rewind(int levels) {
  {
    AutoDisallowMemoryChanges disallow;
    RestoreMemoryToLastSavedCheckpoint();
    for (int i = 0; i < levels; i++) {
      RestoreMemoryToLastSavedDiffCheckpoint();
    }
  }
  FixupFreeRegionsAfterRewind();
}

MemsnapStats Stats() {
  MemsnapStats s;
  s.struct_size = sizeof s;
  MS_CHECK(memsnap_get_stats(&s) == MemsnapStatus::Ok);
  return s;
}

void Begin() {
  alarm(30);
  InitializeMemorySnapshots();
}

// Untracked memory for values that must survive rewinds.
template <typename T>
T* Untracked() {
  void* p = AllocateMemory(sizeof(T), MemoryKind::Generic);
  return new (p) T();
}

volatile int gGlobal[4096];

// ---------------------------------------------------------------------------------------
// Real crashes.

alignas(16) char gAltStack[1 << 16];

void ExitHandler(int, siginfo_t*, void*) { _exit(42); }

volatile int gRecursionLimit = 1 << 30;  // never reached: the stack overflows first

__attribute__((noinline)) int Recurse(int depth) {
  volatile char frame[1024];
  frame[0] = (char)depth;
  frame[1023] = frame[0];
  if (depth >= gRecursionLimit) return frame[1023];
  return Recurse(depth + 1) + frame[1023];
}

void StackOverflowScenario(bool withHandler) {
  alarm(30);
  stack_t ss{};
  ss.ss_sp = gAltStack;
  ss.ss_size = sizeof gAltStack;
  MS_CHECK(sigaltstack(&ss, nullptr) == 0);
  if (withHandler) {
    struct sigaction sa {};
    sa.sa_sigaction = ExitHandler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    MS_CHECK(sigaction(SIGSEGV, &sa, nullptr) == 0);
  }
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  MS_CHECK(!MemoryRangeIsTracked(gAltStack, sizeof gAltStack));
  _exit(Recurse(0) == 7 ? 3 : 4);
}

TEST(LinuxHazardTest, StackOverflowReachesPreviousHandlerOnAltStack) {
  EXPECT_EXIT(StackOverflowScenario(true), ::testing::ExitedWithCode(42), "");
}

TEST(LinuxHazardTest, StackOverflowWithoutHandlerDiesWithSigsegv) {
  EXPECT_EXIT(StackOverflowScenario(false), ::testing::KilledBySignal(SIGSEGV), "");
}

// ---------------------------------------------------------------------------------------
// Kernel-written areas.

void RseqScenario() {
  Begin();
  if (__rseq_size == 0) {
    mstest::ms_say("glibc registered no rseq area\n");
    MS_PASS();
  }
  char* area = (char*)__builtin_thread_pointer() + __rseq_offset;
  TakeFirstMemorySnapshot();
  MS_CHECK(!MemoryRangeIsTracked(area, __rseq_size));
  // The kernel updates the area on every return to user space, on every CPU switch.
  for (int round = 0; round < 20; round++) {
    for (int i = 0; i < 200; i++) {
      gGlobal[i] = round + i;
      sched_yield();
    }
    usleep(100);
    TakeDiffMemorySnapshot();
  }
  Rewind(5);
  MS_CHECK_EQ(gGlobal[7], 14 + 7);
}

TEST(LinuxHazardTest, RseqAreaIsNeverTracked) { MS_IN_CHILD(RseqScenario()); }

void ErrnoScenario() {
  Begin();
  TakeFirstMemorySnapshot();
  MS_CHECK(!MemoryRangeIsTracked(&errno, sizeof errno));
  gGlobal[0] = 5;
  {
    AutoDisallowMemoryChanges disallow;
    // A failing system call writes errno: it must not count as a tracked write.
    MS_CHECK(close(-1) == -1);
    RestoreMemoryToLastSavedCheckpoint();
  }
  MS_CHECK_EQ(errno, EBADF);
  MS_CHECK_EQ(gGlobal[0], 0);
}

TEST(LinuxHazardTest, ErrnoIsNotTracked) { MS_IN_CHILD(ErrnoScenario()); }

// ---------------------------------------------------------------------------------------
// Threads.

struct Gate {
  pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;
  pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
  int released = 0;
  std::atomic<int> finished{0};
  std::atomic<uintptr_t> stackAddress{0};
  std::atomic<int> wrote{0};
};

void* LateThread(void* arg) {
  Gate* g = (Gate*)arg;
  volatile int onStack = 1;
  g->stackAddress = (uintptr_t)&onStack;
  pthread_mutex_lock(&g->mutex);
  while (!g->released) pthread_cond_wait(&g->cond, &g->mutex);
  pthread_mutex_unlock(&g->mutex);
  g->finished += onStack;
  return nullptr;
}

void LateThreadScenario() {
  Begin();
  Gate* g = Untracked<Gate>();
  TakeFirstMemorySnapshot();
  pthread_t t;
  MS_CHECK(pthread_create(&t, nullptr, LateThread, g) == 0);
  while (!g->stackAddress) sched_yield();
  usleep(20000);  // let it block in the condition wait
  gGlobal[1] = 1;
  TakeDiffMemorySnapshot();
  MS_CHECK(!MemoryRangeIsTracked((void*)g->stackAddress.load(), sizeof(int)));
  gGlobal[1] = 2;
  Rewind(0);
  MS_CHECK_EQ(gGlobal[1], 1);
  gGlobal[1] = 3;
  Rewind(0);
  pthread_mutex_lock(&g->mutex);
  g->released = 1;
  pthread_cond_broadcast(&g->cond);
  pthread_mutex_unlock(&g->mutex);
  MS_CHECK(pthread_join(t, nullptr) == 0);
  MS_CHECK_EQ(g->finished.load(), 1);
}

TEST(LinuxHazardTest, ThreadCreatedAfterSnapshotSurvivesRewinds) {
  MS_IN_CHILD(LateThreadScenario());
}

struct Pipe {
  int fds[2];
  std::atomic<int> failures{0};
};

void* ShortThread(void* arg) {
  Pipe* p = (Pipe*)arg;
  char buf[64];
  if (read(p->fds[0], buf + 32, 1) != 1) p->failures++;
  buf[0] = buf[32];
  gGlobal[(int)(unsigned char)buf[0]] += 1;
  sched_yield();
  return nullptr;
}

void CachedStacksScenario() {
  Begin();
  Pipe* p = Untracked<Pipe>();
  MS_CHECK(pipe(p->fds) == 0);
  TakeFirstMemorySnapshot();
  for (int round = 0; round < 20; round++) {
    pthread_t threads[4];
    for (int i = 0; i < 4; i++) {
      MS_CHECK(pthread_create(&threads[i], nullptr, ShortThread, p) == 0);
    }
    for (int i = 0; i < 4; i++) {
      char c = (char)(100 + i);
      MS_CHECK(write(p->fds[1], &c, 1) == 1);
    }
    for (int i = 0; i < 4; i++) MS_CHECK(pthread_join(threads[i], nullptr) == 0);
    TakeDiffMemorySnapshot();
    if (round % 5 == 4) {
      // Back to the checkpoint just taken: no thread was created or exited since.
      gGlobal[1]++;
      Rewind(0);
    }
  }
  // A read into a protected stack buffer would have failed with EFAULT.
  MS_CHECK_EQ(p->failures.load(), 0);
  MS_CHECK_EQ(gGlobal[100] + gGlobal[101] + gGlobal[102] + gGlobal[103], 80);
}

TEST(LinuxHazardTest, ThreadsOnCachedStacksReadIntoTheirStacks) {
  MS_IN_CHILD(CachedStacksScenario());
}

void* Quick(void*) { return nullptr; }

void RewindAcrossThreadExit() {
  Begin();
  pthread_t t;
  MS_CHECK(pthread_create(&t, nullptr, LateThread, Untracked<Gate>()) == 0);
  usleep(20000);
  TakeFirstMemorySnapshot();
  MS_CHECK(pthread_create(&t, nullptr, Quick, nullptr) == 0);
  MS_CHECK(pthread_join(t, nullptr) == 0);
  TakeDiffMemorySnapshot();  // same threads as checkpoint 1: fine so far
  Rewind(0);
  MS_CHECK(pthread_create(&t, nullptr, LateThread, Untracked<Gate>()) == 0);
  usleep(20000);
  Rewind(0);  // a thread appeared since checkpoint 2
}

TEST(LinuxHazardTest, RewindAcrossThreadCreationIsRefused) {
  MS_DIES_WITH(RewindAcrossThreadExit(),
               "^memsnap: RestoreMemoryToLastSavedCheckpoint: threads were created or exited "
               "since checkpoint 2 \\(1 other threads then, 2 now\\)");
}

struct Waiter {
  std::atomic<int> go{0};
  std::atomic<int> wrote{0};
};

void* DisallowedWriter(void* arg) {
  Waiter* w = (Waiter*)arg;
  while (!w->go) sched_yield();
  gGlobal[9] = 99;
  w->wrote = 1;
  return nullptr;
}

void DisallowedWaitScenario() {
  Begin();
  Waiter* w = Untracked<Waiter>();
  pthread_t t;
  MS_CHECK(pthread_create(&t, nullptr, DisallowedWriter, w) == 0);
  TakeFirstMemorySnapshot();
  {
    AutoDisallowMemoryChanges disallow;
    w->go = 1;
    usleep(50000);
    // The writer faulted on a tracked page and waits for changes to be allowed again.
    MS_CHECK_EQ(w->wrote.load(), 0);
  }
  MS_CHECK(pthread_join(t, nullptr) == 0);
  MS_CHECK_EQ(w->wrote.load(), 1);
  MS_CHECK_EQ(gGlobal[9], 99);
}

TEST(LinuxHazardTest, OtherThreadsWaitWhileChangesAreDisallowed) {
  MS_IN_CHILD(DisallowedWaitScenario());
}

// ---------------------------------------------------------------------------------------
// Memory the program maps, grows and unmaps.

bool InHeapMapping(void* p) {
  int fd = open("/proc/self/maps", O_RDONLY);
  MS_CHECK(fd >= 0);
  // Untracked: the kernel cannot write into write-protected memory.
  const size_t size = 1 << 20;
  char* text = (char*)AllocateMemory(size, MemoryKind::Generic);
  size_t len = 0;
  ssize_t n;
  while ((n = read(fd, text + len, size - 1 - len)) > 0) len += (size_t)n;
  close(fd);
  text[len] = 0;
  uintptr_t a = (uintptr_t)p;
  for (char* line = text; *line;) {
    char* end = strchr(line, '\n');
    if (end) *end = 0;
    unsigned long lo, hi;
    if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && lo <= a && a < hi) {
      return strstr(line, "[heap]") != nullptr;
    }
    if (!end) break;
    line = end + 1;
  }
  return false;
}

void PinnedScenario() {
  Begin();
  TakeFirstMemorySnapshot();
  void* big = malloc(8 << 20);
  MS_CHECK(big != nullptr);
  MS_CHECK(InHeapMapping(big));
}

TEST(LinuxHazardTest, MallocIsPinnedToTheHeapInWholeProcessMode) {
  MS_IN_CHILD(PinnedScenario());
}

void* MapPages(size_t pages) {
  void* p = mmap(nullptr, pages * Page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                 -1, 0);
  MS_CHECK(p != MAP_FAILED);
  memset(p, 7, pages * Page());
  return p;
}

void UnmappedBetweenCheckpoints(int rewindLevels) {
  Begin();
  void* p = MapPages(4);
  TakeFirstMemorySnapshot();
  MS_CHECK(MemoryRangeIsTracked(p, 4 * Page()));
  gGlobal[2] = 1;
  munmap(p, 4 * Page());
  TakeDiffMemorySnapshot();
  MS_CHECK_EQ(Stats().oldest_restorable, 1);
  gGlobal[2] = 2;
  Rewind(rewindLevels);
  MS_CHECK_EQ(gGlobal[2], 1);
}

TEST(LinuxHazardTest, UnmappedTrackedMemoryMakesOlderCheckpointsUnreachable) {
  MS_DIES_WITH(UnmappedBetweenCheckpoints(1),
               "^memsnap: RestoreMemoryToLastSavedDiffCheckpoint: checkpoint 1 cannot be "
               "restored: tracked memory 0x[0-9a-f]+-0x[0-9a-f]+ was unmapped before "
               "checkpoint 2 was saved\n$");
}

TEST(LinuxHazardTest, CheckpointsAfterAnUnmapStayReachable) {
  MS_IN_CHILD(UnmappedBetweenCheckpoints(0));
}

void UnmappedSinceNewest() {
  Begin();
  void* p = MapPages(4);
  TakeFirstMemorySnapshot();
  munmap(p, 4 * Page());
  Rewind(0);
}

TEST(LinuxHazardTest, UnmapSinceTheNewestCheckpointAbortsTheRewind) {
  MS_DIES_WITH(UnmappedSinceNewest(),
               "^memsnap: RestoreMemoryToLastSavedCheckpoint: tracked memory "
               "0x[0-9a-f]+-0x[0-9a-f]+ was unmapped");
}

void ReprotectedSinceNewest() {
  Begin();
  char* p = (char*)MapPages(2);
  TakeFirstMemorySnapshot();
  MS_CHECK(mprotect(p, Page(), PROT_READ | PROT_WRITE) == 0);
  p[0] = 1;  // no fault: memsnap cannot see this write
  Rewind(0);
}

TEST(LinuxHazardTest, ProtectionChangedBehindOurBackAbortsTheRewind) {
  MS_DIES_WITH(ReprotectedSinceNewest(), "made writable by the program");
}

void ReprotectedBetweenCheckpoints(int levels) {
  Begin();
  char* p = (char*)MapPages(2);
  TakeFirstMemorySnapshot();
  MS_CHECK(mprotect(p, Page(), PROT_READ | PROT_WRITE) == 0);
  p[0] = 1;
  TakeDiffMemorySnapshot();
  MS_CHECK_EQ(Stats().oldest_restorable, 1);
  // Tracked again from checkpoint 1 on.
  p[0] = 2;
  Rewind(levels);
  MS_CHECK_EQ(p[0], 1);
}

TEST(LinuxHazardTest, ReprotectedMemoryIsTrackedAgainFromTheNextCheckpoint) {
  MS_IN_CHILD(ReprotectedBetweenCheckpoints(0));
  MS_DIES_WITH(ReprotectedBetweenCheckpoints(1), "unprotected by the program");
}

void HandlerReplaced() {
  Begin();
  TakeFirstMemorySnapshot();
  struct sigaction sa {};
  sa.sa_sigaction = ExitHandler;
  sa.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &sa, nullptr);
  TakeDiffMemorySnapshot();
}

TEST(LinuxHazardTest, ReplacedHandlerIsDetected) {
  MS_DIES_WITH(HandlerReplaced(), "^memsnap: TakeDiffMemorySnapshot: memsnap's SIGSEGV handler was replaced");
}

// ---------------------------------------------------------------------------------------
// fork().

void ForkScenario() {
  Begin();
  gGlobal[3] = 1;
  TakeFirstMemorySnapshot();
  gGlobal[3] = 2;
  TakeDiffMemorySnapshot();
  pid_t pid = fork();
  MS_CHECK(pid >= 0);
  if (pid == 0) {
    // The child: its own copy of the tracking, no restore workers, itself the controller.
    gGlobal[3] = 30;
    Rewind(1);
    MS_CHECK_EQ(gGlobal[3], 1);
    gGlobal[3] = 40;
    TakeDiffMemorySnapshot();
    gGlobal[3] = 50;
    Rewind(0);
    MS_CHECK_EQ(gGlobal[3], 40);
    _exit(0);
  }
  int status = 0;
  MS_CHECK(waitpid(pid, &status, 0) == pid);
  MS_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  // The parent's snapshots are untouched by the child.
  MS_CHECK_EQ(gGlobal[3], 2);
  gGlobal[3] = 3;
  Rewind(0);
  MS_CHECK_EQ(gGlobal[3], 2);
  Rewind(1);
  MS_CHECK_EQ(gGlobal[3], 1);
}

TEST(LinuxHazardTest, ForkChildKeepsItsOwnTracking) { MS_IN_CHILD(ForkScenario()); }

}  // namespace linux_hazard_test
