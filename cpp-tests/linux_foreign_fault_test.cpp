// Issue 3, part 5 (suite ForeignFaultTest): faults that are not writes to tracked memory.
// Each fault (a null read and write, a write to an untracked read-only page, a read of an
// inaccessible page, a stack overflow, a bus error) is run twice in fresh children from
// the test runner: once without memsnap and once with memsnap armed (a handled tracked
// write first). Without a handler both die with the same signal; with a handler installed
// before memsnap, both calls of that handler see the same signal, code and address.
// Handlers that return (after fixing the page) or are plain (no SA_SIGINFO), and an
// ignored SIGSEGV, behave as they would without memsnap.

#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#include <cstdint>
#include <cstring>

#include "test_support.h"

using namespace mozilla::recordreplay;

namespace foreign_fault_test {

enum Fault { kNullRead, kNullWrite, kReadOnlyWrite, kProtNoneRead, kStackOverflow, kBusError, kFaults };
const char* const kNames[] = {"null read", "null write", "write to untracked read-only page",
                              "read of PROT_NONE page", "stack overflow", "bus error"};

enum Handler { kNone, kSigInfo, kPlain, kIgnore, kFixAndReturn };

struct Run {
  Fault fault;
  Handler handler;
  bool memsnap;
};

volatile uintptr_t gNull = 0;
volatile int gTracked = 0;
void* volatile gPage;  // the page the fault targets (read-only or inaccessible)
alignas(65536) char gAltStack[1 << 16];
volatile int gDepthLimit = 1 << 30;

// Writes "v\n" as hex with raw write(2): async-signal-safe.
void PutHex(uintptr_t v) {
  char b[20];
  int n = 0;
  b[n++] = '0';
  b[n++] = 'x';
  int shift = 60;
  while (shift > 0 && ((v >> shift) & 0xf) == 0) shift -= 4;
  for (; shift >= 0; shift -= 4) b[n++] = "0123456789abcdef"[(v >> shift) & 0xf];
  b[n++] = ' ';
  ssize_t ignored = write(2, b, (size_t)n);
  (void)ignored;
}

void InfoHandler(int sig, siginfo_t* si, void*) {
  PutHex((uintptr_t)sig);
  PutHex((uintptr_t)si->si_code);
  PutHex((uintptr_t)si->si_addr);
  _exit(42);
}

void PlainHandler(int sig) {
  PutHex((uintptr_t)sig);
  _exit(43);
}

void FixHandler(int, siginfo_t* si, void*) {
  // Makes the faulting page writable and returns: the instruction is retried.
  uintptr_t page = (uintptr_t)si->si_addr & ~(uintptr_t)(sysconf(_SC_PAGESIZE) - 1);
  if (mprotect((void*)page, (size_t)sysconf(_SC_PAGESIZE), PROT_READ | PROT_WRITE) != 0) _exit(44);
}

__attribute__((noinline)) int Recurse(int depth) {
  volatile char frame[1024];
  frame[0] = (char)depth;
  if (depth >= gDepthLimit) return frame[0];
  return Recurse(depth + 1) + frame[0];
}

void Install(Handler h, int sig) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sigemptyset(&sa.sa_mask);
  switch (h) {
    case kNone:
      return;
    case kSigInfo:
      sa.sa_sigaction = InfoHandler;
      sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
      break;
    case kPlain:
      sa.sa_handler = PlainHandler;
      sa.sa_flags = SA_ONSTACK;
      break;
    case kIgnore:
      sa.sa_handler = SIG_IGN;
      break;
    case kFixAndReturn:
      sa.sa_sigaction = FixHandler;
      sa.sa_flags = SA_SIGINFO;
      break;
  }
  sigaction(sig, &sa, nullptr);
}

