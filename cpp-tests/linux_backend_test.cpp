// Issue 6: the write-tracking backends (mprotect, uffd, uffd-async). memsnap_set_backend's
// statuses, the backend named by the stats and DumpTimers, and under userfaultfd the
// kernel's writes into tracked memory (read, recv, futex, a thread's CLEARTID word)
// landing and being rewound exactly. Every scenario runs in a forked child.

#include <linux/futex.h>
#include <pthread.h>
#include <sys/mman.h>

#include <atomic>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

#include "test_support.h"

using namespace mozilla::recordreplay;
using mstest::ms_say;

namespace backend_test {

using mstest::Granule;
using mstest::Rewind;
using mstest::Stats;

MemsnapBackend Expected(int request) {
  switch (request) {
    case 1: return MemsnapBackend::LinuxMprotect;
    case 2: return MemsnapBackend::LinuxUffd;
    case 3: return MemsnapBackend::LinuxUffdAsync;
  }
  return MemsnapBackend::Inactive;
}

// Asks for `request`; when memsnap accepts it, the first snapshot must use exactly it.
// A userfaultfd backend is Unsupported exactly when the kernel, asked without memsnap
// (kernel_offers.h), does not offer it: a memsnap that refuses what this kernel offers
// fails here instead of passing as "unsupported".
void SetBackendScenario(int request) {
  mstest::Alarm(30);
  char why[160] = "";
  const bool offered = request <= 1 || mstest::KernelOffersUffd(request == 3, why, sizeof why);
  InitializeMemorySnapshots();
  MS_CHECK(memsnap_set_backend(4) == MemsnapStatus::InvalidArgument);
  MS_CHECK(memsnap_set_backend(-1) == MemsnapStatus::InvalidArgument);
  MemsnapStatus st = memsnap_set_backend(request);
  if (st != (offered ? MemsnapStatus::Ok : MemsnapStatus::Unsupported)) {
    ms_say("memsnap_set_backend(%d): %s, but the kernel %s%s\n", request,
           memsnap_status_string(st), offered ? "offers it" : "does not offer it: ", why);
    _exit(1);
  }
  MS_CHECK(Stats().backend == MemsnapBackend::Inactive);
  uint8_t* t = (uint8_t*)AllocateMemory(2 * Granule(), MemoryKind::Tracked);
  memset(t, 1, 2 * Granule());
  TakeFirstMemorySnapshot();
  MemsnapStats s = Stats();
  if (st == MemsnapStatus::Ok && request != 0) MS_CHECK(s.backend == Expected(request));
  if (request == 0) {
    // Auto picks the best backend this kernel offers (asked without memsnap).
    const MemsnapBackend best = mstest::KernelOffersUffd(true)    ? MemsnapBackend::LinuxUffdAsync
                                : mstest::KernelOffersUffd(false) ? MemsnapBackend::LinuxUffd
                                                                  : MemsnapBackend::LinuxMprotect;
    if (s.backend != best) {
      ms_say("auto chose %s, the best backend the kernel offers is %s\n",
             mstest::BackendName(s.backend), mstest::BackendName(best));
      _exit(1);
    }
  }
  // Too late now; a backend memsnap cannot provide stays Unsupported.
  MS_CHECK(memsnap_set_backend(request) ==
           (offered ? MemsnapStatus::AlreadyStarted : MemsnapStatus::Unsupported));
  MS_CHECK(memsnap_set_backend(4) == MemsnapStatus::AlreadyStarted ||
           memsnap_set_backend(4) == MemsnapStatus::InvalidArgument);
  memset(t, 2, 2 * Granule());
  Rewind(0);
  for (size_t i = 0; i < 2 * Granule(); i++) MS_CHECK_EQ(t[i], 1);
  if (st == MemsnapStatus::Unsupported)
    ms_say("[backend] request %d unsupported here: %s\n", request, why);
}

TEST(BackendTest, SetBackendAuto) { MS_IN_CHILD(SetBackendScenario(0)); }
TEST(BackendTest, SetBackendMprotect) { MS_IN_CHILD(SetBackendScenario(1)); }
TEST(BackendTest, SetBackendUffd) { MS_IN_CHILD(SetBackendScenario(2)); }
TEST(BackendTest, SetBackendUffdAsync) { MS_IN_CHILD(SetBackendScenario(3)); }

// Before initialization the request is remembered too.
void SetBeforeInit() {
  mstest::Alarm(30);
  MS_CHECK(memsnap_set_backend(1) == MemsnapStatus::Ok);
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  MS_CHECK(Stats().backend == MemsnapBackend::LinuxMprotect);
  MS_CHECK_EQ(Stats().uffd_tracked_bytes, 0);
}

TEST(BackendTest, SetBackendBeforeInitializeOverridesEnvironment) { MS_IN_CHILD(SetBeforeInit()); }

// DumpTimers names the backend stats report.
void DumpTimersChild(void*) {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  DumpTimers();
  _exit(0);
}

const char* DebugName(MemsnapBackend b) {
  switch (b) {
    case MemsnapBackend::LinuxMprotect: return "backend LinuxMprotect,";
    case MemsnapBackend::LinuxUffd: return "backend LinuxUffd,";
    case MemsnapBackend::LinuxUffdAsync: return "backend LinuxUffdAsync,";
    default: return "backend ?";
  }
}

void DumpTimersScenario() {
  char out[2048];
  int status = mstest::StatusAndStderrOfChild(DumpTimersChild, nullptr, out, sizeof out);
  MS_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  const char* want = DebugName(mstest::ActiveBackend());
  if (!strstr(out, want)) {
    ms_say("DumpTimers did not say \"%s\":\n%s\n", want, out);
    _exit(1);
  }
}

TEST(BackendTest, DumpTimersNamesTheBackend) { MS_IN_CHILD(DumpTimersScenario()); }

// ---- Kernel writes under userfaultfd -------------------------------------------------

uint8_t* Buffer(size_t pages, uint8_t fill) {
  uint8_t* b = (uint8_t*)AllocateMemory(pages * Granule(), MemoryKind::Tracked);
  memset(b, fill, pages * Granule());
  return b;
}

bool AllBytes(const uint8_t* p, size_t n, uint8_t v) {
  for (size_t i = 0; i < n; i++)
    if (((const volatile uint8_t*)p)[i] != v) return false;
  return true;
}

void ReadLands() {
  mstest::Alarm(30);
  InitializeMemorySnapshots();
  const size_t g = Granule();
  uint8_t* buf = Buffer(3, 'A');
  int p[2];
  MS_CHECK(pipe(p) == 0);
  TakeFirstMemorySnapshot();
  MS_CHECK(mstest::KernelWritesTracked(buf));
  char src[64];
  memset(src, 'R', sizeof src);
  // Straddling two clean pages: all of it lands.
  MS_CHECK(write(p[1], src, sizeof src) == (ssize_t)sizeof src);
  MS_CHECK_EQ(read(p[0], buf + g - 32, sizeof src), (ssize_t)sizeof src);
  MS_CHECK(AllBytes(buf + g - 32, sizeof src, 'R'));
  TakeDiffMemorySnapshot();  // checkpoint 1 holds the read bytes
  MS_CHECK(Stats().saved_diff_pages >= 2);
  MS_CHECK(write(p[1], src, 8) == 8);
  MS_CHECK_EQ(read(p[0], buf + 2 * g, 8), 8);
  Rewind(0);
  MS_CHECK(AllBytes(buf + g - 32, sizeof src, 'R'));
  MS_CHECK(AllBytes(buf + 2 * g, g, 'A'));
  Rewind(1);
  MS_CHECK(AllBytes(buf, 3 * g, 'A'));
}

void RecvLands() {
  mstest::Alarm(30);
  InitializeMemorySnapshots();
  const size_t g = Granule();
  uint8_t* buf = Buffer(2, 'B');
  int st[2], dg[2];
  MS_CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, st) == 0);
  MS_CHECK(socketpair(AF_UNIX, SOCK_DGRAM, 0, dg) == 0);
  TakeFirstMemorySnapshot();
  MS_CHECK(send(st[1], "stream", 6, 0) == 6);
  MS_CHECK(send(dg[1], "datagram", 8, 0) == 8);
  MS_CHECK_EQ(recv(st[0], buf + g - 3, 6, 0), 6);
  MS_CHECK_EQ(recv(dg[0], buf + 100, 8, 0), 8);
  MS_CHECK(memcmp(buf + g - 3, "stream", 6) == 0);
  MS_CHECK(memcmp(buf + 100, "datagram", 8) == 0);
  Rewind(0);
  MS_CHECK(AllBytes(buf, 2 * g, 'B'));
}

