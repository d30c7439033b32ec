// Binary compatibility with objects built against Firefox's own headers: this program
// includes only original_api.h (C++ linkage, as the original declares the API) and is
// linked with -lmemsnap, so every call below goes through libmemsnap's Itanium-mangled
// aliases. It runs checkpoints and rewinds through them, and touches every declared
// function and member at least once (a missing alias fails the link).
//
// Self-contained on purpose (no GoogleTest, nothing from include/): each case runs in a
// forked child under a 60 s watchdog, as the suites' MS_IN_CHILD does, since a case
// write-protects the child's memory. A child reports a failure on stderr and exits 1.
// Inside a child only write(2) prints: stdio buffers are tracked memory.
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstring>

#include "original_api.h"

using namespace mozilla::recordreplay;

namespace {

void Say(const char* s) {
  ssize_t ignored = write(2, s, strlen(s));
  (void)ignored;
}

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      char msg_[256];                                                          \
      snprintf(msg_, sizeof msg_, "%s:%d: check failed: %s\n", __FILE__,       \
               __LINE__, #cond);                                               \
      Say(msg_);                                                               \
      _exit(1);                                                                \
    }                                                                          \
  } while (0)

const size_t kSize = 4 * 16384;  // whole pages at every snapshot page size

// The rewind protocol of Firefox's RestoreCheckpointAndResume: the last checkpoint, then
// `diffs` older ones, inside one disallow scope; then the free-region fixup.
void Rewind(int diffs) {
  {
    AutoDisallowMemoryChanges disallow;
    RestoreMemoryToLastSavedCheckpoint();
    for (int i = 0; i < diffs; i++) RestoreMemoryToLastSavedDiffCheckpoint();
  }
  FixupFreeRegionsAfterRewind();
}

// Three checkpoints of tracked memory from AllocateMemory, rewound one level and then
// two: every byte equals its checkpoint, untracked memory keeps its last value.
void CheckpointsAndRewinds() {
  InitializeMemorySnapshots();
  auto* tracked = static_cast<int*>(AllocateMemory(kSize, MemoryKind::Tracked));
  auto* untracked = static_cast<int*>(AllocateMemory(kSize, MemoryKind::Generic));
  CHECK(tracked != nullptr && untracked != nullptr);
  CHECK(tracked[0] == 0 && tracked[kSize / sizeof(int) - 1] == 0);
  tracked[0] = 1;
  TakeFirstMemorySnapshot();
  CHECK(MemoryRangeIsTracked(tracked, kSize));
  CHECK(!MemoryRangeIsTracked(untracked, kSize));
  tracked[0] = 2;
  tracked[100] = 20;
  TakeDiffMemorySnapshot();
  tracked[0] = 3;
  untracked[0] = 3;
  TakeDiffMemorySnapshot();
  tracked[0] = 4;
  tracked[100] = 40;
  Rewind(1);
  CHECK(tracked[0] == 2 && tracked[100] == 20);
  CHECK(untracked[0] == 3);
  tracked[0] = 5;
  Rewind(1);
  CHECK(tracked[0] == 1 && tracked[100] == 0);
  CHECK(untracked[0] == 3);
}

// EraseLastSavedDiffMemorySnapshot forgets the middle checkpoint: one diff level then
// reaches the first.
void EraseMiddleCheckpoint() {
  InitializeMemorySnapshots();
  auto* tracked = static_cast<int*>(AllocateMemory(kSize, MemoryKind::Tracked));
  tracked[0] = 1;
  TakeFirstMemorySnapshot();
  tracked[0] = 2;
  TakeDiffMemorySnapshot();
  tracked[0] = 3;
  TakeDiffMemorySnapshot();
  EraseLastSavedDiffMemorySnapshot();
  tracked[0] = 4;
  Rewind(1);
  CHECK(tracked[0] == 1);
}

