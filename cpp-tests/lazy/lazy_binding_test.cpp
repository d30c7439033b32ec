// A host linked with lazy binding (issue 11, case 4; suite LazyBindingTest). This binary
// and its plugin (plugin.cpp) are linked with -Wl,-z,lazy and without -z now, so a PLT
// slot naming a memsnap function is bound by ld.so's resolver at the first call, and that
// write goes to the caller's GOT, which is tracked. Every scenario makes its first calls
// of memsnap functions inside one AutoDisallowMemoryChanges scope. Before memsnap bound
// those slots itself, mprotect and uffd aborted with "the thread that disallowed memory
// changes wrote tracked memory" and uffd-async refused the diff restore with "pages were
// written since the newest checkpoint".
//
// The runner calls no memsnap function (a forked child inherits the runner's bound
// slots); the backend is the pass's MEMSNAP_BACKEND, and whether it is available here is
// asked in a child. Expected values live on the stack.

#include <dlfcn.h>
#include <elf.h>
#include <link.h>

#include <cstdint>
#include <cstring>

#include "../test_support.h"

using namespace mozilla::recordreplay;

namespace lazy_test {

// Functions whose first call each scenario makes inside a disallow scope: memsnap's own,
// and libc names libmemsnap interposes (searched before libc, it is where ld.so binds
// them).
const char* const kInScope[] = {
    "RestoreMemoryToLastSavedCheckpoint",
    "RestoreMemoryToLastSavedDiffCheckpoint",
    "MemoryRangeIsTracked",
    "memsnap_get_stats",
    "GetMemoryUsage",
    "mprotect",
    "madvise",
};

#if defined(__x86_64__)
constexpr uint32_t kJumpSlot = R_X86_64_JUMP_SLOT;
#elif defined(__aarch64__)
constexpr uint32_t kJumpSlot = R_AARCH64_JUMP_SLOT;
#endif

struct SlotQuery {
  const char* object;  // suffix of the object's path; "" for the program itself
  const char* name;
  uintptr_t* slot;
  bool eager;  // the object asks for eager binding
};

// Finds the object's jump slot for q->name. glibc rewrites most d_ptr entries of a
// relocated object to absolute addresses; one below the load bias is still relative.
int FindSlot(struct dl_phdr_info* info, size_t, void* data) {
  SlotQuery* q = (SlotQuery*)data;
  const char* path = info->dlpi_name ? info->dlpi_name : "";
  size_t plen = strlen(path), slen = strlen(q->object);
  bool match = *q->object ? plen >= slen && strcmp(path + plen - slen, q->object) == 0 : plen == 0;
  if (!match) return 0;
  const uintptr_t bias = info->dlpi_addr;
  const ElfW(Dyn)* dyn = nullptr;
  for (int i = 0; i < info->dlpi_phnum; i++) {
    if (info->dlpi_phdr[i].p_type == PT_DYNAMIC) dyn = (const ElfW(Dyn)*)(bias + info->dlpi_phdr[i].p_vaddr);
  }
  if (!dyn) return 1;
  auto at = [bias](uintptr_t v) { return v < bias ? v + bias : v; };
  uintptr_t jmprel = 0, symtab = 0, strtab = 0;
  size_t pltrelsz = 0;
  for (; dyn->d_tag != DT_NULL; dyn++) {
    switch (dyn->d_tag) {
      case DT_JMPREL: jmprel = at(dyn->d_un.d_ptr); break;
      case DT_PLTRELSZ: pltrelsz = dyn->d_un.d_val; break;
      case DT_SYMTAB: symtab = at(dyn->d_un.d_ptr); break;
      case DT_STRTAB: strtab = at(dyn->d_un.d_ptr); break;
      case DT_BIND_NOW: q->eager = true; break;
      case DT_FLAGS: q->eager |= (dyn->d_un.d_val & DF_BIND_NOW) != 0; break;
      case DT_FLAGS_1: q->eager |= (dyn->d_un.d_val & DF_1_NOW) != 0; break;
    }
  }
  if (!jmprel || !symtab || !strtab) return 1;
  const ElfW(Rela)* rela = (const ElfW(Rela)*)jmprel;
  for (size_t i = 0; i < pltrelsz / sizeof *rela; i++) {
    if (ELF64_R_TYPE(rela[i].r_info) != kJumpSlot) continue;
    const ElfW(Sym)* sym = (const ElfW(Sym)*)symtab + ELF64_R_SYM(rela[i].r_info);
    if (strcmp((const char*)strtab + sym->st_name, q->name) == 0) {
      q->slot = (uintptr_t*)(bias + rela[i].r_offset);
      break;
    }
  }
  return 1;
}

// The object's jump slot for `name` (null when it has none); *eager when the object asks
// for eager binding.
uintptr_t* Slot(const char* object, const char* name, bool* eager = nullptr) {
  SlotQuery q = {object, name, nullptr, false};
  dl_iterate_phdr(FindSlot, &q);
  if (eager) *eager = q.eager;
  return q.slot;
}

// Where ld.so would bind `name`: memsnap's function.
uintptr_t Target(const char* name) { return (uintptr_t)dlsym(RTLD_DEFAULT, name); }

// This pass's backend, as MEMSNAP_BACKEND names it (unset: auto).
int RequestedBackend() {
  const char* env = getenv("MEMSNAP_BACKEND");
  if (env && strcmp(env, "mprotect") == 0) return 1;
  if (env && strcmp(env, "uffd") == 0) return 2;
  if (env && strcmp(env, "uffd-async") == 0) return 3;
  return 0;
}

bool BackendAvailable() {
  return mstest::ChildSays([] {
    _exit(memsnap_set_backend(RequestedBackend()) == MemsnapStatus::Ok ? 0 : 1);
  });
}

#define LAZY_REQUIRE_BACKEND()                                                          \
  do {                                                                                  \
    if (!::lazy_test::BackendAvailable())                                               \
      GTEST_SKIP() << "backend " << (getenv("MEMSNAP_BACKEND") ? getenv("MEMSNAP_BACKEND") \
                                                                  : "auto")             \
                   << " is not available here";                                         \
  } while (0)

}  // namespace lazy_test