void RunFault(void* arg) {
  const Run* r = (const Run*)arg;
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  stack_t ss;
  memset(&ss, 0, sizeof ss);
  ss.ss_sp = gAltStack;
  ss.ss_size = sizeof gAltStack;
  if (sigaltstack(&ss, nullptr) != 0) _exit(2);
  int prot = r->fault == kProtNoneRead ? PROT_NONE : PROT_READ;
  if (r->fault == kBusError) {
    int fd = (int)syscall(SYS_memfd_create, "memsnap-bus", 0);  // empty: no page behind it
    gPage = mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  } else {
    gPage = mmap(nullptr, page, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  }
  if (gPage == MAP_FAILED) _exit(2);
  Install(r->handler, SIGSEGV);
  Install(r->handler, SIGBUS);
  if (r->memsnap) {
    InitializeMemorySnapshots();
    TakeFirstMemorySnapshot();
    gTracked = 1;  // a handled tracked write first
    if (!MemoryRangeIsTracked((void*)&gTracked, sizeof gTracked)) _exit(3);
    if (MemoryRangeIsTracked(gPage, page)) _exit(3);
  }
  switch (r->fault) {
    case kNullRead:
      (void)*(volatile int*)gNull;
      break;
    case kNullWrite:
      *(volatile int*)gNull = 1;
      break;
    case kReadOnlyWrite:
      *(volatile int*)gPage = 7;
      break;
    case kProtNoneRead:
      (void)*(volatile int*)gPage;
      break;
    case kStackOverflow:
      Recurse(0);
      break;
    case kBusError:
      *(volatile int*)gPage = 7;
      break;
    default:
      break;
  }
  if (r->handler == kFixAndReturn) {
    // The handler fixed the page and returned; the write landed, and memsnap still works.
    if (*(volatile int*)gPage != 7) _exit(5);
    if (r->memsnap) {
      TakeDiffMemorySnapshot();
      gTracked = 2;
      mstest::Rewind(0);
      if (gTracked != 1) _exit(6);
    }
    _exit(0);
  }
  _exit(4);  // the fault did not stop the program
}

struct Outcome {
  int status;
  char out[256];
};

Outcome Observe(Fault f, Handler h, bool memsnap) {
  Outcome o;
  Run r = {f, h, memsnap};
  o.status = mstest::StatusAndStderrOfChild(RunFault, &r, o.out, sizeof o.out);
  return o;
}

int ExpectedSignal(Fault f) { return f == kBusError ? SIGBUS : SIGSEGV; }

// A status alone accepts any death by that signal, a crash inside memsnap's handler
// included. Traced runs (mstest::TraceDeath) show which fault killed the child.
Run gTracedRun;
void RunTracedFault() { RunFault(&gTracedRun); }

mstest::TracedDeath Trace(Fault f, Handler h, bool memsnap) {
  gTracedRun = {f, h, memsnap};
  return mstest::TraceDeath(RunTracedFault);
}

// With memsnap the fatal fault is the one without it: the same signals, raised by the
// program's own instruction (memsnap's handler passed it on and did not fault itself), at
// the same address (a stack overflow's depends on the frame: just below the stack).
void ExpectSameFatalFault(Fault f, Handler h) {
  const mstest::TracedDeath plain = Trace(f, h, false);
  const mstest::TracedDeath with = Trace(f, h, true);
  ASSERT_TRUE(plain.traced && with.traced) << plain.why << " " << with.why;
  char both[1024];
  snprintf(both, sizeof both,
           "%s: without memsnap signal %d after fault %d at %#lx in %s; with: signal %d after "
           "fault %d at %#lx by pc %#lx in %s",
           kNames[f], plain.termsig, plain.fault_sig, (unsigned long)plain.addr,
           plain.pc_object, with.termsig, with.fault_sig, (unsigned long)with.addr,
           (unsigned long)with.pc, with.pc_object);
  EXPECT_EQ(plain.termsig, ExpectedSignal(f)) << both;
  EXPECT_EQ(with.termsig, plain.termsig) << both;
  EXPECT_EQ(with.fault_sig, plain.fault_sig) << both;
  EXPECT_TRUE(mstest::FaultedInObjectOf(with, (const void*)&RunFault)) << both;
  if (f == kStackOverflow) {
    EXPECT_TRUE(with.addr < with.stack_low && with.stack_low - with.addr <= (1u << 20)) << both;
  } else {
    EXPECT_EQ(with.addr, plain.addr) << both;
  }
}

TEST(ForeignFaultTest, SameDeathSignalWithoutHandler) {
  for (int f = 0; f < kFaults; f++) {
    Outcome plain = Observe((Fault)f, kNone, false);
    Outcome with = Observe((Fault)f, kNone, true);
    ASSERT_TRUE(WIFSIGNALED(plain.status)) << kNames[f] << ": " << plain.out;
    EXPECT_EQ(WTERMSIG(plain.status), ExpectedSignal((Fault)f)) << kNames[f];
    ASSERT_TRUE(WIFSIGNALED(with.status)) << kNames[f] << " with memsnap: status " << with.status << " " << with.out;
    EXPECT_EQ(WTERMSIG(with.status), WTERMSIG(plain.status)) << kNames[f];
    EXPECT_STREQ(with.out, "") << kNames[f];  // memsnap printed nothing
    ExpectSameFatalFault((Fault)f, kNone);
  }
}

TEST(ForeignFaultTest, PreviousSigInfoHandlerSeesTheSameFault) {
  for (int f = 0; f < kFaults; f++) {
    Outcome plain = Observe((Fault)f, kSigInfo, false);
    Outcome with = Observe((Fault)f, kSigInfo, true);
    ASSERT_TRUE(WIFEXITED(plain.status) && WEXITSTATUS(plain.status) == 42) << kNames[f];
    ASSERT_TRUE(WIFEXITED(with.status) && WEXITSTATUS(with.status) == 42)
        << kNames[f] << " with memsnap: status " << with.status << " " << with.out;
    if (f == kStackOverflow) {
      // The faulting address depends on the frame the overflow hit: compare signal and code.
      EXPECT_EQ(strncmp(with.out, plain.out, 8), 0) << kNames[f] << ": " << with.out << " vs " << plain.out;
    } else {
      EXPECT_STREQ(with.out, plain.out) << kNames[f];
    }
  }
}

TEST(ForeignFaultTest, PreviousPlainHandlerIsCalled) {
  for (int f = 0; f < kFaults; f++) {
    Outcome plain = Observe((Fault)f, kPlain, false);
    Outcome with = Observe((Fault)f, kPlain, true);
    ASSERT_TRUE(WIFEXITED(plain.status) && WEXITSTATUS(plain.status) == 43) << kNames[f];
    ASSERT_TRUE(WIFEXITED(with.status) && WEXITSTATUS(with.status) == 43) << kNames[f] << " " << with.out;
    EXPECT_STREQ(with.out, plain.out) << kNames[f];
  }
}

TEST(ForeignFaultTest, IgnoredSigsegvStillKills) {
  for (int f : {kNullWrite, kReadOnlyWrite}) {
    Outcome plain = Observe((Fault)f, kIgnore, false);
    Outcome with = Observe((Fault)f, kIgnore, true);
    ASSERT_TRUE(WIFSIGNALED(plain.status)) << kNames[f];
    ASSERT_TRUE(WIFSIGNALED(with.status)) << kNames[f] << " " << with.out;
    EXPECT_EQ(WTERMSIG(with.status), WTERMSIG(plain.status)) << kNames[f];
    EXPECT_EQ(WTERMSIG(with.status), SIGSEGV);
    ExpectSameFatalFault((Fault)f, kIgnore);
  }
}

TEST(ForeignFaultTest, HandlerThatFixesThePageAndReturns) {
  Outcome plain = Observe(kReadOnlyWrite, kFixAndReturn, false);
  Outcome with = Observe(kReadOnlyWrite, kFixAndReturn, true);
  EXPECT_TRUE(WIFEXITED(plain.status) && WEXITSTATUS(plain.status) == 0) << plain.status;
  EXPECT_TRUE(WIFEXITED(with.status) && WEXITSTATUS(with.status) == 0) << with.status << " " << with.out;
}

}  // namespace foreign_fault_test