// futex: a wait on a tracked word reads it; FUTEX_WAKE_OP writes it (kernel-side).
void FutexLands() {
  mstest::Alarm(30);
  InitializeMemorySnapshots();
  uint32_t* w = (uint32_t*)Buffer(1, 0);
  w[0] = 7;
  w[1] = 0;
  TakeFirstMemorySnapshot();
  // Wrong expected value: EAGAIN at once (a read of the armed word).
  MS_CHECK_EQ(syscall(SYS_futex, &w[0], FUTEX_WAIT_PRIVATE, 8, nullptr, nullptr, 0), -1);
  MS_CHECK_EQ(errno, EAGAIN);
  // FUTEX_WAKE_OP: *w[1] = 5 (FUTEX_OP_SET), written by the kernel into a clean page.
  auto wakeOp = [&]() {
    return syscall(SYS_futex, &w[0], FUTEX_WAKE_OP_PRIVATE, 1, (void*)1, &w[1],
                   FUTEX_OP(FUTEX_OP_SET, 5, FUTEX_OP_CMP_EQ, 0));
  };
  long r = wakeOp();
  if (r < 0 && mstest::IsUffdSync()) {
    // The futex atomic ops fault their page in without FAULT_FLAG_ALLOW_RETRY, which a
    // sync userfault cannot serve: EFAULT, nothing written (the kernel's limit). Preparing
    // the word must then let the kernel write it, as it does under mprotect.
    MS_CHECK_EQ(errno, EFAULT);
    MS_CHECK_EQ(w[1], 0);
    MS_CHECK(memsnap_prepare_write(&w[1], sizeof w[1]) == MemsnapStatus::Ok);
    r = wakeOp();
    if (r < 0) ms_say("FUTEX_WAKE_OP after memsnap_prepare_write: errno %d\n", errno);
  }
  MS_CHECK(r >= 0);
  MS_CHECK_EQ(w[1], 5);
  Rewind(0);
  MS_CHECK_EQ(w[0], 7);
  MS_CHECK_EQ(w[1], 0);
}

