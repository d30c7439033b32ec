// The backend probe of `make test`: takes a first snapshot of one registered page under
// whatever MEMSNAP_BACKEND asks for and prints the backend memsnap chose. A backend this
// kernel or process cannot provide makes memsnap abort with its one-line reason, which the
// Makefile prints when it skips that backend. Not part of the gtest binary.
#include <cstdio>
#include <cstring>

#include "MemorySnapshot.h"

using namespace mozilla::recordreplay;

int main() {
  InitializeMemorySnapshots();
  if (memsnap_set_tracking_mode(MemsnapTrackingMode::RegisteredOnly) != MemsnapStatus::Ok) return 2;
  AllocateMemory(memsnap_page_size(), MemoryKind::Tracked);
  TakeFirstMemorySnapshot();
  MemsnapStats s;
  memset(&s, 0, sizeof s);
  s.struct_size = sizeof s;
  if (memsnap_get_stats(&s) != MemsnapStatus::Ok) return 2;
  switch (s.backend) {
    case MemsnapBackend::LinuxMprotect: puts("mprotect"); break;
    case MemsnapBackend::LinuxUffd: puts("uffd"); break;
    case MemsnapBackend::LinuxUffdAsync: puts("uffd-async"); break;
    case MemsnapBackend::MacExceptionPort:
    case MemsnapBackend::MacSignal: puts("auto"); break;
    default: puts("inactive"); return 3;
  }
  return 0;
}
