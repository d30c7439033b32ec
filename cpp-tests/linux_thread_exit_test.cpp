// A thread inside exit(2) at a checkpoint (Linux). pthread_join returns once the kernel
// has cleared the thread's tid, which happens inside exit(2), before the thread leaves
// /proc/self/task; a checkpoint taken right after a join could count the thread as live,
// and the next rewind then refused "threads were created or exited since checkpoint N
// (1 other threads then, 0 now)". Slow machines widen the window: the 6.1 kernel under
// QEMU's emulation hit it in KernelWriteTest.FutexWaitsAndWakes (docs/kernels.md).
//
// The test holds a thread inside exit(2): a forked tracer ptrace-seizes it with
// PTRACE_O_TRACEEXIT, so it stops at the exit event, and releases it once memsnap waits
// for it (the checkpoint's main thread sleeps), or after the checkpoint, which then must
// not have counted it. Before the fix the rewind below aborted.
#include <fcntl.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>

#include "test_support.h"

using namespace mozilla::recordreplay;

namespace thread_exit_test {

struct Shared {
  std::atomic<int> tid{0};
  std::atomic<int> go{0};
};

void* ExitingThread(void* arg) {
  Shared* s = (Shared*)arg;
  s->tid.store((int)syscall(SYS_gettid));
  while (s->go.load() == 0) sched_yield();
  return nullptr;  // glibc ends the thread with exit(2)
}

// Whether thread `tid` of process `pid` is sleeping in clock_nanosleep(2).
bool Sleeping(int pid, int tid) {
  char path[96], text[256];
  snprintf(path, sizeof path, "/proc/%d/task/%d/syscall", pid, tid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  ssize_t n = read(fd, text, sizeof text - 1);
  close(fd);
  if (n <= 0) return false;
  text[n] = 0;
  return atol(text) == SYS_clock_nanosleep;
}

// The tracer (a forked child): seizes `tid` with PTRACE_O_TRACEEXIT, says so on `out`,
// waits for the exit stop, says so again, and detaches (letting the thread finish its
// exit) once the test's main thread sleeps (memsnap waiting for the thread to vanish) or
// a byte arrives on `in` (the checkpoint is over, memsnap did not wait).
[[noreturn]] void Tracer(int tid, int out, int in) {
  char b = 1;
  const int parent = getppid();
  if (ptrace(PTRACE_SEIZE, tid, nullptr, (void*)(long)PTRACE_O_TRACEEXIT) != 0) {
    mstest::ms_say("PTRACE_SEIZE: errno %d\n", errno);
    _exit(1);
  }
  if (write(out, &b, 1) != 1) _exit(1);
  int st = 0;
  for (;;) {
    if (waitpid(tid, &st, __WALL) != tid) _exit(1);
    if (WIFSTOPPED(st) && (st >> 8) == (SIGTRAP | (PTRACE_EVENT_EXIT << 8))) break;
    // Any other stop: let it go on, without the signal if it was ours.
    ptrace(PTRACE_CONT, tid, nullptr, nullptr);
  }
  if (write(out, &b, 1) != 1) _exit(1);
  fcntl(in, F_SETFL, O_NONBLOCK);
  while (read(in, &b, 1) != 1 && !Sleeping(parent, parent)) usleep(100);
  ptrace(PTRACE_DETACH, tid, nullptr, nullptr);
  _exit(0);
}

void ThreadInsideExitScenario() {
  InitializeMemorySnapshots();
  // Tracked memory that the rewinds below check.
  volatile int* word = (volatile int*)AllocateMemory(sizeof(int), MemoryKind::Tracked);
  *word = 1;
  Shared* s = (Shared*)AllocateMemory(sizeof(Shared), MemoryKind::Generic);
  new (s) Shared();
  int toParent[2], toTracer[2];
  MS_CHECK(pipe(toParent) == 0 && pipe(toTracer) == 0);
  // The tracer is our child, not our ancestor: Yama's ptrace_scope=1 needs our consent.
  prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
  // Detached: glibc files the thread's stack away before exit(2), so glibc's lists at the
  // checkpoint say the thread is gone, as they do after a pthread_join.
  pthread_attr_t attr;
  MS_CHECK(pthread_attr_init(&attr) == 0);
  MS_CHECK(pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED) == 0);
  pthread_t t;
  MS_CHECK(pthread_create(&t, &attr, ExitingThread, s) == 0);
  while (s->tid.load() == 0) sched_yield();
  pid_t tracer = fork();
  MS_CHECK(tracer >= 0);
  if (tracer == 0) Tracer(s->tid.load(), toParent[1], toTracer[0]);
  char b;
  MS_CHECK_EQ(read(toParent[0], &b, 1), 1);  // seized
  s->go.store(1);
  MS_CHECK_EQ(read(toParent[0], &b, 1), 1);  // stopped inside exit(2)

  TakeFirstMemorySnapshot();  // checkpoint 0: the thread has returned, still listed
  *word = 2;
  MS_CHECK_EQ(write(toTracer[1], &b, 1), 1);
  int st = 0;
  MS_CHECK_EQ(waitpid(tracer, &st, 0), tracer);
  MS_CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  char path[64];
  snprintf(path, sizeof path, "/proc/self/task/%d", s->tid.load());
  while (access(path, F_OK) == 0) sched_yield();
  // The thread is gone now as it was, for the program, at the checkpoint: no refusal.
  mstest::Rewind(0);
  MS_CHECK_EQ(*word, 1);
  TakeDiffMemorySnapshot();
  *word = 3;
  mstest::Rewind(0);
  MS_CHECK_EQ(*word, 1);
}

TEST(ThreadExitTest, ThreadInsideExitAtCheckpointIsNotLive) {
  MS_IN_CHILD(ThreadInsideExitScenario());
}

}  // namespace thread_exit_test