// A raw clone's CLONE_CHILD_SETTID/CLEARTID word in tracked memory: the kernel writes the
// thread id into it at the start and clears it at the exit. Threads may not be created or
// exit between a checkpoint and a rewind to it, so the checkpoint after the exit must
// hold the kernel's writes (the page is in its diff), and a rewind to it is exact.
uint8_t gCloneStack[64 * 1024] __attribute__((aligned(16)));
int CloneBody(void*) { return 0; }

void ClearTidLands() {
  mstest::Alarm(30);
  InitializeMemorySnapshots();
  volatile int32_t* word = (volatile int32_t*)Buffer(1, 0);
  *word = 1;
  TakeFirstMemorySnapshot();  // checkpoint 0
  *word = 12345;
  TakeDiffMemorySnapshot();  // checkpoint 1: 12345 (the page is clean and armed again)
  const size_t diff1 = Stats().saved_diff_pages;
  const int flags = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD |
                    CLONE_SYSVSEM | CLONE_CHILD_CLEARTID | CLONE_CHILD_SETTID;
  long tid = clone(CloneBody, gCloneStack + sizeof gCloneStack, flags, nullptr, nullptr,
                   nullptr, (int*)word);
  MS_CHECK(tid > 0);
  // Only the kernel writes the word from here on: the tid, then 0 and a futex wake.
  for (;;) {
    int32_t v = *word;
    if (v == 0) break;
    syscall(SYS_futex, (int*)word, FUTEX_WAIT, v, nullptr, nullptr, 0);
  }
  TakeDiffMemorySnapshot();  // checkpoint 2, with no other thread alive
  MS_CHECK(Stats().saved_diff_pages > diff1);  // the kernel-written page was tracked
  *word = 99;
  Rewind(0);
  MS_CHECK_EQ(*word, 0);
  *word = 98;
  Rewind(0);
  MS_CHECK_EQ(*word, 0);
}

