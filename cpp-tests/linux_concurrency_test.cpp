// Issue 3, part 2 (suite ConcurrencyTest): several threads write tracked memory between
// checkpoints, hundreds of checkpoint/rewind cycles, and every tracked byte is compared
// with a model after every round and every rewind.
//
// Six worker threads plus the controller write, in each round, their own word stripes of
// the same pages (all seven start on page 0 at once, so they race to claim the same page)
// and pages each thread owns alone, in a tracked allocation and in a tracked global. The
// workers are created before the first snapshot and park on a futex word in untracked
// memory between rounds, so they are idle at every checkpoint and rewind as the protocol
// requires, and none is created or exits before the last rewind. The controller applies
// the same writes to a model in untracked memory, keeps one model copy per saved
// checkpoint, and after each action (diff snapshot, rewind to the newest checkpoint,
// rewind several levels, erase) checks the tracked memory byte for byte. A per-round
// SIGALRM watchdog turns a hang into a failure naming the round.

#include <linux/futex.h>
#include <pthread.h>
#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <new>

#include "test_support.h"

using namespace mozilla::recordreplay;
using mstest::ms_say;

namespace concurrency_test {

constexpr int kWorkers = 6;               // threads besides the controller
constexpr int kWriters = kWorkers + 1;    // the controller writes its stripe too
constexpr int kAllocPages = 40;           // tracked allocation
constexpr int kSharedPages = 16;          // pages every writer writes (its own words)
constexpr int kMaxDepth = 12;             // saved checkpoints kept at most
constexpr int kTargetRewinds = 520;       // restore cycles the scenario must reach

// A tracked global: whole granules at any granularity up to 64 KiB.
alignas(65536) uint32_t gGlobalWords[4 * 65536 / 4];

struct Control {
  std::atomic<int> gen;   // bumped to start a round; workers futex-wait on it
  std::atomic<int> done;  // workers finished this round; the controller waits on it
  std::atomic<int> stop;
  std::atomic<uint32_t> seed;
  volatile long round;    // for the watchdog message
  size_t granule;
  size_t pages;           // total pages: allocation then global
  uint8_t* alloc;
};

Control* gCtl;  // set before the first snapshot, never written afterwards

uint32_t Mix(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t h = a * 0x9E3779B1u ^ (b + 0x7F4A7C15u) * 0x85EBCA77u ^ (c + 0x165667B1u) * 0xC2B2AE3Du;
  h ^= h >> 15;
  h *= 0x2C1B3C6Du;
  h ^= h >> 12;
  return h | 1u;  // never zero: a lost write (still zero) cannot match by chance
}

uint32_t* PageWords(uint8_t* allocBase, uint8_t* globalBase, size_t granule, size_t p) {
  return (uint32_t*)(p < (size_t)kAllocPages ? allocBase + p * granule
                                             : globalBase + (p - kAllocPages) * granule);
}

// The writes of writer `t` in the round with `seed`, into the pages at the given bases
// (the tracked memory, or the model laid out the same way).
void Writes(int t, uint32_t seed, uint8_t* allocBase, uint8_t* globalBase, size_t granule,
            size_t pages) {
  const size_t words = granule / 4;
  for (size_t p = 0; p < (size_t)kSharedPages; p++) {
    if (Mix(seed, (uint32_t)p, 1) % 4 == 0) continue;  // this round leaves the page alone
    volatile uint32_t* w = PageWords(allocBase, globalBase, granule, p);
    for (size_t i = (size_t)t; i < words; i += kWriters) w[i] = Mix(seed, (uint32_t)p, (uint32_t)i);
  }
  for (size_t p = kSharedPages; p < pages; p++) {
    if ((int)(p % kWriters) != t || Mix(seed, (uint32_t)p, 2) % 3 != 0) continue;
    volatile uint32_t* w = PageWords(allocBase, globalBase, granule, p);
    size_t step = 1 + Mix(seed, (uint32_t)p, 3) % 29;  // whole page or a sparse pattern
    for (size_t i = Mix(seed, (uint32_t)p, 4) % step; i < words; i += step) {
      w[i] = Mix(seed, (uint32_t)p, (uint32_t)i);
    }
  }
}

void* WorkerMain(void* arg) {
  const int t = (int)(intptr_t)arg;
  Control* c = gCtl;
  int seen = 0;
  for (;;) {
    int g;
    while ((g = c->gen.load()) == seen) mstest::FutexWaitRaw((volatile int*)&c->gen, seen, FUTEX_WAIT_PRIVATE);
    seen = g;
    if (c->stop.load()) return nullptr;
    Writes(t, c->seed.load(), c->alloc, (uint8_t*)gGlobalWords, c->granule, c->pages);
    if (c->done.fetch_add(1) + 1 == kWorkers) mstest::FutexWakeRaw((volatile int*)&c->done, FUTEX_WAKE_PRIVATE);
  }
}

// One round: every writer (the controller included) writes; the workers are parked again
// when this returns.
void RunRound(Control* c, uint32_t seed) {
  c->seed = seed;
  c->done = 0;
  c->gen.fetch_add(1);
  mstest::FutexWakeRaw((volatile int*)&c->gen, FUTEX_WAKE_PRIVATE);
  Writes(kWorkers, seed, c->alloc, (uint8_t*)gGlobalWords, c->granule, c->pages);
  int d;
  while ((d = c->done.load()) < kWorkers) mstest::FutexWaitRaw((volatile int*)&c->done, d, FUTEX_WAIT_PRIVATE);
  MS_CHECK_EQ(d, kWorkers);  // a worker counted twice would be a harness bug
}

// Byte-for-byte comparison of the tracked memory with `model`; names the first mismatch.
void Verify(Control* c, const uint8_t* model, const char* after, int depth) {
  const size_t g = c->granule;
  for (size_t p = 0; p < c->pages; p++) {
    const uint8_t* live = (const uint8_t*)PageWords(c->alloc, (uint8_t*)gGlobalWords, g, p);
    if (memcmp(live, model + p * g, g) != 0) {
      size_t i = 0;
      while (live[i] == model[p * g + i]) i++;
      ms_say("round %ld, after %s (checkpoint %d): page %zu byte %zu is %u, expected %u\n",
             c->round, after, depth, p, i, live[i], model[p * g + i]);
      _exit(1);
    }
  }
}

void ConcurrencyScenario() {
  InitializeMemorySnapshots();
  const size_t g = mstest::Granule();
  MS_CHECK(sizeof gGlobalWords % g == 0 && (uintptr_t)gGlobalWords % g == 0);
  Control* c = new (AllocateMemory(sizeof(Control), MemoryKind::Generic)) Control();
  gCtl = c;
  c->granule = g;
  c->pages = kAllocPages + sizeof gGlobalWords / g;
  const size_t bytes = c->pages * g;
  c->alloc = (uint8_t*)AllocateMemory(kAllocPages * g, MemoryKind::Tracked);
  // Untracked: the live model and one copy per saved checkpoint.
  uint8_t* model = (uint8_t*)AllocateMemory(bytes, MemoryKind::Generic);
  uint8_t* copies = (uint8_t*)AllocateMemory(bytes * (kMaxDepth + 1), MemoryKind::Generic);
  uint8_t* modelGlobal = model + kAllocPages * g;
  // Initial contents: not zero, so a page restored from the wrong copy shows.
  for (size_t p = 0; p < c->pages; p++) {
    uint32_t* w = PageWords(c->alloc, (uint8_t*)gGlobalWords, g, p);
    for (size_t i = 0; i < g / 4; i++) w[i] = Mix(7, (uint32_t)p, (uint32_t)i);
  }
  for (size_t p = 0; p < c->pages; p++) {
    memcpy(model + p * g, PageWords(c->alloc, (uint8_t*)gGlobalWords, g, p), g);
  }
  pthread_t threads[kWorkers];
  for (int t = 0; t < kWorkers; t++) {
    MS_CHECK(pthread_create(&threads[t], nullptr, WorkerMain, (void*)(intptr_t)t) == 0);
  }
  mstest::ArmWatchdog("ConcurrencyScenario", &c->round, 30);

  TakeFirstMemorySnapshot();  // checkpoint 0
  MS_CHECK(MemoryRangeIsTracked(c->alloc, kAllocPages * g));
  MS_CHECK(MemoryRangeIsTracked(gGlobalWords, sizeof gGlobalWords));
  memcpy(copies, model, bytes);
  int top = 0;  // index of the newest saved checkpoint
  int diffs = 0, rewinds = 0, multiLevel = 0, levels = 0, erases = 0;
  uint32_t rng = 12345;
  for (c->round = 1; rewinds < kTargetRewinds; c->round++) {
    MS_CHECK(c->round < 5000);
    mstest::ArmWatchdog("ConcurrencyScenario", &c->round, 30);
    const uint32_t seed = Mix((uint32_t)c->round, 99, 5);
    RunRound(c, seed);
    for (int t = 0; t < kWriters; t++) Writes(t, seed, model, modelGlobal, g, c->pages);
    Verify(c, model, "the round's writes", top);
    rng = rng * 1103515245u + 12345u;
    const uint32_t r = (rng >> 8) % 100;
    const char* what;
    if (top >= kMaxDepth || (r >= 40 && r < 65 && top >= 1)) {
      int k = 1 + (int)((rng >> 20) % (uint32_t)(top < 4 ? top : 4));
      if (top >= kMaxDepth) k = top / 2;
      mstest::Rewind(k);
      top -= k;
      rewinds++;
      multiLevel++;
      levels += k;
      memcpy(model, copies + (size_t)top * bytes, bytes);
      what = "a rewind of several levels";
    } else if (r < 40 || (r >= 95 && top < 2)) {
      TakeDiffMemorySnapshot();
      top++;
      diffs++;
      memcpy(copies + (size_t)top * bytes, model, bytes);
      what = "a diff snapshot";
    } else if (r < 95) {
      mstest::Rewind(0);
      rewinds++;
      memcpy(model, copies + (size_t)top * bytes, bytes);
      what = "a rewind to the newest checkpoint";
    } else {
      // Forget the second-newest checkpoint; the newest stays restorable.
      EraseLastSavedDiffMemorySnapshot();
      memcpy(copies + (size_t)(top - 1) * bytes, copies + (size_t)top * bytes, bytes);
      top--;
      erases++;
      what = "an erase";
    }
    Verify(c, model, what, top);
  }
  MS_CHECK_EQ(mstest::Stats().saved_checkpoints, top + 1);
  // Unwind to checkpoint 0, one level at a time, checking each.
  while (top > 0) {
    RunRound(c, Mix((uint32_t)top, 3, 3));
    mstest::Rewind(1);
    top--;
    memcpy(model, copies + (size_t)top * bytes, bytes);
    Verify(c, model, "the final unwind", top);
  }
  c->stop = 1;
  c->gen.fetch_add(1);
  mstest::FutexWakeRaw((volatile int*)&c->gen, FUTEX_WAKE_PRIVATE);
  for (int t = 0; t < kWorkers; t++) MS_CHECK(pthread_join(threads[t], nullptr) == 0);
  alarm(0);
  MS_CHECK(rewinds >= 500);
  MS_CHECK(multiLevel > 50);
  MS_CHECK(erases > 10);
  ms_say("%d writer threads, %ld rounds: %d diff snapshots, %d rewinds (%d of several "
         "levels, %d levels), %d erases, %llu faults handled\n",
         kWriters, c->round - 1, diffs, rewinds, multiLevel, levels, erases,
         (unsigned long long)mstest::Stats().faults_handled);
}

TEST(ConcurrencyTest, SevenWritersHundredsOfRewindsMatchModel) {
  MS_IN_CHILD(ConcurrencyScenario());
}

}  // namespace concurrency_test