// This program's own memsnap_timer_record, exported (see the Makefile): searched before
// libmemsnap, it is where ld.so binds the plugin's calls, so memsnap must leave the
// plugin's slot for it alone. Counts its calls (no rewind follows them).
static volatile int g_own_timer_calls = 0;
namespace mozilla {
namespace recordreplay {
void memsnap_timer_record(TimerKind, double) { g_own_timer_calls = g_own_timer_calls + 1; }
}  // namespace recordreplay
}  // namespace mozilla

namespace lazy_test {

// A tracked cell in this program's .bss, a page of its own.
alignas(65536) volatile long g_cell[8192];

// ---------------------------------------------------------------------------------------

void InitBindsHostSlots() {
  InitializeMemorySnapshots();
  for (const char* name : kInScope) {
    uintptr_t* slot = Slot("", name);
    MS_CHECK(slot != nullptr);
    if (*slot != Target(name)) mstest::ms_say("%s: slot not bound at initialization\n", name);
    MS_CHECK(*slot == Target(name));
  }
}

// The original rewind protocol, with the queries a host might make in the same scope.
void RewindInOneScope() {
  InitializeMemorySnapshots();
  g_cell[0] = 1;
  TakeFirstMemorySnapshot();
  g_cell[0] = 2;
  TakeDiffMemorySnapshot();
  g_cell[0] = 3;
  bool tracked;
  size_t usage;
  MemsnapStatus status;
  MemsnapStats s;
  memset(&s, 0, sizeof s);
  s.struct_size = sizeof s;
  {
    AutoDisallowMemoryChanges disallow;
    RestoreMemoryToLastSavedCheckpoint();
    RestoreMemoryToLastSavedDiffCheckpoint();
    tracked = MemoryRangeIsTracked((void*)g_cell, sizeof g_cell);
    status = memsnap_get_stats(&s);
    usage = GetMemoryUsage(MemoryKind::Generic);
  }
  FixupFreeRegionsAfterRewind();
  MS_CHECK_EQ(g_cell[0], 1);
  MS_CHECK(tracked);
  MS_CHECK(status == MemsnapStatus::Ok);
  MS_CHECK_EQ(s.rewinds, 2);
  MS_CHECK_EQ(s.saved_checkpoints, 1);
  MS_CHECK(usage > 0);
  MS_CHECK(mstest::BackendMatchesRequest(s.backend));
}

// libc names libmemsnap interposes, first called inside a scope on untracked memory
// (which the scope allows), before the rewind.
void InterposedCallsInScope() {
  InitializeMemorySnapshots();
  const size_t page = mstest::SnapshotPage();
  void* scratch = AllocateMemory(page, MemoryKind::Generic);
  g_cell[0] = 1;
  TakeFirstMemorySnapshot();
  g_cell[0] = 2;
  TakeDiffMemorySnapshot();
  g_cell[0] = 3;
  int ro, rw, advised;
  {
    AutoDisallowMemoryChanges disallow;
    ro = mprotect(scratch, page, PROT_READ);
    rw = mprotect(scratch, page, PROT_READ | PROT_WRITE);
    advised = madvise(scratch, page, MADV_WILLNEED);
    RestoreMemoryToLastSavedCheckpoint();
    RestoreMemoryToLastSavedDiffCheckpoint();
  }
  FixupFreeRegionsAfterRewind();
  MS_CHECK_EQ(ro, 0);
  MS_CHECK_EQ(rw, 0);
  MS_CHECK_EQ(advised, 0);
  MS_CHECK_EQ(g_cell[0], 1);
  *(volatile char*)scratch = 1;  // writable again
}

// Queries alone in one scope, then a rewind in another: no restore runs in between to
// hide (or, under uffd-async, rewind) a write to the GOT.
void QueriesInScope() {
  InitializeMemorySnapshots();
  g_cell[0] = 1;
  TakeFirstMemorySnapshot();
  g_cell[0] = 2;
  bool tracked;
  MemsnapStatus status;
  MemsnapStats s;
  memset(&s, 0, sizeof s);
  s.struct_size = sizeof s;
  {
    AutoDisallowMemoryChanges disallow;
    tracked = MemoryRangeIsTracked((void*)g_cell, sizeof g_cell);
    status = memsnap_get_stats(&s);
  }
  TakeDiffMemorySnapshot();
  g_cell[0] = 3;
  mstest::Rewind(1);
  MS_CHECK_EQ(g_cell[0], 1);
  MS_CHECK(tracked);
  MS_CHECK(status == MemsnapStatus::Ok);
  MS_CHECK(mstest::BackendMatchesRequest(s.backend));
}

// A plugin dlopen'd after initialization rewinds through its own PLT slots, which
// memsnap binds at the next snapshot. Loaded before the first snapshot, it rewinds to
// that snapshot (under uffd-async that restore alone would also undo the resolver's
// writes, so only mprotect and uffd failed there); loaded between checkpoints, it rewinds
// to the checkpoint that followed the load.
struct Plugin {
  void* handle;
  bool (*rewind)(int levels);  // lazy_plugin_rewind
  volatile long* cell;
};

// Loads the plugin (found beside this program) and checks that its slots start unbound.
Plugin LoadPlugin() {
  char path[4096];
  ssize_t n = readlink("/proc/self/exe", path, sizeof path - 64);
  MS_CHECK(n > 0);
  path[n] = 0;
  strcpy(strrchr(path, '/') + 1, "libmemsnap-lazy-plugin.so");
  void* handle = dlopen(path, RTLD_LAZY | RTLD_LOCAL);
  if (!handle) mstest::ms_say("dlopen %s: %s\n", path, dlerror());
  MS_CHECK(handle != nullptr);
  Plugin p = {handle, (bool (*)(int))dlsym(handle, "lazy_plugin_rewind"),
              (volatile long*)dlsym(handle, "lazy_plugin_cell")};
  MS_CHECK(p.rewind != nullptr && p.cell != nullptr);
  bool eager = true;
  uintptr_t* slot = Slot("libmemsnap-lazy-plugin.so", "RestoreMemoryToLastSavedCheckpoint", &eager);
  MS_CHECK(slot != nullptr);
  MS_CHECK(!eager);
  MS_CHECK(*slot != Target("RestoreMemoryToLastSavedCheckpoint"));
  return p;
}

void PluginRewinds(bool before_first) {
  InitializeMemorySnapshots();
  if (!before_first) TakeFirstMemorySnapshot();
  Plugin p = LoadPlugin();
  volatile long* cell = p.cell;
  auto rewind = p.rewind;
  *cell = 5;
  g_cell[0] = 1;
  bool tracked;
  if (before_first) {
    TakeFirstMemorySnapshot();
    *cell = 6;
    g_cell[0] = 2;
    tracked = rewind(0);
  } else {
    TakeDiffMemorySnapshot();
    *cell = 6;
    g_cell[0] = 2;
    TakeDiffMemorySnapshot();
    *cell = 7;
    g_cell[0] = 3;
    tracked = rewind(1);
  }
  MS_CHECK_EQ(*cell, 5);
  MS_CHECK_EQ(g_cell[0], 1);
  MS_CHECK(tracked);
}

// A rewind to before a dlopen takes ld.so back to before it (its data is tracked), and a
// program that runs forward again loads the plugin afresh, at a new address with fresh
// slots: memsnap's record of what it bound must go back with ld.so, or the reload would
// look like no change.
void PluginReloadedAfterRewind() {
  InitializeMemorySnapshots();
  g_cell[0] = 1;
  TakeFirstMemorySnapshot();
  Plugin first = LoadPlugin();
  *first.cell = 4;
  TakeDiffMemorySnapshot();
  g_cell[0] = 2;
  mstest::Rewind(1);
  MS_CHECK_EQ(g_cell[0], 1);
  Plugin again = LoadPlugin();
  MS_CHECK(again.cell != first.cell);
  *again.cell = 5;
  TakeDiffMemorySnapshot();
  *again.cell = 6;
  TakeDiffMemorySnapshot();
  *again.cell = 7;
  MS_CHECK(again.rewind(1));
  MS_CHECK_EQ(*again.cell, 5);
}

// Unloaded and loaded again between checkpoints, the plugin usually lands where it was,
// its link map too: ld.so's list reads as before, but the slots are fresh and lazy, which
// memsnap sees in the slot it bound there last time.
void PluginReloadedAfterDlclose() {
  InitializeMemorySnapshots();
  TakeFirstMemorySnapshot();
  Plugin first = LoadPlugin();
  *first.cell = 4;
  TakeDiffMemorySnapshot();
  MS_CHECK_EQ(dlclose(first.handle), 0);
  Plugin again = LoadPlugin();
  if (again.cell != first.cell)
    mstest::ms_say("note: the plugin was loaded elsewhere the second time; the same-place case "
                   "is not exercised\n");
  *again.cell = 5;
  TakeDiffMemorySnapshot();
  *again.cell = 6;
  TakeDiffMemorySnapshot();
  *again.cell = 7;
  MS_CHECK(again.rewind(1));
  MS_CHECK_EQ(*again.cell, 5);
}

// A name an object searched before libmemsnap defines (here the program) is bound there
// by ld.so; memsnap leaves the plugin's lazy slot for it alone.
void ShadowedNameLeftToLdso() {
  InitializeMemorySnapshots();
  Plugin p = LoadPlugin();
  bool eager = true;
  uintptr_t* slot = Slot("libmemsnap-lazy-plugin.so", "memsnap_timer_record", &eager);
  MS_CHECK(slot != nullptr);
  void* lib = dlopen("libmemsnap.so", RTLD_NOLOAD | RTLD_LAZY);
  MS_CHECK(lib != nullptr);
  const uintptr_t memsnaps = (uintptr_t)dlsym(lib, "memsnap_timer_record");
  MS_CHECK(memsnaps != 0 && memsnaps != (uintptr_t)&mozilla::recordreplay::memsnap_timer_record);
  TakeFirstMemorySnapshot();  // binds the plugin's other slots
  MS_CHECK(*Slot("libmemsnap-lazy-plugin.so", "RestoreMemoryToLastSavedCheckpoint") ==
           Target("RestoreMemoryToLastSavedCheckpoint"));
  MS_CHECK(*slot != memsnaps);
  auto time = (void (*)())dlsym(p.handle, "lazy_plugin_time");
  MS_CHECK(time != nullptr);
  time();
  MS_CHECK_EQ(g_own_timer_calls, 1);
  MS_CHECK(*slot == (uintptr_t)&mozilla::recordreplay::memsnap_timer_record);
}

}  // namespace lazy_test