#define UFFD_ONLY()                                                                   \
  do {                                                                                \
    if (!mstest::IsUffdAsync() && !(mstest::IsUffdSync() && mstest::KernelUserfaultsAllowed())) \
      GTEST_SKIP() << "kernel writes into tracked memory land only under userfaultfd "  \
                      "with kernel-mode faults (this run: "                           \
                   << mstest::BackendName(mstest::ActiveBackend()) << ")";            \
  } while (0)

TEST(KernelWriteUffdTest, ReadLandsAndIsRewound) { UFFD_ONLY(); MS_IN_CHILD(ReadLands()); }
TEST(KernelWriteUffdTest, RecvLandsAndIsRewound) { UFFD_ONLY(); MS_IN_CHILD(RecvLands()); }
TEST(KernelWriteUffdTest, FutexWakeOpLandsAndIsRewound) { UFFD_ONLY(); MS_IN_CHILD(FutexLands()); }
TEST(KernelWriteUffdTest, ClearTidLandsAndIsRewound) { UFFD_ONLY(); MS_IN_CHILD(ClearTidLands()); }

// The kernel-write cases that fail with EFAULT under mprotect (KernelWriteTest) land under
// userfaultfd, each into its own clean tracked page, and one rewind takes them all back.
void MoreSyscallsLand() {
  mstest::Alarm(30);
  InitializeMemorySnapshots();
  const size_t g = Granule();
  uint8_t* buf = Buffer(6, 'C');
  int sv[2];
  MS_CHECK(socketpair(AF_UNIX, SOCK_DGRAM, 0, sv) == 0);
  char path[] = "/tmp/memsnap-uffd-XXXXXX";
  int fd = mkstemp(path);
  MS_CHECK(fd >= 0);
  unlink(path);
  MS_CHECK(write(fd, "file bytes", 10) == 10);
  TakeFirstMemorySnapshot();
  // pipe() writes its descriptor pair.
  int* fds = (int*)(buf);
  MS_CHECK_EQ(pipe(fds), 0);
  MS_CHECK(fds[0] >= 0 && fds[1] >= 0 && fds[0] != fds[1]);
  // pread from a file.
  MS_CHECK_EQ(pread(fd, buf + g, 10, 0), 10);
  MS_CHECK(memcmp(buf + g, "file bytes", 10) == 0);
  // A datagram: under mprotect it would be lost.
  MS_CHECK(send(sv[0], "datagram", 8, 0) == 8);
  MS_CHECK_EQ(recv(sv[1], buf + 2 * g, 8, 0), 8);
  MS_CHECK(memcmp(buf + 2 * g, "datagram", 8) == 0);
  // The raw clock_gettime system call (no vDSO).
  struct timespec* ts = (struct timespec*)(buf + 3 * g);
  MS_CHECK_EQ(syscall(SYS_clock_gettime, CLOCK_MONOTONIC, ts), 0);
  MS_CHECK(ts->tv_sec != 0x4343434343434343LL);
  // A shared (not private) futex: the kernel looks the page up for writing.
  uint32_t* word = (uint32_t*)(buf + 4 * g);
  MS_CHECK_EQ(syscall(SYS_futex, word, FUTEX_WAKE, 1, nullptr, nullptr, 0), 0);
  MS_CHECK_EQ(syscall(SYS_futex, word, FUTEX_WAIT, 0, nullptr, nullptr, 0), -1);
  MS_CHECK_EQ(errno, EAGAIN);
  close(fds[0]);
  close(fds[1]);
  Rewind(0);
  MS_CHECK(AllBytes(buf, 6 * g, 'C'));
}

