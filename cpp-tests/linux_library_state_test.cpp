// Issue 15 (suite LibraryStateTest): libmemsnap's own statics are the library's state, not
// the host's. A static written after the first snapshot must neither fault nor be rewound
// with the host's memory. The write here is the table of signal stacks libmemsnap's
// sigaltstack keeps: rewound, it forgets a signal stack registered after the checkpoint,
// and the next checkpoint tracks that stack as ordinary new memory (a signal delivered on
// it then writes protected memory, or is rewound under the thread's feet).

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>

#include "test_support.h"

using namespace mozilla::recordreplay;

namespace library_state_test {

constexpr size_t kStackBytes = 64 * 1024;

struct Worker {
  int cmd[2];
  int reply[2];
};

// Idle in read() between commands; on a command, maps a signal stack and installs it.
void* WorkerMain(void* arg) {
  Worker* w = static_cast<Worker*>(arg);
  long c;
  while (read(w->cmd[0], &c, sizeof c) == (ssize_t)sizeof c && c > 0) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    long answer = 0;
    if (p != MAP_FAILED) {
      stack_t ss = {};
      ss.ss_sp = p;
      ss.ss_size = kStackBytes;
      if (sigaltstack(&ss, nullptr) == 0) answer = reinterpret_cast<long>(p);
    }
    if (write(w->reply[1], &answer, sizeof answer) != (ssize_t)sizeof answer) break;
  }
  return nullptr;
}

void SignalStackScenario() {
  InitializeMemorySnapshots();
  Worker w;
  MS_CHECK(pipe(w.cmd) == 0 && pipe(w.reply) == 0);
  pthread_t t;
  MS_CHECK(pthread_create(&t, nullptr, WorkerMain, &w) == 0);
  TakeFirstMemorySnapshot();

  long c = 1, stack = 0;
  MS_CHECK(write(w.cmd[1], &c, sizeof c) == (ssize_t)sizeof c);
  MS_CHECK(read(w.reply[0], &stack, sizeof stack) == (ssize_t)sizeof stack);
  MS_CHECK(stack != 0);
  uint8_t* p = reinterpret_cast<uint8_t*>(stack);

  TakeDiffMemorySnapshot();
  MS_CHECK(!MemoryRangeIsTracked(p, kStackBytes));
  mstest::Rewind(1);  // back to the first snapshot, before sigaltstack ran
  TakeDiffMemorySnapshot();
  // The worker's signal stack is still installed: memsnap must still know it.
  MS_CHECK(!MemoryRangeIsTracked(p, kStackBytes));
}

TEST(LibraryStateTest, StaticWrittenAfterFirstSnapshotIsNotRewound) {
  MS_IN_CHILD(SignalStackScenario());
}

}  // namespace library_state_test