using namespace lazy_test;

// The premise of every other test here: this program binds memsnap's functions lazily,
// and none is bound before the program calls it.
TEST(LazyBindingTest, HostIsLinkedLazily) {
  const char* bind_now = getenv("LD_BIND_NOW");
  ASSERT_FALSE(bind_now && *bind_now) << "LD_BIND_NOW is set: nothing here binds lazily";
  for (const char* name : kInScope) {
    bool eager = true;
    uintptr_t* slot = Slot("", name, &eager);
    ASSERT_NE(slot, nullptr) << name << " has no jump slot (built with -fno-plt?)";
    EXPECT_FALSE(eager) << "linked with -z now";
    EXPECT_NE(Target(name), 0u) << name;
    EXPECT_NE(*slot, Target(name)) << name << " is bound before its first call";
  }
}

TEST(LazyBindingTest, InitializeBindsHostSlots) { MS_IN_CHILD(InitBindsHostSlots()); }

TEST(LazyBindingTest, FirstCallsInsideDisallowScopeRewind) {
  LAZY_REQUIRE_BACKEND();
  MS_IN_CHILD(RewindInOneScope());
}

TEST(LazyBindingTest, FirstInterposedCallsInsideDisallowScope) {
  LAZY_REQUIRE_BACKEND();
  MS_IN_CHILD(InterposedCallsInScope());
}

TEST(LazyBindingTest, FirstQueriesInsideDisallowScope) {
  LAZY_REQUIRE_BACKEND();
  MS_IN_CHILD(QueriesInScope());
}

TEST(LazyBindingTest, PluginLoadedBeforeFirstSnapshot) {
  LAZY_REQUIRE_BACKEND();
  MS_IN_CHILD(PluginRewinds(true));
}

TEST(LazyBindingTest, PluginLoadedBetweenCheckpoints) {
  LAZY_REQUIRE_BACKEND();
  MS_IN_CHILD(PluginRewinds(false));
}

TEST(LazyBindingTest, PluginReloadedAfterRewind) {
  LAZY_REQUIRE_BACKEND();
  MS_IN_CHILD(PluginReloadedAfterRewind());
}

TEST(LazyBindingTest, PluginReloadedAfterDlclose) {
  LAZY_REQUIRE_BACKEND();
  MS_IN_CHILD(PluginReloadedAfterDlclose());
}

TEST(LazyBindingTest, NameDefinedBeforeLibmemsnapIsLeftToLdso) {
  MS_IN_CHILD(ShadowedNameLeftToLdso());
}
