// A plugin of build/memsnap-lazy-tests, dlopen'd by it after InitializeMemorySnapshots:
// linked with -Wl,-z,lazy, so its PLT slots for memsnap's functions are bound lazily
// unless memsnap binds them first (at the next snapshot, for objects loaded since the
// last one). Its cell is tracked memory of an object loaded late.
#include "MemorySnapshotHelpers.h"

using namespace mozilla::recordreplay;

extern "C" {

volatile long lazy_plugin_cell = 0;

// Rewinds `levels` diff checkpoints past the newest, calling memsnap through this
// object's own PLT slots inside one disallow scope; whether the cell is tracked, asked
// in that scope too.
__attribute__((visibility("default"))) bool lazy_plugin_rewind(int levels) {
  bool tracked;
  {
    AutoDisallowMemoryChanges disallow;
    RestoreMemoryToLastSavedCheckpoint();
    for (int i = 0; i < levels; i++) RestoreMemoryToLastSavedDiffCheckpoint();
    tracked = MemoryRangeIsTracked((void*)&lazy_plugin_cell, sizeof lazy_plugin_cell);
  }
  FixupFreeRegionsAfterRewind();
  return tracked;
}

// Times nothing: calls memsnap_timer_record through this object's PLT, which the test
// program defines too (searched first, its definition is the one ld.so binds).
__attribute__((visibility("default"))) void lazy_plugin_time() {
  memsnap_timer_record(TimerKind::Default, 0.0);
}

}  // extern "C"
