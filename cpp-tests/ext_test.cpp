// memsnap extensions (memsnap_*): statuses, statistics and the effects of each setting.
//
// Extensions report failure with a MemsnapStatus instead of aborting. Every scenario
// runs in a forked child (MS_IN_CHILD) and initializes memsnap itself; values that must
// survive a rewind live on the stack (untracked), and output after the first snapshot
// goes through ms_say only.

#include <cstddef>
#include "test_support.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

using namespace mozilla::recordreplay;

namespace {

using mstest::Stats;

size_t Page() { return mstest::SnapshotPage(); }

uintptr_t HighPage() { return ~(uintptr_t)0 & ~(uintptr_t)(Page() - 1); }

// Tracked in whole-process mode, untracked in registered-only mode.
volatile int gGlobal = 0;

// Every scenario that initializes memsnap: a hang (e.g. a restore worker that is never
// woken) kills the child with SIGALRM instead of blocking the suite.
void Init() {
  mstest::Alarm(30);
  InitializeMemorySnapshots();
}


// Writes `value` into the first word of each of `pages` pages at `base`.
void Touch(void* base, size_t pages, uint32_t value) {
  for (size_t i = 0; i < pages; i++) {
    *(volatile uint32_t*)((char*)base + i * Page()) = value;
  }
}

// Fills every page at `base` with words that depend on the page and `gen`.
void Fill(void* base, size_t pages, uint32_t gen) {
  size_t words = Page() / 4;
  for (size_t i = 0; i < pages; i++) {
    uint32_t* w = (uint32_t*)((char*)base + i * Page());
    for (size_t j = 0; j < words; j += 97) w[j] = gen * 100000u + (uint32_t)i * 7u + (uint32_t)j;
    w[words - 1] = gen * 100000u + (uint32_t)i;
  }
}

// Reads back a Fill pattern (gen 0 means the zeroed, never-filled state).
bool Holds(const void* base, size_t pages, uint32_t gen) {
  size_t words = Page() / 4;
  for (size_t i = 0; i < pages; i++) {
    const uint32_t* w = (const uint32_t*)((const char*)base + i * Page());
    for (size_t j = 0; j < words; j += 97) {
      uint32_t want = gen == 0 ? 0 : gen * 100000u + (uint32_t)i * 7u + (uint32_t)j;
      if (w[j] != want) return false;
    }
    if (w[words - 1] != (gen == 0 ? 0 : gen * 100000u + (uint32_t)i)) return false;
  }
  return true;
}

// ---- Statuses ------------------------------------------------------------------------

void AllNotInitialized() {
  char buf[64];
  MS_CHECK(memsnap_set_tracking_mode(MemsnapTrackingMode::RegisteredOnly) == MemsnapStatus::NotInitialized);
  MS_CHECK(memsnap_track_region(buf, sizeof buf) == MemsnapStatus::NotInitialized);
  MS_CHECK(memsnap_untrack_region(buf, sizeof buf) == MemsnapStatus::NotInitialized);
  MS_CHECK(memsnap_set_restore_threads(2) == MemsnapStatus::NotInitialized);
  MS_CHECK(memsnap_set_pin_allocator(false) == MemsnapStatus::NotInitialized);
  MS_CHECK(memsnap_prepare_write(buf, sizeof buf) == MemsnapStatus::NotInitialized);
  MemsnapStats s;
  memset(&s, 0, sizeof s);
  s.struct_size = sizeof s;
  MS_CHECK(memsnap_get_stats(&s) == MemsnapStatus::NotInitialized);
  MS_CHECK_EQ(memsnap_page_size(), 0);
  // Still possible to initialize afterwards: nothing above created state.
  Init();
  MS_CHECK_EQ(memsnap_page_size(), Page());
}

void SettersAlreadyStarted() {
  Init();
  void* p = AllocateMemory(Page(), MemoryKind::Generic);
  TakeFirstMemorySnapshot();
  MS_CHECK(memsnap_set_tracking_mode(MemsnapTrackingMode::RegisteredOnly) == MemsnapStatus::AlreadyStarted);
  MS_CHECK(memsnap_set_tracking_mode(MemsnapTrackingMode::WholeProcess) == MemsnapStatus::AlreadyStarted);
  MS_CHECK(memsnap_track_region(p, Page()) == MemsnapStatus::AlreadyStarted);
  MS_CHECK(memsnap_untrack_region(p, Page()) == MemsnapStatus::AlreadyStarted);
  MS_CHECK(memsnap_set_restore_threads(1) == MemsnapStatus::AlreadyStarted);
  MS_CHECK(memsnap_set_pin_allocator(true) == MemsnapStatus::AlreadyStarted);
  MS_CHECK(memsnap_set_backend(0) == MemsnapStatus::AlreadyStarted);
  MS_CHECK(memsnap_set_backend(1) == MemsnapStatus::AlreadyStarted);
  // Not setters: still Ok after the first snapshot.
  MemsnapStats s = Stats();
  MS_CHECK(mstest::BackendMatchesRequest(s.backend));
  MS_CHECK(s.tracking_mode == MemsnapTrackingMode::WholeProcess);
}

void InvalidArguments() {
  Init();
  void* wrap = (void*)HighPage();
  void* p = AllocateMemory(2 * Page(), MemoryKind::Generic);
  MS_CHECK(memsnap_track_region(wrap, 2 * Page()) == MemsnapStatus::InvalidArgument);
  MS_CHECK(memsnap_track_region(p, SIZE_MAX) == MemsnapStatus::InvalidArgument);
  MS_CHECK(memsnap_track_region(nullptr, Page()) == MemsnapStatus::InvalidArgument);
  MS_CHECK(memsnap_track_region(p, 0) == MemsnapStatus::InvalidArgument);
  MS_CHECK(memsnap_untrack_region(wrap, 2 * Page()) == MemsnapStatus::InvalidArgument);
  MS_CHECK(memsnap_untrack_region(p, 0) == MemsnapStatus::InvalidArgument);
  MS_CHECK(memsnap_prepare_write(wrap, 2 * Page()) == MemsnapStatus::InvalidArgument);
  MS_CHECK(memsnap_prepare_write(nullptr, 16) == MemsnapStatus::InvalidArgument);
  MS_CHECK(memsnap_set_restore_threads(65) == MemsnapStatus::InvalidArgument);
  MS_CHECK(memsnap_set_restore_threads(SIZE_MAX) == MemsnapStatus::InvalidArgument);
  MS_CHECK(memsnap_set_restore_threads(64) == MemsnapStatus::Ok);
  MS_CHECK(memsnap_set_tracking_mode((MemsnapTrackingMode)2) == MemsnapStatus::InvalidArgument);
  MS_CHECK(memsnap_set_tracking_mode((MemsnapTrackingMode)-1) == MemsnapStatus::InvalidArgument);
  MS_CHECK(memsnap_get_stats(nullptr) == MemsnapStatus::InvalidArgument);
  MemsnapStats s;
  // The first release's record ends where kernel_page_size begins.
  const size_t v1 = offsetof(MemsnapStats, kernel_page_size);
  memset(&s, 0xab, sizeof s);
  s.struct_size = v1 - 1;
  MS_CHECK(memsnap_get_stats(&s) == MemsnapStatus::InvalidArgument);
  MS_CHECK_EQ(s.struct_size, v1 - 1);  // untouched
  MS_CHECK_EQ(s.page_size, (size_t)0xabababababababab);
  s.struct_size = 0;
  MS_CHECK(memsnap_get_stats(&s) == MemsnapStatus::InvalidArgument);
  // An older caller's shorter record gets its own fields and nothing past them.
  s.struct_size = v1;
  MS_CHECK(memsnap_get_stats(&s) == MemsnapStatus::Ok);
  MS_CHECK_EQ(s.struct_size, v1);
  MS_CHECK_EQ(s.page_size, memsnap_page_size());
  MS_CHECK_EQ(s.kernel_page_size, (size_t)0xabababababababab);
  MS_CHECK_EQ(s.block_faults, (uint64_t)0xabababababababab);
  // A larger record (a newer caller) is accepted.
  struct {
    MemsnapStats s;
    char extra[64];
  } big;
  memset(&big, 0, sizeof big);
  big.s.struct_size = sizeof big;
  MS_CHECK(memsnap_get_stats(&big.s) == MemsnapStatus::Ok);
  MS_CHECK_EQ(big.s.kernel_page_size, (size_t)sysconf(_SC_PAGESIZE));
  MS_CHECK_EQ(big.extra[0], 0);
  // A misaligned record is refused, not written through.
  alignas(8) char raw[sizeof(MemsnapStats) + 8];
  memset(raw, 0, sizeof raw);
  size_t size = sizeof(MemsnapStats);
  memcpy(raw + 1, &size, sizeof size);
  MS_CHECK(memsnap_get_stats(reinterpret_cast<MemsnapStats*>(raw + 1)) == MemsnapStatus::InvalidArgument);
  MS_CHECK_EQ(raw[1 + sizeof size], 0);
  // Invalid arguments changed nothing: the default mode and a normal first snapshot.
  MS_CHECK(Stats().tracking_mode == MemsnapTrackingMode::WholeProcess);
  MS_CHECK(memsnap_set_restore_threads(2) == MemsnapStatus::Ok);
  TakeFirstMemorySnapshot();
  MS_CHECK(memsnap_prepare_write(wrap, 2 * Page()) == MemsnapStatus::InvalidArgument);
  MS_CHECK(memsnap_get_stats(nullptr) == MemsnapStatus::InvalidArgument);
}

void StatusStrings() {
  const int values[] = {0, 1, 2, 3, 4, 99};
  const char* s[6];
  for (int i = 0; i < 6; i++) {
    s[i] = memsnap_status_string((MemsnapStatus)values[i]);
    MS_CHECK(s[i] != nullptr);
    MS_CHECK(s[i][0] != '\0');
  }
  for (int i = 0; i < 6; i++)
    for (int j = i + 1; j < 6; j++) MS_CHECK(strcmp(s[i], s[j]) != 0);
  const char* negative = memsnap_status_string((MemsnapStatus)-1);
  MS_CHECK(negative != nullptr);
  MS_CHECK(strcmp(negative, s[5]) == 0);  // unknown, like 99
  MS_CHECK(memsnap_status_string(MemsnapStatus::Ok) == s[0]);  // static strings
}

// ---- Stats ---------------------------------------------------------------------------

void StatsBackendAndPageSize() {
  Init();
  MemsnapStats before = Stats();
  MS_CHECK(before.backend == MemsnapBackend::Inactive);
  MS_CHECK(before.tracking_mode == MemsnapTrackingMode::WholeProcess);
  MS_CHECK_EQ(before.page_size, Page());
  MS_CHECK_EQ(before.saved_checkpoints, 0);
  MS_CHECK_EQ(before.checkpoints_taken, 0);
  MS_CHECK_EQ(memsnap_page_size(), Page());
  MS_CHECK_EQ(before.uffd_tracked_bytes, 0);
  MS_CHECK_EQ(before.base_copy_bytes, 0);
  TakeFirstMemorySnapshot();
  MemsnapStats after = Stats();
  MS_CHECK(mstest::BackendMatchesRequest(after.backend));
  // What userfaultfd guards: nothing under mprotect; the anonymous memory under uffd
  // (the executable's .data stays on mprotect); everything under uffd-async, with a base
  // copy of what is resident.
  switch (after.backend) {
    case MemsnapBackend::LinuxUffd:
      MS_CHECK(after.uffd_tracked_bytes > 0);
      MS_CHECK(after.uffd_tracked_bytes < after.tracked_bytes);
      MS_CHECK_EQ(after.base_copy_bytes, 0);
      break;
    case MemsnapBackend::LinuxUffdAsync:
      // Only whole snapshot pages register: at a larger snapshot page than the kernel's,
      // mappings with unaligned ends stay on mprotect.
      MS_CHECK(after.uffd_tracked_bytes > 0);
      if (after.page_size == after.kernel_page_size)
        MS_CHECK_EQ(after.uffd_tracked_bytes, after.tracked_bytes);
      else
        MS_CHECK(after.uffd_tracked_bytes <= after.tracked_bytes);
      MS_CHECK(after.base_copy_bytes > 0);
      MS_CHECK(after.base_copy_bytes % after.page_size == 0);
      MS_CHECK(after.copy_bytes >= after.base_copy_bytes);
      MS_CHECK_EQ(after.uffd_server_wakeups, 0);
      MS_CHECK_EQ(after.uffd_spin_hits, 0);
      break;
    default:
      MS_CHECK_EQ(after.uffd_tracked_bytes, 0);
      MS_CHECK_EQ(after.base_copy_bytes, 0);
      MS_CHECK_EQ(after.uffd_server_wakeups, 0);
      MS_CHECK_EQ(after.uffd_spin_hits, 0);
  }
  MS_CHECK_EQ(after.page_size, memsnap_page_size());
  MS_CHECK_EQ(after.page_size, Page());
  MS_CHECK(after.tracked_bytes > 0);
  // Mappings are kernel-page aligned; a snapshot page may be only partly tracked.
  MS_CHECK(after.tracked_bytes % (size_t)sysconf(_SC_PAGESIZE) == 0);
  MS_CHECK(after.tracked_regions > 0);
  MS_CHECK_EQ(after.saved_checkpoints, 1);
  MS_CHECK_EQ(after.saved_diffs, 0);
  MS_CHECK_EQ(after.saved_diff_pages, 0);
  MS_CHECK_EQ(after.checkpoints_taken, 1);
  MS_CHECK_EQ(after.rewinds, 0);
  MS_CHECK_EQ(after.oldest_restorable, 0);
  MS_CHECK(after.last_snapshot_ns > 0);
  MS_CHECK(after.total_snapshot_ns >= after.last_snapshot_ns);
}

void StatsFaultsAndDirtyPages() {
  const size_t N = 12;
  Init();
  void* buf = AllocateMemory(N * Page(), MemoryKind::Tracked);
  TakeFirstMemorySnapshot();
  MS_CHECK(MemoryRangeIsTracked(buf, N * Page()));
  MemsnapStats s0 = Stats();
  Touch(buf, N, 1);
  MemsnapStats s1 = Stats();
  if (s1.backend == MemsnapBackend::LinuxUffdAsync) {
    // Writes never fault and are only found by the next checkpoint's scan, which saves
    // each written page once and re-arms it.
    MS_CHECK_EQ(s1.faults_handled, 0);
    MS_CHECK_EQ(s1.active_dirty_pages, 0);
    TakeDiffMemorySnapshot();
    MemsnapStats s2 = Stats();
    MS_CHECK_EQ(s2.faults_handled, 0);
    MS_CHECK_EQ(s2.saved_diff_pages, N);
    MS_CHECK(s2.base_copy_bytes >= N * Page());
    for (size_t i = 0; i < N; i += 2) *(volatile uint32_t*)((char*)buf + i * Page()) = 3;
    TakeDiffMemorySnapshot();
    MS_CHECK_EQ(Stats().saved_diff_pages, N + N / 2);
    TakeDiffMemorySnapshot();  // nothing written: an empty diff
    MS_CHECK_EQ(Stats().saved_diff_pages, N + N / 2);
    return;
  }
  // A sequential writer gets the pages ahead of it captured in growing runs: fewer
  // faults than pages, every page dirty.
  MS_CHECK(s1.faults_handled > s0.faults_handled);
  MS_CHECK(s1.faults_handled < s0.faults_handled + N);
  // Every page of buf is dirty. The last run may also take pages past buf's end when
  // the kernel placed other tracked memory right after it (ASLR decides: about one run
  // in fifteen here), so up to one run's worth more (runs here: 1, 2, 4, 8 pages).
  const uint64_t dirty = s1.active_dirty_pages - s0.active_dirty_pages;
  MS_CHECK(dirty >= N);
  MS_CHECK(dirty < 2 * N);
  MS_CHECK(s1.copy_bytes >= s0.copy_bytes + N * Page());
  // Writing the same pages again does not fault again.
  Touch(buf, N, 2);
  MemsnapStats s2 = Stats();
  MS_CHECK_EQ(s2.faults_handled, s1.faults_handled);
  MS_CHECK_EQ(s2.active_dirty_pages, s1.active_dirty_pages);

  // After a diff: nothing dirty, and the fresh pages of N dirty pages fault again.
  TakeDiffMemorySnapshot();
  MemsnapStats s3 = Stats();
  MS_CHECK_EQ(s3.active_dirty_pages, 0);
  // Even pages, then odd ones: no fault lands where the previous capture ended, so each
  // page is captured on its own, one fault each.
  for (size_t i = 0; i < N; i += 2) *(volatile uint32_t*)((char*)buf + i * Page()) = 3;
  for (size_t i = 1; i < N; i += 2) *(volatile uint32_t*)((char*)buf + i * Page()) = 3;
  MemsnapStats s4 = Stats();
  MS_CHECK_EQ(s4.active_dirty_pages, N);
  if (s4.backend == MemsnapBackend::LinuxUffd) {
    // The fault server may find a queued neighbour already captured: at most one each.
    MS_CHECK(s4.faults_handled > s3.faults_handled);
    MS_CHECK(s4.faults_handled <= s3.faults_handled + N);
  } else {
    MS_CHECK_EQ(s4.faults_handled, s3.faults_handled + N);
  }
}

void StatsCheckpointsAndDiffs() {
  const size_t K = 6;
  Init();
  void* changed = AllocateMemory(K * Page(), MemoryKind::Tracked);
  void* reverted = AllocateMemory(K * Page(), MemoryKind::Tracked);
  TakeFirstMemorySnapshot();
  MemsnapStats s0 = Stats();
  MS_CHECK_EQ(s0.saved_checkpoints, 1);
  MS_CHECK_EQ(s0.saved_diffs, 0);

  // K pages change for good; K more are written and then given their old bytes back.
  Touch(changed, K, 5);
  Touch(reverted, K, 0xff);
  Touch(reverted, K, 0);
  MemsnapStats s1 = Stats();
  const bool async = s1.backend == MemsnapBackend::LinuxUffdAsync;
  // uffd-async: the written pages are unknown until the checkpoint scans for them, so
  // none is active yet and the checkpoint weighs exactly the 2K pages written.
  if (async) {
    MS_CHECK_EQ(s1.active_dirty_pages, 0);
  } else {
    MS_CHECK(s1.active_dirty_pages >= 2 * K);
  }
  const size_t dirty1 = async ? 2 * K : s1.active_dirty_pages;
  TakeDiffMemorySnapshot();
  MemsnapStats s2 = Stats();
  MS_CHECK_EQ(s2.saved_checkpoints, 2);
  MS_CHECK_EQ(s2.saved_diffs, 1);
  MS_CHECK_EQ(s2.checkpoints_taken, 2);
  MS_CHECK(s2.saved_diff_pages >= K);
  MS_CHECK_EQ(s2.saved_diff_bytes, s2.saved_diff_pages * s2.page_size);
  // The reverted pages were dropped from the diff.
  MS_CHECK(s2.saved_diff_pages <= dirty1 - K);
  mstest::ms_say("[ext] diff: %zu dirty pages, %zu saved (%zu changed, %zu reverted)\n",
                 dirty1, s2.saved_diff_pages, K, K);

  // A diff made only of reverted pages saves none of them.
  Touch(reverted, K, 7);
  Touch(reverted, K, 0);
  MemsnapStats s3 = Stats();
  if (async) {
    MS_CHECK_EQ(s3.active_dirty_pages, 0);
  } else {
    MS_CHECK(s3.active_dirty_pages >= K);
  }
  const size_t dirty3 = async ? K : s3.active_dirty_pages;
  TakeDiffMemorySnapshot();
  MemsnapStats s4 = Stats();
  MS_CHECK_EQ(s4.saved_checkpoints, 3);
  MS_CHECK(s4.saved_diff_pages - s2.saved_diff_pages <= dirty3 - K);

  // A third diff with one changed page.
  Touch(changed, 1, 9);
  TakeDiffMemorySnapshot();
  MemsnapStats s5 = Stats();
  MS_CHECK_EQ(s5.saved_checkpoints, 4);
  MS_CHECK(s5.saved_diffs >= 2);
  MS_CHECK(s5.saved_diff_pages >= s4.saved_diff_pages + 1);
}

void StatsRewindsAndCopyBytes() {
  const size_t K = 8;
  Init();
  void* buf = AllocateMemory(K * Page(), MemoryKind::Tracked);
  TakeFirstMemorySnapshot();
  Touch(buf, K, 1);
  TakeDiffMemorySnapshot();
  Touch(buf, K, 2);
  MemsnapStats s0 = Stats();
  const bool async = s0.backend == MemsnapBackend::LinuxUffdAsync;
  // uffd-async copies nothing at write time: the K active pages hold no pre-image.
  const size_t active = async ? 0 : K * Page();
  MS_CHECK_EQ(s0.rewinds, 0);
  // K saved in the diff (deltas: one word changed in each), K active.
  MS_CHECK(s0.saved_kept_bytes > 0);
  MS_CHECK(s0.copy_bytes >= active);
  {
    AutoDisallowMemoryChanges disallow;
    RestoreMemoryToLastSavedCheckpoint();
  }
  MemsnapStats s1 = Stats();
  MS_CHECK_EQ(*(volatile uint32_t*)buf, 1);
  MS_CHECK_EQ(s1.rewinds, 1);
  MS_CHECK_EQ(s1.active_dirty_pages, 0);
  MS_CHECK(s1.copy_bytes + active <= s0.copy_bytes);
  MS_CHECK_EQ(s1.saved_checkpoints, 2);
  MS_CHECK(s1.last_restore_ns > 0);
  {
    AutoDisallowMemoryChanges disallow;
    RestoreMemoryToLastSavedCheckpoint();
    RestoreMemoryToLastSavedDiffCheckpoint();
  }
  MemsnapStats s2 = Stats();
  MS_CHECK_EQ(*(volatile uint32_t*)buf, 0);
  MS_CHECK_EQ(s2.rewinds, 3);
  MS_CHECK_EQ(s2.saved_checkpoints, 1);
  MS_CHECK_EQ(s2.saved_diffs, 0);
  MS_CHECK_EQ(s2.saved_diff_pages, 0);
  // The diff's pre-images, whole copies or deltas, are released.
  MS_CHECK(s1.saved_kept_bytes > 0);
  MS_CHECK(s1.saved_kept_bytes <= K * Page());
  MS_CHECK_EQ(s2.saved_kept_bytes, 0);
  MS_CHECK(s2.copy_bytes <= s1.copy_bytes);
  MS_CHECK(s2.total_restore_ns >= s1.last_restore_ns);
}

// Writes every word of `pages` pages at `base` with values depending on the word and `gen`.
void Scramble(void* base, size_t pages, uint32_t gen) {
  uint32_t* w = (uint32_t*)base;
  for (size_t j = 0; j < pages * Page() / 4; j++) w[j] = (uint32_t)(j * 2654435761u) ^ gen;
}

// Pages changed in a word keep a delta of a few bytes; pages rewritten whole keep a whole
// copy. Rewinding through both, after folding them into one diff, restores every byte.
void StatsKeptBytesOfDeltas() {
  const size_t K = 8;
  Init();
  char* small = (char*)AllocateMemory(K * Page(), MemoryKind::Tracked);
  char* whole = (char*)AllocateMemory(K * Page(), MemoryKind::Tracked);
  Fill(small, K, 1);
  Fill(whole, K, 1);
  TakeFirstMemorySnapshot();
  TakeDiffMemorySnapshot();
  Touch(small, K, 7);
  Scramble(whole, K, 2);
  TakeDiffMemorySnapshot();
  MemsnapStats s1 = Stats();
  MS_CHECK_EQ(s1.saved_diff_pages, 2 * K);
  MS_CHECK_EQ(s1.saved_delta_pages, K);
  MS_CHECK(s1.saved_kept_bytes >= K * Page());
  MS_CHECK(s1.saved_kept_bytes < K * Page() + K * Page() / 16);
  // One more checkpoint, then the two diffs folded: the deltas compose.
  Touch(small, K, 9);
  Scramble(whole, K, 3);
  TakeDiffMemorySnapshot();
  EraseLastSavedDiffMemorySnapshot();
  MemsnapStats s2 = Stats();
  MS_CHECK_EQ(s2.saved_checkpoints, 3);
  MS_CHECK_EQ(s2.saved_diff_pages, 2 * K);
  MS_CHECK_EQ(s2.saved_delta_pages, K);
  {
    AutoDisallowMemoryChanges disallow;
    RestoreMemoryToLastSavedCheckpoint();
    RestoreMemoryToLastSavedDiffCheckpoint();
  }
  MemsnapStats s3 = Stats();
  MS_CHECK_EQ(s3.saved_diff_pages, 0);
  MS_CHECK_EQ(s3.saved_kept_bytes, 0);
  char* want = (char*)calloc(K, Page());
  Fill(want, K, 1);
  MS_CHECK(memcmp(small, want, K * Page()) == 0);
  MS_CHECK(memcmp(whole, want, K * Page()) == 0);
  free(want);
}

// Under a memory budget the base copy of uffd-async would not fit, auto picks another
// backend; with room to spare it picks uffd-async (where the kernel offers it).
void MemoryBudget(size_t budget, bool fits) {
  const size_t K = 64;
  Init();
  MS_CHECK(memsnap_set_backend(0) == MemsnapStatus::Ok);  // auto
  MS_CHECK(memsnap_set_memory_budget(budget) == MemsnapStatus::Ok);
  char* buf = (char*)AllocateMemory(K * Page(), MemoryKind::Tracked);
  Touch(buf, K, 1);
  TakeFirstMemorySnapshot();
  MemsnapStats s = Stats();
  MS_CHECK_EQ(s.memory_budget, budget);
  MS_CHECK(memsnap_set_memory_budget(0) == MemsnapStatus::AlreadyStarted);
  if (!fits) {
    MS_CHECK(s.backend != MemsnapBackend::LinuxUffdAsync);
    MS_CHECK_EQ(s.base_copy_bytes, 0);
  } else if (mstest::KernelOffersUffd(true)) {
    MS_CHECK(s.backend == MemsnapBackend::LinuxUffdAsync);
  }
  Touch(buf, K, 2);
  {
    AutoDisallowMemoryChanges disallow;
    RestoreMemoryToLastSavedCheckpoint();
  }
  MS_CHECK_EQ(*(volatile uint32_t*)(buf + (K - 1) * Page()), 1);
}

// ---- Tracking modes and regions ------------------------------------------------------

void RegisteredOnlyMode() {
  const size_t N = 16;
  Init();
  MS_CHECK(memsnap_set_tracking_mode(MemsnapTrackingMode::RegisteredOnly) == MemsnapStatus::Ok);
  void* buf = mmap(nullptr, N * Page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  MS_CHECK(buf != MAP_FAILED);
  MS_CHECK(memsnap_track_region(buf, N * Page()) == MemsnapStatus::Ok);
  void* alloc = AllocateMemory(Page(), MemoryKind::Tracked);
  volatile int* heap = new int(0);
  Fill(buf, N, 1);
  TakeFirstMemorySnapshot();

  MemsnapStats s = Stats();
  MS_CHECK(s.tracking_mode == MemsnapTrackingMode::RegisteredOnly);
  MS_CHECK(mstest::BackendMatchesRequest(s.backend));
  // Registered anonymous memory is on userfaultfd under either uffd backend: all of it at
  // the kernel's page; at a larger snapshot page at least the tracked allocation (whole
  // snapshot pages), while the mmap'd buffer may have unaligned ends.
  if (!mstest::IsUffdBackend(s.backend))
    MS_CHECK_EQ(s.uffd_tracked_bytes, 0);
  else if (s.page_size == s.kernel_page_size)
    MS_CHECK_EQ(s.uffd_tracked_bytes, s.tracked_bytes);
  else
    MS_CHECK(s.uffd_tracked_bytes >= Page() && s.uffd_tracked_bytes <= s.tracked_bytes);
  MS_CHECK_EQ(mstest::UffdGuarded(alloc, Page()), mstest::IsUffdBackend(s.backend));
  MS_CHECK_EQ(s.tracked_bytes, (N + 1) * Page());
  MS_CHECK(MemoryRangeIsTracked(buf, N * Page()));
  MS_CHECK(MemoryRangeIsTracked(alloc, Page()));
  MS_CHECK(!MemoryRangeIsTracked((void*)&gGlobal, sizeof gGlobal));
  MS_CHECK(!MemoryRangeIsTracked((void*)heap, sizeof *heap));

  Fill(buf, N, 2);
  *(volatile int*)alloc = 77;
  gGlobal = 5;
  *heap = 6;
  {
    AutoDisallowMemoryChanges disallow;
    // Untracked memory may be written even while changes are disallowed.
    gGlobal = 7;
    RestoreMemoryToLastSavedCheckpoint();
  }
  MS_CHECK(Holds(buf, N, 1));
  MS_CHECK_EQ(*(volatile int*)alloc, 0);
  MS_CHECK_EQ(gGlobal, 7);  // not rewound
  MS_CHECK_EQ(*heap, 6);    // not rewound
}

void UntrackRegion() {
  const size_t N = 4;
  Init();
  void* buf = mmap(nullptr, N * Page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  MS_CHECK(buf != MAP_FAILED);
  // An unaligned range is widened to whole pages.
  MS_CHECK(memsnap_untrack_region((char*)buf + 100, N * Page() - 200) == MemsnapStatus::Ok);
  Fill(buf, N, 1);
  gGlobal = 1;
  TakeFirstMemorySnapshot();
  MS_CHECK(!MemoryRangeIsTracked(buf, Page()));
  MS_CHECK(!MemoryRangeIsTracked((char*)buf + (N - 1) * Page(), Page()));
  MS_CHECK(MemoryRangeIsTracked((void*)&gGlobal, sizeof gGlobal));
  MemsnapStats s0 = Stats();
  Fill(buf, N, 2);
  MemsnapStats s1 = Stats();
  MS_CHECK_EQ(s1.faults_handled, s0.faults_handled);  // no faults for untracked pages
  gGlobal = 2;
  {
    AutoDisallowMemoryChanges disallow;
    RestoreMemoryToLastSavedCheckpoint();
  }
  MS_CHECK(Holds(buf, N, 2));  // not rewound
  MS_CHECK_EQ(gGlobal, 1);     // rewound
  MS_CHECK(memsnap_prepare_write(buf, Page()) == MemsnapStatus::NotTracked);
}

// ---- Restore threads -----------------------------------------------------------------

void RestoreThreads(size_t threads) {
  const size_t N = 300;
  Init();
  MS_CHECK(memsnap_set_restore_threads(threads) == MemsnapStatus::Ok);
  void* buf = AllocateMemory(N * Page(), MemoryKind::Tracked);
  Fill(buf, N, 1);
  gGlobal = 1;
  TakeFirstMemorySnapshot();
  MS_CHECK_EQ(Stats().restore_threads, threads);
  Fill(buf, N, 2);
  gGlobal = 2;
  TakeDiffMemorySnapshot();
  MS_CHECK(Stats().saved_diff_pages >= N);
  Fill(buf, N, 3);
  gGlobal = 3;
  TakeDiffMemorySnapshot();
  Fill(buf, N, 4);
  gGlobal = 4;
  {
    AutoDisallowMemoryChanges disallow;
    RestoreMemoryToLastSavedCheckpoint();
    MS_CHECK(Holds(buf, N, 3));
    MS_CHECK_EQ(gGlobal, 3);
    RestoreMemoryToLastSavedDiffCheckpoint();
    MS_CHECK(Holds(buf, N, 2));
    MS_CHECK_EQ(gGlobal, 2);
    RestoreMemoryToLastSavedDiffCheckpoint();
    MS_CHECK(Holds(buf, N, 1));
    MS_CHECK_EQ(gGlobal, 1);
  }
  // Forward again, then rewind once more.
  Fill(buf, N, 5);
  TakeDiffMemorySnapshot();
  Fill(buf, N, 6);
  {
    AutoDisallowMemoryChanges disallow;
    RestoreMemoryToLastSavedCheckpoint();
    MS_CHECK(Holds(buf, N, 5));
    RestoreMemoryToLastSavedDiffCheckpoint();
    MS_CHECK(Holds(buf, N, 1));
  }
  MemsnapStats s = Stats();
  MS_CHECK_EQ(s.restore_threads, threads);
  MS_CHECK_EQ(s.rewinds, 5);
  MS_CHECK_EQ(s.saved_checkpoints, 1);
}

void DefaultRestoreThreads() {
  Init();
  TakeFirstMemorySnapshot();
  size_t n = Stats().restore_threads;
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  size_t expect = cpus < 1 ? 1 : (cpus > 8 ? 8 : (size_t)cpus);
  MS_CHECK_EQ(n, expect);
}

// ---- Pin allocator -------------------------------------------------------------------

void PinAllocatorOff() {
  Init();
  MS_CHECK(memsnap_set_pin_allocator(false) == MemsnapStatus::Ok);
  MS_CHECK(memsnap_set_pin_allocator(true) == MemsnapStatus::Ok);
  MS_CHECK(memsnap_set_pin_allocator(false) == MemsnapStatus::Ok);
  TakeFirstMemorySnapshot();
  gGlobal = 1;
  TakeDiffMemorySnapshot();
  gGlobal = 2;
  {
    AutoDisallowMemoryChanges disallow;
    RestoreMemoryToLastSavedCheckpoint();
  }
  MS_CHECK_EQ(gGlobal, 1);
}

// ---- prepare_write -------------------------------------------------------------------

void PrepareWriteForSyscall() {
  Init();
  char* buf = (char*)AllocateMemory(2 * Page(), MemoryKind::Tracked);
  memset(buf, 'A', 2 * Page());
  int fds[2];
  MS_CHECK(pipe(fds) == 0);
  TakeFirstMemorySnapshot();
  MS_CHECK(write(fds[1], "hello", 5) == 5);
  char* target = buf + Page() - 2;  // straddles two tracked pages
  if (mstest::KernelWritesTracked(target, 5)) {
    // userfaultfd: the kernel's write lands, is tracked, and the rewind takes it back;
    // preparing is accepted, and captures the two pages except under uffd-async (which
    // never blocks a write).
    MemsnapStats s0 = Stats();
    MS_CHECK(memsnap_prepare_write(target, 5) == MemsnapStatus::Ok);
    const bool async = mstest::ActiveBackend() == MemsnapBackend::LinuxUffdAsync;
    MS_CHECK_EQ(Stats().active_dirty_pages, s0.active_dirty_pages + (async ? 0 : 2));
    MS_CHECK_EQ(read(fds[0], target, 5), 5);
    MS_CHECK(memcmp(target, "hello", 5) == 0);
    for (int round = 0; round < 2; round++) {
      {
        AutoDisallowMemoryChanges disallow;
        RestoreMemoryToLastSavedCheckpoint();
      }
      for (size_t i = 0; i < 2 * Page(); i++) MS_CHECK_EQ(buf[i], 'A');
      MS_CHECK(write(fds[1], "again", 5) == 5);
      MS_CHECK_EQ(read(fds[0], target, 5), 5);  // lands again after the rewind
      MS_CHECK(memcmp(target, "again", 5) == 0);
    }
    return;
  }

  // The kernel cannot write a write-protected page: EFAULT, the data stays in the pipe.
  errno = 0;
  ssize_t n = read(fds[0], target, 5);
  int err = errno;
  MS_CHECK_EQ(n, -1);
  MS_CHECK_EQ(err, EFAULT);
  MS_CHECK_EQ(buf[Page() - 2], 'A');

  MemsnapStats s0 = Stats();
  MS_CHECK(memsnap_prepare_write(target, 5) == MemsnapStatus::Ok);
  MemsnapStats s1 = Stats();
  MS_CHECK_EQ(s1.active_dirty_pages - s0.active_dirty_pages, 2);
  MS_CHECK(memsnap_prepare_write(target, 5) == MemsnapStatus::Ok);  // idempotent
  MS_CHECK_EQ(Stats().active_dirty_pages, s1.active_dirty_pages);
  n = read(fds[0], target, 5);
  MS_CHECK_EQ(n, 5);
  MS_CHECK(memcmp(target, "hello", 5) == 0);

  {
    AutoDisallowMemoryChanges disallow;
    RestoreMemoryToLastSavedCheckpoint();
  }
  for (size_t i = 0; i < 2 * Page(); i++) {
    if (buf[i] != 'A') {
      mstest::ms_say("byte %zu is %d after the rewind\n", i, buf[i]);
      _exit(1);
    }
  }
  // And the kernel is locked out again.
  MS_CHECK(write(fds[1], "again", 5) == 5);
  MS_CHECK_EQ(read(fds[0], target, 5), -1);
}

void PrepareWriteStatuses() {
  Init();
  char* tracked = (char*)AllocateMemory(Page(), MemoryKind::Tracked);
  // Before the first snapshot nothing is protected: Ok.
  MS_CHECK(memsnap_prepare_write(tracked, 16) == MemsnapStatus::Ok);
  MS_CHECK(memsnap_prepare_write(nullptr, 0) == MemsnapStatus::Ok);
  TakeFirstMemorySnapshot();
  char stackbuf[64];
  void* generic = AllocateMemory(Page(), MemoryKind::Generic);
  MS_CHECK(memsnap_prepare_write(generic, Page()) == MemsnapStatus::NotTracked);
  MS_CHECK(memsnap_prepare_write(stackbuf, sizeof stackbuf) == MemsnapStatus::NotTracked);
  MS_CHECK(memsnap_prepare_write((void*)HighPage(), 2 * Page()) == MemsnapStatus::InvalidArgument);
  MS_CHECK(memsnap_prepare_write(nullptr, 1) == MemsnapStatus::InvalidArgument);
  MS_CHECK(memsnap_prepare_write(tracked, Page()) == MemsnapStatus::Ok);
  MS_CHECK(memsnap_prepare_write((void*)&gGlobal, sizeof gGlobal) == MemsnapStatus::Ok);
}

void PrepareWritePartlyTracked() {
  Init();
  char* buf = (char*)mstest::MapSnapshotPages(2 * Page());
  MS_CHECK(buf != MAP_FAILED);
  MS_CHECK(memsnap_untrack_region(buf + Page(), Page()) == MemsnapStatus::Ok);
  int fds[2];
  MS_CHECK(pipe(fds) == 0);
  TakeFirstMemorySnapshot();
  MS_CHECK(MemoryRangeIsTracked(buf, Page()));
  MS_CHECK(!MemoryRangeIsTracked(buf + Page(), Page()));
  MemsnapStats s0 = Stats();
  const bool kernelWrites = mstest::KernelWritesTracked(buf, Page());
  // The tracked page is prepared even though the range is only partly tracked.
  MS_CHECK(memsnap_prepare_write(buf, 2 * Page()) == MemsnapStatus::NotTracked);
  (void)kernelWrites;
  const bool asyncGuarded = mstest::ActiveBackend() == MemsnapBackend::LinuxUffdAsync &&
                            mstest::UffdGuarded(buf, Page());
  MS_CHECK_EQ(Stats().active_dirty_pages - s0.active_dirty_pages, asyncGuarded ? 0 : 1);
  MS_CHECK(write(fds[1], "xyz", 3) == 3);
  MS_CHECK_EQ(read(fds[0], buf + Page() - 1, 3), 3);
  MS_CHECK(memcmp(buf + Page() - 1, "xyz", 3) == 0);
  {
    AutoDisallowMemoryChanges disallow;
    RestoreMemoryToLastSavedCheckpoint();
  }
  MS_CHECK_EQ(buf[Page() - 1], 0);  // tracked: rewound
  MS_CHECK_EQ(buf[Page()], 'y');    // untracked: kept
}

}  // namespace

TEST(ExtTest, NotInitializedBeforeInit) { MS_IN_CHILD(AllNotInitialized()); }
TEST(ExtTest, SettersAlreadyStartedAfterFirstSnapshot) { MS_IN_CHILD(SettersAlreadyStarted()); }
TEST(ExtTest, InvalidArguments) { MS_IN_CHILD(InvalidArguments()); }
TEST(ExtTest, StatusStringsDistinct) { MS_IN_CHILD(StatusStrings()); }
TEST(ExtTest, StatsBackendAndPageSize) { MS_IN_CHILD(StatsBackendAndPageSize()); }
TEST(ExtTest, StatsFaultsAndDirtyPages) { MS_IN_CHILD(StatsFaultsAndDirtyPages()); }
TEST(ExtTest, StatsCheckpointsAndDiffs) { MS_IN_CHILD(StatsCheckpointsAndDiffs()); }
TEST(ExtTest, StatsRewindsAndCopyBytes) { MS_IN_CHILD(StatsRewindsAndCopyBytes()); }
TEST(ExtTest, StatsKeptBytesOfDeltas) { MS_IN_CHILD(StatsKeptBytesOfDeltas()); }
TEST(ExtTest, MemoryBudgetTooSmallForBaseCopy) { MS_IN_CHILD(MemoryBudget(4096, false)); }
TEST(ExtTest, MemoryBudgetWithRoom) { MS_IN_CHILD(MemoryBudget(size_t(1) << 40, true)); }
TEST(ExtTest, RegisteredOnlyTracksOnlyRegisteredMemory) { MS_IN_CHILD(RegisteredOnlyMode()); }
TEST(ExtTest, UntrackRegionIsNotRewound) { MS_IN_CHILD(UntrackRegion()); }
TEST(ExtTest, RestoreOnCallingThread) { MS_IN_CHILD(RestoreThreads(0)); }
TEST(ExtTest, RestoreWithThreeWorkers) { MS_IN_CHILD(RestoreThreads(3)); }
TEST(ExtTest, DefaultRestoreThreads) { MS_IN_CHILD(DefaultRestoreThreads()); }
TEST(ExtTest, PinAllocatorOffAccepted) { MS_IN_CHILD(PinAllocatorOff()); }
TEST(ExtTest, PrepareWriteLetsTheKernelWrite) { MS_IN_CHILD(PrepareWriteForSyscall()); }
TEST(ExtTest, PrepareWritePartlyTrackedRange) { MS_IN_CHILD(PrepareWritePartlyTracked()); }
TEST(ExtTest, PrepareWriteStatuses) { MS_IN_CHILD(PrepareWriteStatuses()); }