// A robust mutex whose owner exits holding it: the kernel's robust-list walk at thread exit
// writes FUTEX_OWNER_DIED into the mutex word, with the futex code's fault-in that cannot
// wait for a userfault. Into a clean tracked page that write is dropped under mprotect and
// sync uffd (the next locker times out instead of getting EOWNERDEAD) and lands under
// uffd-async; after memsnap_prepare_write it lands everywhere.
std::atomic<int>* gRobustGo;
pthread_mutex_t* gRobust;

void* RobustOwner(void*) {
  pthread_mutex_lock(gRobust);
  gRobustGo->store(1);
  while (gRobustGo->load() != 2) {
  }
  return nullptr;  // exits holding the mutex
}

void RobustMutexOwnerDies(bool prepare) {
  mstest::Alarm(30);
  InitializeMemorySnapshots();
  // One kernel page (16 KiB on arm64-16k: a 4096-byte registration is misaligned there).
  const size_t k = (size_t)sysconf(_SC_PAGESIZE);
  gRobustGo = (std::atomic<int>*)mmap(nullptr, k, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  MS_CHECK(gRobustGo != MAP_FAILED);
  RegisterAllocatedMemory(gRobustGo, k, MemoryKind::Generic);
  gRobust = (pthread_mutex_t*)AllocateMemory(Granule(), MemoryKind::Tracked);
  pthread_mutexattr_t a;
  pthread_mutexattr_init(&a);
  pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(gRobust, &a);
  pthread_t t;
  MS_CHECK(pthread_create(&t, nullptr, RobustOwner, nullptr) == 0);
  while (gRobustGo->load() != 1) {
  }
  TakeFirstMemorySnapshot();  // the mutex word's page is clean from here on
  if (prepare) MS_CHECK(memsnap_prepare_write(gRobust, sizeof *gRobust) == MemsnapStatus::Ok);
  const MemsnapBackend b = Stats().backend;
  gRobustGo->store(2);
  MS_CHECK(pthread_join(t, nullptr) == 0);
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  ts.tv_sec += 1;
  const int r = pthread_mutex_timedlock(gRobust, &ts);
  const bool lands = prepare || b == MemsnapBackend::LinuxUffdAsync;
  if (lands) {
    MS_CHECK_EQ(r, EOWNERDEAD);
  } else {
    MS_CHECK_EQ(r, ETIMEDOUT);
  }
  TakeDiffMemorySnapshot();  // memsnap is still consistent
}

TEST(KernelWriteTest, RobustMutexOwnerDeathPerBackend) {
  MS_IN_CHILD(RobustMutexOwnerDies(false));
}

TEST(KernelWriteTest, RobustMutexOwnerDeathAfterPrepareWrite) {
  MS_IN_CHILD(RobustMutexOwnerDies(true));
}

TEST(KernelWriteUffdTest, PipePreadDatagramClockAndSharedFutexLandAndAreRewound) {
  UFFD_ONLY();
  MS_IN_CHILD(MoreSyscallsLand());
}

}  // namespace backend_test
