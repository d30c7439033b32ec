// Shared helpers for the memsnap C++ suite.
//
// Every scenario that initializes memsnap runs in a child process (gtest's EXPECT_EXIT
// forks), so one scenario's write protection cannot poison the runner. Inside a child:
//  - check with MS_CHECK / MS_CHECK_EQ: on failure they print file:line and _exit(1);
//  - finish with MS_PASS() (_exit(0));
//  - print only with ms_say (snprintf to the stack + write(2)): stdio buffers live in
//    tracked memory and are rewound like everything else;
//  - keep no heap objects (std::string, std::vector) alive across a rewind, and keep
//    expected values on the stack or in untracked memory (AllocateMemory(Generic)).
#ifndef MEMSNAP_TEST_SUPPORT_H
#define MEMSNAP_TEST_SUPPORT_H

#include <gtest/gtest.h>

#include <csignal>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>
#include <unistd.h>

#include "MemorySnapshotHelpers.h"
#include "kernel_offers.h"

namespace mstest {

// Every watchdog and deadline in the suite is multiplied by MEMSNAP_TEST_TIME_SCALE (a
// whole number, default 1): a hang on a native machine is a slow run in the emulated VMs
// of `make test-kernels` and `make test-aarch64-vm`, which set it.
inline unsigned TimeScale() {
  const char* s = getenv("MEMSNAP_TEST_TIME_SCALE");
  long v = s ? strtol(s, nullptr, 10) : 1;
  return v > 0 && v < 1000 ? (unsigned)v : 1;
}
inline unsigned Alarm(unsigned seconds) { return alarm(seconds * TimeScale()); }

inline void ms_say(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (n > 0) {
    ssize_t ignored = write(2, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
    (void)ignored;
  }
}

}  // namespace mstest

#define MS_CHECK(cond)                                                              \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      ::mstest::ms_say("%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);      \
      _exit(1);                                                                     \
    }                                                                               \
  } while (0)