// The allocation and registration functions: memory from AllocateMemoryTryAddress and
// memory the program mapped and registered itself is tracked from then on; an initial
// untracked region and an initial tracked one behave as declared.
void AllocationAndRegistration() {
  InitializeMemorySnapshots();
  void* own = mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(own != MAP_FAILED);
  AddInitialUntrackedMemoryRegion(static_cast<uint8_t*>(own), kSize);
  auto* extra = static_cast<uint8_t*>(AllocateMemory(kSize, MemoryKind::Tracked));
  AddInitialTrackedMemoryRegions(extra, kSize, false);
  CHECK(GetMemoryUsage(MemoryKind::Tracked) >= kSize);
  TakeFirstMemorySnapshot();
  CHECK(!MemoryRangeIsTracked(own, kSize));
  CHECK(MemoryRangeIsTracked(extra, kSize));

  auto* hinted = static_cast<int*>(AllocateMemoryTryAddress(nullptr, kSize, MemoryKind::Tracked));
  void* later = mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(later != MAP_FAILED);
  RegisterAllocatedMemory(later, kSize, MemoryKind::Tracked);
  CHECK(MemoryRangeIsTracked(hinted, kSize) && MemoryRangeIsTracked(later, kSize));
  CheckFixedMemory(hinted, kSize);
  hinted[0] = 7;
  static_cast<int*>(later)[0] = 8;
  static_cast<int*>(own)[0] = 9;
  TakeDiffMemorySnapshot();
  hinted[0] = 70;
  static_cast<int*>(later)[0] = 80;
  static_cast<int*>(own)[0] = 90;
  RestoreWritableFixedMemory(hinted, kSize);
  Rewind(0);
  CHECK(hinted[0] == 7 && static_cast<int*>(later)[0] == 8);
  CHECK(static_cast<int*>(own)[0] == 90);
  DeallocateMemory(hinted, kSize, MemoryKind::Tracked);
}

// HandleDirtyMemoryFault, called as a host's own handler would: true for tracked memory
// (whose page is then writable), false for memory memsnap does not track.
void FaultHandlerEntry() {
  InitializeMemorySnapshots();
  auto* tracked = static_cast<uint8_t*>(AllocateMemory(kSize, MemoryKind::Tracked));
  auto* untracked = static_cast<uint8_t*>(AllocateMemory(kSize, MemoryKind::Generic));
  TakeFirstMemorySnapshot();
  CHECK(HandleDirtyMemoryFault(tracked));
  CHECK(!HandleDirtyMemoryFault(untracked));
  tracked[0] = 1;
  Rewind(0);
  CHECK(tracked[0] == 0);
}

// MemoryMove and MemoryZero copy and clear whole 32-bit words.
void MoveAndZero() {
  InitializeMemorySnapshots();
  auto* a = static_cast<uint32_t*>(AllocateMemory(kSize, MemoryKind::Generic));
  auto* b = static_cast<uint32_t*>(AllocateMemory(kSize, MemoryKind::Generic));
  for (uint32_t i = 0; i < 64; i++) a[i] = i * 3 + 1;
  MemoryMove(b, a, 64 * sizeof(uint32_t));
  for (uint32_t i = 0; i < 64; i++) CHECK(b[i] == i * 3 + 1);
  MemoryZero(b, 32 * sizeof(uint32_t));
  CHECK(b[0] == 0 && b[31] == 0 && b[32] == 32 * 3 + 1);
}

// A class deriving from each, so that its constructor and destructor call the base-object
// variants (C2/D2) where a plain object calls the complete-object ones (C1/D1).
struct DerivedTimer : AutoTimer {
  DerivedTimer() : AutoTimer(TimerKind::Default) {}
};

struct DerivedCountdown : AutoCountdown {
  explicit DerivedCountdown(size_t aCount) : AutoCountdown(aCount) {}
};

// AutoTimer's out-of-line constructors and destructors count one hit each, which
// DumpTimers reports on stderr (read back through a pipe).
void TimersCount() {
  InitializeMemorySnapshots();
  { AutoTimer timer(TimerKind::Default); }
  { DerivedTimer derived; }
  int fds[2];
  CHECK(pipe(fds) == 0);
  int saved = dup(2);
  CHECK(saved >= 0 && dup2(fds[1], 2) == 2);
  DumpTimers();
  dup2(saved, 2);
  close(fds[1]);
  char out[4096];
  size_t n = 0;
  ssize_t r;
  while (n < sizeof out - 1 && (r = read(fds[0], out + n, sizeof out - 1 - n)) > 0) n += r;
  out[n] = 0;
  CHECK(strstr(out, "Default: 2 hits") != nullptr);
}

