// An outside consumer of the installed package (make test-package): built with the flags
// of `pkg-config --cflags --libs memsnap` alone (and through CMake's find_package), it
// includes the installed headers the way a host does and checks one checkpoint and
// rewind. It is its own process, so its write protection affects nothing else.
#include <unistd.h>

#include <cstdio>
#include <cstring>

#include "MemorySnapshotHelpers.h"

using namespace mozilla::recordreplay;

static void Fail(const char* what) {
  ssize_t ignored = write(2, what, strlen(what));
  (void)ignored;
  _exit(1);
}

int main() {
  InitializeMemorySnapshots();
  auto* tracked = static_cast<int*>(AllocateMemory(1 << 16, MemoryKind::Tracked));
  tracked[0] = 1;
  TakeFirstMemorySnapshot();
  tracked[0] = 2;
  {
    AutoDisallowMemoryChanges disallow;
    RestoreMemoryToLastSavedCheckpoint();
  }
  FixupFreeRegionsAfterRewind();
  if (tracked[0] != 1) Fail("memsnap-consumer: the rewind did not restore the checkpoint\n");
  const char ok[] = "memsnap-consumer: checkpoint and rewind through the installed package\n";
  ssize_t ignored = write(1, ok, sizeof ok - 1);
  (void)ignored;
  return 0;
}