#define MS_CHECK_EQ(a, b)                                                           \
  do {                                                                              \
    long long ms_a_ = (long long)(a), ms_b_ = (long long)(b);                       \
    if (ms_a_ != ms_b_) {                                                           \
      ::mstest::ms_say("%s:%d: check failed: %s == %s (%lld vs %lld)\n", __FILE__,  \
                       __LINE__, #a, #b, ms_a_, ms_b_);                             \
      _exit(1);                                                                     \
    }                                                                               \
  } while (0)

#define MS_PASS() _exit(0)

// Runs `body` in a forked child under a 60 s watchdog (scaled, see TimeScale) (SIGALRM turns a hang into a
// failure) and expects it to exit with status 0. `body` must not
// contain a top-level comma (the preprocessor would split it): call a function instead.
#define MS_IN_CHILD(body) \
  EXPECT_EXIT({ mstest::Alarm(60); body; MS_PASS(); }, ::testing::ExitedWithCode(0), "")

// Runs `body` in a forked child and expects memsnap to abort it with a message
// matching `regex` on stderr.
#define MS_DIES_WITH(body, regex) \
  EXPECT_EXIT({ mstest::Alarm(60); body; _exit(0); }, ::testing::KilledBySignal(SIGABRT), regex)

namespace mstest {

// The rewind protocol of Firefox's ProcessRewind: RestoreMemoryToLastSavedCheckpoint and
// `levels` RestoreMemoryToLastSavedDiffCheckpoint calls in one disallow scope, then
// FixupFreeRegionsAfterRewind.
inline void Rewind(int levels) {
  {
    mozilla::recordreplay::AutoDisallowMemoryChanges disallow;
    mozilla::recordreplay::RestoreMemoryToLastSavedCheckpoint();
    for (int i = 0; i < levels; i++) {
      mozilla::recordreplay::RestoreMemoryToLastSavedDiffCheckpoint();
    }
  }
  mozilla::recordreplay::FixupFreeRegionsAfterRewind();
}

// memsnap_get_stats into a stack record, checked Ok.
// The snapshot page memsnap uses (tracking unit, tracked-allocation alignment): what
// memsnap_page_size() reports once initialized, and before that what it will pick
// (MEMSNAP_PAGE_SIZE, else the kernel's page). The suite runs at 4 KiB and at 16 KiB.
inline size_t SnapshotPage() {
  size_t p = mozilla::recordreplay::memsnap_page_size();
  if (p != 0) return p;
  const char* env = getenv("MEMSNAP_PAGE_SIZE");
  if (env && *env) {
    char* end = nullptr;
    unsigned long v = strtoul(env, &end, 10);
    if (end && (*end == 'k' || *end == 'K')) v *= 1024;
    if (v != 0) return (size_t)v;
  }
  return (size_t)sysconf(_SC_PAGESIZE);
}

// `bytes` of fresh anonymous read-write memory aligned to the snapshot page (plain mmap
// only aligns to the kernel's page), or MAP_FAILED.
inline void* MapSnapshotPages(size_t bytes) {
  size_t page = SnapshotPage();
  size_t slack = page - (size_t)sysconf(_SC_PAGESIZE);
  void* p = mmap(nullptr, bytes + slack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return p;
  uintptr_t start = ((uintptr_t)p + page - 1) & ~(uintptr_t)(page - 1);
  if (start > (uintptr_t)p) munmap(p, start - (uintptr_t)p);
  uintptr_t end = (uintptr_t)p + bytes + slack;
  if (end > start + bytes) munmap((void*)(start + bytes), end - (start + bytes));
  return (void*)start;
}

inline mozilla::recordreplay::MemsnapStats Stats() {
  mozilla::recordreplay::MemsnapStats s;
  memset(&s, 0, sizeof s);
  s.struct_size = sizeof s;
  MS_CHECK(mozilla::recordreplay::memsnap_get_stats(&s) ==
           mozilla::recordreplay::MemsnapStatus::Ok);
  MS_CHECK_EQ(s.struct_size, sizeof s);
  return s;
}

// Whether a fork child may rewind to the checkpoints it inherited: not under the
// userfaultfd backends, whose registration does not survive fork(), so the child's writes
// before memsnap's fork handler re-armed its memory went unseen (docs/backends.md, fork).
// There the rewind is refused with a message containing kForkChildRefusal.
inline bool ForkChildRewindsInherited() {
  mozilla::recordreplay::MemsnapBackend b = Stats().backend;
  return b != mozilla::recordreplay::MemsnapBackend::LinuxUffd &&
         b != mozilla::recordreplay::MemsnapBackend::LinuxUffdAsync;
}

constexpr const char* kForkChildRefusal = "cannot be restored in this fork child";

}  // namespace mstest

#ifdef __linux__
#include <sys/syscall.h>  // the raw futex helpers below
#endif
#include <fcntl.h>
#include <poll.h>
#include <sys/wait.h>

#include <cerrno>

// ---- Added for the reliability suites (concurrency, kernel writes, allocator, foreign
// faults, fork, bad input). Nothing above changes behaviour.

namespace mstest {

// The snapshot granularity (SnapshotPage above). Tests size and align everything with
// it, never with 4096.
inline size_t Granule() { return SnapshotPage(); }

#ifdef __linux__
// Raw futex calls on a word the caller keeps in untracked memory (or only reads).
inline long FutexWaitRaw(volatile int* word, int expected, int op) {
  return syscall(SYS_futex, (int*)word, op, expected, nullptr, nullptr, 0);
}
inline long FutexWakeRaw(volatile int* word, int op) {
  return syscall(SYS_futex, (int*)word, op, 1 << 30, nullptr, nullptr, 0);
}
#endif

// How long a grandchild (a fork inside a scenario) may run before it is killed. A child
// stuck with every signal blocked (a deadlock inside fork's handlers, say) ignores its own
// alarm and keeps gtest's death-test pipe open, which would hang the whole runner; this
// turns that into a failure. Shorter than every watchdog (30 s) so the scenario reports it.
constexpr int kGrandchildDeadlineMs = 20000;

// Kills `pid` if it has not exited `deadline_ms` from now; returns the raw status (a
// SIGKILL one after a kill, with a message naming the pid), or -1 if the wait failed.
inline int WaitStatusWithin(pid_t pid, int deadline_ms) {
  int status = 0;
  const int given_ms = deadline_ms;
  deadline_ms *= (int)TimeScale();
  for (int waited_ms = 0;; waited_ms += 5) {
    pid_t w = waitpid(pid, &status, WNOHANG);
    if (w == pid) return status;
    if (w < 0 && errno != EINTR) return -1;
    if (waited_ms >= deadline_ms) {
      ms_say("child %d still running %d ms into the wait for it: killed, a hang\n", (int)pid,
             given_ms);
      kill(pid, SIGKILL);
      deadline_ms = 1 << 30;
    }
    usleep(5000);
  }
}

// waitpid, retried on EINTR, under kGrandchildDeadlineMs; returns the raw status, or -1 if
// the wait failed.
inline int WaitStatus(pid_t pid) { return WaitStatusWithin(pid, kGrandchildDeadlineMs); }

// Runs fn(arg) in a fresh child process (no memsnap state unless fn creates it) and
// returns its raw wait status: the control runs of the foreign-fault and fork tests.
inline int StatusOfChild(void (*fn)(void*), void* arg) {
  pid_t pid = fork();
  if (pid == 0) {
    mstest::Alarm(30);
    fn(arg);
    _exit(0);
  }
  return pid < 0 ? -1 : WaitStatus(pid);
}

// A SIGALRM watchdog that names what was running: `what` and `*step` (kept by the caller
// in untracked memory) are printed before the child exits with status 1, so a hang fails
// with a message instead of a bare signal.
struct Watchdog {
  const char* what;
  volatile long* step;
};
inline Watchdog* ActiveWatchdog() {
  static Watchdog w = {nullptr, nullptr};  // written before the first snapshot only
  return &w;
}
inline void WatchdogFired(int) {
  Watchdog* w = ActiveWatchdog();
  ms_say("watchdog: %s hung at step %ld\n", w->what ? w->what : "test",
         w->step ? *w->step : -1L);
  _exit(1);
}
// Arms the watchdog for `seconds`; call again to re-arm. Install it before the first
// snapshot (sigaction and the static above are then not written while tracked).
inline void ArmWatchdog(const char* what, volatile long* step, unsigned seconds) {
  Watchdog* w = ActiveWatchdog();
  if (w->what != what || w->step != step) {
    w->what = what;
    w->step = step;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = WatchdogFired;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, nullptr);
  }
  Alarm(seconds);
}

}  // namespace mstest

namespace mstest {

// Runs fn(arg) in a child whose stderr goes into `out` (NUL-terminated, at most `cap`
// bytes); returns the raw wait status. For checks on an abort message that depend on
// values only the running scenario knows (an address range, say). Nothing is allocated.
inline int StatusAndStderrOfChild(void (*fn)(void*), void* arg, char* out, size_t cap) {
  int fds[2];
  if (pipe(fds) != 0) return -1;
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    dup2(fds[1], 2);
    mstest::Alarm(30);
    fn(arg);
    _exit(0);
  }
  close(fds[1]);
  size_t len = 0;
  int waited_ms = 0;
  for (;;) {
    // The child may hang holding the pipe open: read only what poll says is there.
    struct pollfd pfd = {fds[0], POLLIN, 0};
    int ready = poll(&pfd, 1, 100);
    if (ready < 0 && errno == EINTR) continue;
    if (ready == 0) {
      waited_ms += 100;
      if (waited_ms >= kGrandchildDeadlineMs) break;  // WaitStatus kills it
      continue;
    }
    ssize_t n = read(fds[0], out + len, cap - 1 - len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    len += (size_t)n;
    if (len == cap - 1) break;
  }
  out[len] = 0;
  close(fds[0]);
  return pid < 0 ? -1 : WaitStatusWithin(pid, kGrandchildDeadlineMs - waited_ms);
}

}  // namespace mstest

// ---- Backends (issue 6). The suite runs once per backend (MEMSNAP_BACKEND=mprotect, uffd,
// uffd-async, or auto); tests whose expectations depend on the write-tracking mechanism
// ask these helpers instead of assuming mprotect.
namespace mstest {

using mozilla::recordreplay::MemsnapBackend;

inline const char* BackendName(MemsnapBackend b) {
  switch (b) {
    case MemsnapBackend::Inactive: return "inactive";
    case MemsnapBackend::LinuxMprotect: return "mprotect";
    case MemsnapBackend::MacExceptionPort: return "mac-exception-port";
    case MemsnapBackend::MacSignal: return "mac-signal";
    case MemsnapBackend::LinuxUffd: return "uffd";
    case MemsnapBackend::LinuxUffdAsync: return "uffd-async";
  }
  return "unknown";
}

// The backend this run's first snapshots pick (MEMSNAP_BACKEND, else auto). Once memsnap
// is initialized and has snapshotted in this process, its own answer; otherwise (the gtest
// runner, deciding whether to skip) a probe child initializes memsnap, snapshots one
// registered page and exits with the backend's value. Cached per process.
inline MemsnapBackend ActiveBackend() {
  using namespace mozilla::recordreplay;
  if (memsnap_page_size() != 0) {
    MemsnapStats s;
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    if (memsnap_get_stats(&s) == MemsnapStatus::Ok && s.backend != MemsnapBackend::Inactive)
      return s.backend;
  }
  static int probed = -1;  // written only where nothing is tracked yet
  if (probed < 0) {
    pid_t pid = fork();
    if (pid == 0) {
      mstest::Alarm(20);
      InitializeMemorySnapshots();
      memsnap_set_tracking_mode(MemsnapTrackingMode::RegisteredOnly);
      AllocateMemory(SnapshotPage(), MemoryKind::Tracked);
      TakeFirstMemorySnapshot();
      MemsnapStats s;
      memset(&s, 0, sizeof s);
      s.struct_size = sizeof s;
      memsnap_get_stats(&s);
      _exit((int)s.backend);
    }
    int status = pid < 0 ? -1 : WaitStatus(pid);
    probed = status >= 0 && WIFEXITED(status) ? WEXITSTATUS(status) : 0;
  }
  return (MemsnapBackend)probed;
}

// Whether `b` is what MEMSNAP_BACKEND asks for (unset or auto: any active backend).
inline bool BackendMatchesRequest(MemsnapBackend b) {
  const char* env = getenv("MEMSNAP_BACKEND");
  if (env && strcmp(env, "mprotect") == 0) return b == MemsnapBackend::LinuxMprotect;
  if (env && strcmp(env, "uffd") == 0) return b == MemsnapBackend::LinuxUffd;
  if (env && strcmp(env, "uffd-async") == 0) return b == MemsnapBackend::LinuxUffdAsync;
  return b != MemsnapBackend::Inactive;  // auto: whatever is best here (macOS: its own)
}

inline bool IsMprotect() { return ActiveBackend() == MemsnapBackend::LinuxMprotect; }
inline bool IsUffdSync() { return ActiveBackend() == MemsnapBackend::LinuxUffd; }
inline bool IsUffdAsync() { return ActiveBackend() == MemsnapBackend::LinuxUffdAsync; }
inline bool IsUffdAny() { return IsUffdSync() || IsUffdAsync(); }
inline bool IsUffdBackend(MemsnapBackend b) {
  return b == MemsnapBackend::LinuxUffd || b == MemsnapBackend::LinuxUffdAsync;
}

#ifdef __linux__
// Whether this process may catch kernel-mode userfaults, the way memsnap's probe decides
// (src/sys/linux/uffd.rs): root (CAP_SYS_PTRACE), vm.unprivileged_userfaultfd=1, or
// access to /dev/userfaultfd. Otherwise memsnap falls back to UFFD_USER_MODE_ONLY, under
// which the sync mode's kernel writes fail with EFAULT as under mprotect. The stats do not
// say which was used, hence this mirror of the rule.
inline bool KernelUserfaultsAllowed() {
  if (geteuid() == 0) return true;
  if (access("/dev/userfaultfd", R_OK | W_OK) == 0) return true;
  int fd = open("/proc/sys/vm/unprivileged_userfaultfd", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char c = 0;
  ssize_t n = read(fd, &c, 1);
  close(fd);
  return n == 1 && c == '1';
}

#else
// macOS has no userfaultfd.
inline bool KernelUserfaultsAllowed() { return false; }
#endif

// Whether the kernel page holding `addr` carries the uffd-wp bit (bit 57 of its
// /proc/self/pagemap entry): armed by userfaultfd rather than mprotect. Only meaningful
// for tracked memory that is clean since the newest checkpoint (a served write clears the
// bit). Which regions go to userfaultfd is memsnap's choice (whole snapshot pages only,
// so at 16 KiB a mapping with unaligned ends stays on mprotect; .data under uffd), which
// the stats only sum up, hence asking the kernel.
inline bool UffdArmed(const void* addr) {
#ifdef __linux__
  int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  uint64_t entry = 0;
  const off_t off = (off_t)((uintptr_t)addr / (uintptr_t)sysconf(_SC_PAGESIZE) * 8);
  ssize_t n = pread(fd, &entry, sizeof entry, off);
  close(fd);
  return n == (ssize_t)sizeof entry && ((entry >> 57) & 1) != 0;
#else
  (void)addr;
  return false;
#endif
}

// Every kernel page of [addr, addr + len) is armed by userfaultfd (see UffdArmed).
inline bool UffdGuarded(const void* addr, size_t len = 1) {
  if (ActiveBackend() != MemsnapBackend::LinuxUffd &&
      ActiveBackend() != MemsnapBackend::LinuxUffdAsync)
    return false;
  const uintptr_t k = (uintptr_t)sysconf(_SC_PAGESIZE);
  uintptr_t p = (uintptr_t)addr & ~(k - 1);
  const uintptr_t end = (uintptr_t)addr + (len ? len : 1);
  for (; p < end; p += k) {
    if (!UffdArmed((const void*)p)) return false;
  }
  return true;
}

// Whether a system call writing [addr, addr + len) (tracked memory, clean since the
// newest checkpoint: ask before writing it) lands and is tracked, so a rewind restores it:
// never under mprotect (EFAULT or a short count); under userfaultfd when the pages are
// armed by it, in sync mode only if kernel-mode faults can be caught.
inline bool KernelWritesTracked(const void* addr, size_t len = 1) {
  if (!UffdGuarded(addr, len)) return false;
  return ActiveBackend() == MemsnapBackend::LinuxUffdAsync || KernelUserfaultsAllowed();
}

// Runs fn() in a fresh child and returns whether it exited with status 0: for decisions
// the runner must make before a death test (what a scenario's first snapshot will do).
inline bool ChildSays(void (*fn)()) {
  int status = StatusOfChild([](void* f) { ((void (*)())f)(); }, (void*)fn);
  return status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

}  // namespace mstest

#ifdef __linux__
#include <dlfcn.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <elf.h>

namespace mstest {

// How a traced child died, and the last fault signal (SIGSEGV or SIGBUS) it received
// before: for death tests that must die of one specific fault, not of any SIGSEGV (a crash
// inside memsnap's handler would also be one). The tracer sees each signal before the child's handlers do
// (ptrace's signal-delivery stop) and passes it on unchanged, so the child behaves as it
// would untraced.
struct TracedDeath {
  bool traced = false;    // false: ptrace was refused (why says so)
  int termsig = 0;        // the signal that killed it, 0 if it exited
  int exit_code = -1;     // its exit status, if it exited
  int faults = 0;         // SIGSEGVs and SIGBUSes delivered to it
  int fault_sig = 0;      // the last one's signal
  uintptr_t addr = 0;     // and si_addr
  uintptr_t pc = 0;       // and the instruction that raised it
  char pc_object[256] = "";       // the loaded object holding that instruction
  uintptr_t pc_base = 0;          // and where that object is loaded
  uintptr_t stack_low = 0;        // the start of the main thread's [stack] mapping then
  char why[128] = "";
};

// Runs fn() in a child traced by this process and reports how it died (see TracedDeath).
// The child has 30 s; after that it is killed.
inline TracedDeath TraceDeath(void (*fn)()) {
  TracedDeath d;
  pid_t pid = fork();
  if (pid == 0) {
    if (ptrace(PTRACE_TRACEME, 0, nullptr, nullptr) != 0) _exit(90);
    raise(SIGSTOP);  // wait for the tracer's options
    mstest::Alarm(30);
    fn();
    _exit(0);
  }
  if (pid < 0) {
    snprintf(d.why, sizeof d.why, "fork failed");
    return d;
  }
  int status = 0;
  if (waitpid(pid, &status, 0) != pid || !WIFSTOPPED(status)) {
    if (WIFEXITED(status) && WEXITSTATUS(status) == 90)
      snprintf(d.why, sizeof d.why, "PTRACE_TRACEME refused");
    else
      snprintf(d.why, sizeof d.why, "the child did not stop (status %#x)", status);
    return d;
  }
  d.traced = true;
  ptrace(PTRACE_SETOPTIONS, pid, nullptr, (void*)(uintptr_t)PTRACE_O_EXITKILL);
  ptrace(PTRACE_CONT, pid, nullptr, nullptr);
  for (int waited_ms = 0;;) {
    pid_t w = waitpid(pid, &status, WNOHANG);
    if (w == 0) {
      if ((waited_ms += 5) > 40000) {
        kill(pid, SIGKILL);
        snprintf(d.why, sizeof d.why, "still running after 40 s: killed");
      }
      usleep(5000);
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) {
      snprintf(d.why, sizeof d.why, "waitpid failed (errno %d)", errno);
      return d;
    }
    if (WIFEXITED(status)) {
      d.exit_code = WEXITSTATUS(status);
      return d;
    }
    if (WIFSIGNALED(status)) {
      d.termsig = WTERMSIG(status);
      return d;
    }
    if (!WIFSTOPPED(status)) continue;
    const int sig = WSTOPSIG(status);
    if (sig == SIGSEGV || sig == SIGBUS) {
      d.faults++;
      d.fault_sig = sig;
      siginfo_t si;
      memset(&si, 0, sizeof si);
      ptrace(PTRACE_GETSIGINFO, pid, nullptr, &si);
      d.addr = (uintptr_t)si.si_addr;
      struct user_regs_struct regs;
      memset(&regs, 0, sizeof regs);
      struct iovec io = {&regs, sizeof regs};
      ptrace(PTRACE_GETREGSET, pid, (void*)(uintptr_t)NT_PRSTATUS, &io);
#if defined(__x86_64__)
      d.pc = (uintptr_t)regs.rip;
#elif defined(__aarch64__)
      d.pc = (uintptr_t)regs.pc;
#endif
      // The child is a fork of this process: its objects sit where ours do.
      Dl_info info;
      memset(&info, 0, sizeof info);
      const bool found = dladdr((void*)d.pc, &info) != 0;
      snprintf(d.pc_object, sizeof d.pc_object, "%s",
               found && info.dli_fname ? info.dli_fname : "?");
      d.pc_base = found ? (uintptr_t)info.dli_fbase : 0;
      char path[64];
      snprintf(path, sizeof path, "/proc/%d/maps", (int)pid);
      if (FILE* f = fopen(path, "r")) {
        char line[512];
        while (fgets(line, sizeof line, f)) {
          if (strstr(line, "[stack]")) d.stack_low = (uintptr_t)strtoull(line, nullptr, 16);
        }
        fclose(f);
      }
    }
    ptrace(PTRACE_CONT, pid, nullptr, (void*)(uintptr_t)sig);
  }
}

// Whether the instruction behind `d`'s last fault lies in the object that holds
// `code` (a function of the test binary: the host's own code, not memsnap's).
inline bool FaultedInObjectOf(const TracedDeath& d, const void* code) {
  Dl_info info;
  memset(&info, 0, sizeof info);
  return d.pc_base != 0 && dladdr(code, &info) && (uintptr_t)info.dli_fbase == d.pc_base;
}

// Prints `d` (after a failed expectation).
inline void SayDeath(const char* what, const TracedDeath& d) {
  ms_say("%s: %s; signal %d, exit %d, %d faults, the last (signal %d) at %#lx by pc %#lx "
         "in %s; [stack] starts at %#lx\n",
         what, d.traced ? "traced" : d.why, d.termsig, d.exit_code, d.faults, d.fault_sig,
         (unsigned long)d.addr, (unsigned long)d.pc, d.pc_object, (unsigned long)d.stack_low);
}

}  // namespace mstest
#endif  // __linux__

// Skips the test (visibly, with the backend named) when the running backend is `b`.
#define MS_SKIP_UNDER(b, why)                                                          \
  do {                                                                                 \
    if (::mstest::ActiveBackend() == (b))                                              \
      GTEST_SKIP() << "not under backend " << ::mstest::BackendName(b) << ": " << why; \
  } while (0)

// Skips unless the running backend is `b`.
#define MS_SKIP_UNLESS(b, why)                                                       \
  do {                                                                               \
    if (::mstest::ActiveBackend() != (b))                                            \
      GTEST_SKIP() << "only under backend " << ::mstest::BackendName(b) << " (this run: " \
                   << ::mstest::BackendName(::mstest::ActiveBackend()) << "): " << why;   \
  } while (0)

#endif  // MEMSNAP_TEST_SUPPORT_H