// AutoCountdown's constructors arm the watchdog: with a count of 1 ms that nothing
// disarms, memsnap aborts the process (main expects that death and its message). A scope
// that ended before the watchdog started has already disarmed its count through the
// destructor; had it not, the count of 1 would fire just the same.
void CountdownFires() {
  InitializeMemorySnapshots();
  { AutoCountdown disarmed(1); }
  InitializeCountdownThread();
  AutoCountdown countdown(1);
  for (;;) pause();
}

void CountdownFiresDerived() {
  InitializeMemorySnapshots();
  { DerivedCountdown disarmed(1); }
  InitializeCountdownThread();
  DerivedCountdown countdown(1);
  for (;;) pause();
}

void StartCountdownFires() {
  InitializeMemorySnapshots();
  InitializeCountdownThread();
  StartCountdown(1);
  for (;;) pause();
}

// Giving up on snapshots leaves tracked memory writable with no further faults handled:
// the write after it lands, and the process exits normally.
void GiveUp() {
  InitializeMemorySnapshots();
  auto* tracked = static_cast<int*>(AllocateMemory(kSize, MemoryKind::Tracked));
  TakeFirstMemorySnapshot();
  UnrecoverableSnapshotFailure();
  tracked[0] = 1;
  CHECK(tracked[0] == 1);
}

struct Case {
  const char* name;
  void (*body)();
  // Null: the child must exit with status 0. Otherwise memsnap must abort it (SIGABRT)
  // with this text on stderr.
  const char* abort_message;
};

const Case kCases[] = {
    {"CheckpointsAndRewinds", CheckpointsAndRewinds, nullptr},
    {"EraseMiddleCheckpoint", EraseMiddleCheckpoint, nullptr},
    {"AllocationAndRegistration", AllocationAndRegistration, nullptr},
    {"FaultHandlerEntry", FaultHandlerEntry, nullptr},
    {"MoveAndZero", MoveAndZero, nullptr},
    {"TimersCount", TimersCount, nullptr},
    {"CountdownFires", CountdownFires, "countdown expired"},
    {"CountdownFiresDerived", CountdownFiresDerived, "countdown expired"},
    {"StartCountdownFires", StartCountdownFires, "countdown expired"},
    {"GiveUp", GiveUp, nullptr},
};

// Runs one case in a forked child, its stderr collected through a pipe and echoed when
// the case fails.
bool RunCase(const Case& c) {
  int fds[2];
  if (pipe(fds) != 0) return false;
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    dup2(fds[1], 2);
    alarm(60);
    c.body();
    _exit(0);
  }
  close(fds[1]);
  static char err[1 << 16];
  size_t n = 0;
  ssize_t r;
  char chunk[4096];
  while ((r = read(fds[0], chunk, sizeof chunk)) > 0) {  // to EOF: the child never blocks
    size_t keep = (size_t)r < sizeof err - 1 - n ? (size_t)r : sizeof err - 1 - n;
    memcpy(err + n, chunk, keep);
    n += keep;
  }
  err[n] = 0;
  close(fds[0]);
  int status = 0;
  if (pid < 0 || waitpid(pid, &status, 0) != pid) return false;
  bool ok = c.abort_message == nullptr
                ? WIFEXITED(status) && WEXITSTATUS(status) == 0
                : WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT &&
                      strstr(err, c.abort_message) != nullptr;
  if (!ok) fprintf(stderr, "--- %s: status %#x, stderr:\n%s---\n", c.name, status, err);
  return ok;
}

}  // namespace

int main() {
  int failed = 0;
  for (const Case& c : kCases) {
    bool ok = RunCase(c);
    printf("%s %s\n", ok ? "PASS" : "FAIL", c.name);
    fflush(stdout);
    failed += !ok;
  }
  printf("original-ABI test: %d of %zu cases failed\n", failed, sizeof kCases / sizeof kCases[0]);
  return failed == 0 ? 0 : 1;
}
