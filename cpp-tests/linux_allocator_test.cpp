// Issue 3, part 4 (suite AllocatorTest): glibc malloc under snapshots. Blocks of every
// size class (small, above the default mmap threshold, megabytes) are allocated, freed,
// reallocated and calloc'ed across hundreds of checkpoints and rewinds, with every live
// block and calloc result checked; with the allocator pinned (the default) the heap never
// shrinks; with it unpinned, mmap'd chunks and heap trimming after a checkpoint either
// rewind exactly or make memsnap refuse the rewind with a message naming the vanished
// range, and no rewind writes memory that was unmapped (the scenario survives to read
// the message instead of crashing).
//
// Every scenario runs in a forked child (MS_IN_CHILD); a rewind expected to abort runs in
// a grandchild whose stderr is captured (mstest::StatusAndStderrOfChild).

#include <dlfcn.h>
#include <malloc.h>
#include <sys/syscall.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "test_support.h"

using namespace mozilla::recordreplay;
using mstest::ms_say;

namespace allocator_test {

using mstest::Granule;
using mstest::Rewind;
using mstest::Stats;

// The step counter lives in untracked memory (AllocateMemory(Generic)): a tracked
// counter would be rewound with everything else.
volatile long* gStepPtr;
volatile long gSetupStep;  // for scenarios without a loop (never written)

// Whether malloc is glibc's own. `make test-hosts` runs this suite with jemalloc, tcmalloc
// and mimalloc preloaded too; the scenarios that assert glibc's mechanisms (its chunk
// header, mallopt thresholds, heap growth by brk, malloc_trim) are skipped under those,
// with this reason, and the churn scenario runs under every allocator.
bool GlibcMalloc() {
  void* libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
  void* own = libc ? dlsym(libc, "malloc") : nullptr;
  if (libc) dlclose(libc);
  return own != nullptr && own == dlsym(RTLD_DEFAULT, "malloc");
}

#define SKIP_UNLESS_GLIBC_MALLOC()                                                       \
  do {                                                                                  \
    if (!GlibcMalloc())                                                                 \
      GTEST_SKIP() << "asserts glibc malloc's own mechanisms; malloc here is a preloaded " \
                      "allocator's";                                                    \
  } while (0)

uintptr_t KernelBrk() { return (uintptr_t)syscall(SYS_brk, 0); }

uint8_t Pattern(uint32_t id, size_t i) { return (uint8_t)(id * 131u + (uint32_t)(i / 7) * 17u + 1u); }

void FillBlock(uint8_t* p, size_t n, uint32_t id) {
  for (size_t i = 0; i < n; i++) p[i] = Pattern(id, i);
}

// Whole-block check of a pattern; large blocks are sampled every 61 bytes plus both ends.
bool HoldsBlock(const uint8_t* p, size_t n, uint32_t id) {
  size_t step = n > 65536 ? 61 : 1;
  for (size_t i = 0; i < n; i += step) {
    if (p[i] != Pattern(id, i)) return false;
  }
  return n == 0 || p[n - 1] == Pattern(id, n - 1);
}

bool AllZero(const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (p[i] != 0) return false;
  }
  return true;
}

uint32_t Next(uint32_t* rng) {
  *rng = *rng * 1103515245u + 12345u;
  return *rng >> 8;
}

size_t PickSize(uint32_t r) {
  switch (r % 20) {
    case 0:
      return (1u << 20) + r % (2u << 20);  // megabytes
    case 1:
    case 2:
    case 3:
      return (128u << 10) + r % (256u << 10);  // above glibc's default mmap threshold
    default:
      return 8 + r % 4096;
  }
}

// ---------------------------------------------------------------------------------------
// Churn: the block table is a tracked global, rewound with the heap; an FNV hash of the
// table and every live block's bytes is kept per checkpoint in untracked memory.

constexpr int kSlots = 64;
struct Block {
  uint8_t* p;
  size_t size;
  uint32_t id;
};
Block gBlocks[kSlots];
uint32_t gNextId = 1;

uint64_t StateHash() {
  uint64_t h = 0xcbf29ce484222325ull;
  auto mix = [&h](uint64_t v) { h = (h ^ v) * 0x100000001b3ull; };
  for (int i = 0; i < kSlots; i++) {
    mix((uintptr_t)gBlocks[i].p);
    mix(gBlocks[i].size);
    mix(gBlocks[i].id);
    if (gBlocks[i].p) {
      for (size_t j = 0; j < gBlocks[i].size; j += 97) mix(gBlocks[i].p[j]);
    }
  }
  return h;
}

void CheckLiveBlocks(const char* when) {
  for (int i = 0; i < kSlots; i++) {
    if (gBlocks[i].p && !HoldsBlock(gBlocks[i].p, gBlocks[i].size, gBlocks[i].id)) {
      ms_say("%s: block %d (id %u, %zu bytes at %p) lost its contents\n", when, i,
             gBlocks[i].id, gBlocks[i].size, (void*)gBlocks[i].p);
      _exit(1);
    }
  }
}

void ChurnScenario() {
  InitializeMemorySnapshots();
  volatile long& gStep = *(gStepPtr = (volatile long*)AllocateMemory(sizeof(long), MemoryKind::Generic));
  mstest::ArmWatchdog("ChurnScenario", &gStep, 60);
  const int kMaxDepth = 16;
  uint64_t* hashes = (uint64_t*)AllocateMemory((kMaxDepth + 1) * sizeof(uint64_t), MemoryKind::Generic);
  TakeFirstMemorySnapshot();  // checkpoint 0: no blocks
  hashes[0] = StateHash();
  uint32_t rng = 2024;  // on the stack: not rewound, so each rewind is followed by new work
  int top = 0, rewinds = 0, checkpoints = 1, callocs = 0, bigCallocs = 0;
  const uintptr_t brkStart = KernelBrk();
  uintptr_t brkMax = brkStart;
  for (gStep = 1; gStep <= 600; gStep++) {
    const uint32_t r = Next(&rng);
    const int slot = (int)(Next(&rng) % kSlots);
    Block& b = gBlocks[slot];
    const uint32_t op = r % 100;
    if (op < 45 && !b.p) {
      const size_t n = PickSize(Next(&rng));
      const bool zeroed = op >= 25;
      b.p = (uint8_t*)(zeroed ? calloc(1, n) : malloc(n));
      MS_CHECK(b.p != nullptr);
      if (zeroed) {
        if (!AllZero(b.p, n)) {
          ms_say("step %ld: calloc(%zu) returned memory that is not zero\n", gStep, n);
          _exit(1);
        }
        callocs++;
      }
      b.size = n;
      b.id = gNextId++;
      FillBlock(b.p, n, b.id);
    } else if (op < 75 && b.p) {
      free(b.p);
      b.p = nullptr;
      b.size = 0;
    } else if (op < 88 && b.p) {
      const size_t n = PickSize(Next(&rng));
      uint8_t* q = (uint8_t*)realloc(b.p, n);
      MS_CHECK(q != nullptr);
      MS_CHECK(HoldsBlock(q, n < b.size ? n : b.size, b.id));
      b.p = q;
      b.size = n;
      FillBlock(q, n, b.id);
    }
    if (gStep % 6 == 0 && top < kMaxDepth) {
      TakeDiffMemorySnapshot();
      hashes[++top] = StateHash();
      checkpoints++;
    }
    if (gStep % 15 == 0) {
      int k = (int)(Next(&rng) % (uint32_t)(top < 3 ? top + 1 : 4));
      if (top >= kMaxDepth) k = top / 2;
      Rewind(k);
      top -= k;
      rewinds++;
      if (StateHash() != hashes[top]) {
        ms_say("step %ld: state differs from checkpoint %d after a rewind\n", gStep, top);
        _exit(1);
      }
      CheckLiveBlocks("after a rewind");
      // calloc right after a rewind, in every size class: zeroed, even where the rewind
      // gave back heap grown after the target checkpoint.
      for (int i = 0; i < 6; i++) {
        const size_t n = i == 5 ? (3u << 20) : PickSize(Next(&rng));
        uint8_t* z = (uint8_t*)calloc(1, n);
        MS_CHECK(z != nullptr);
        if (!AllZero(z, n)) {
          ms_say("step %ld: calloc(%zu) after a rewind is not zero\n", gStep, n);
          _exit(1);
        }
        bigCallocs += n >= (128u << 10);
        free(z);
      }
    }
    if (KernelBrk() > brkMax) brkMax = KernelBrk();
  }
  // No tracked memory ever vanished: every checkpoint stayed restorable.
  MS_CHECK_EQ(Stats().oldest_restorable, 0);
  CheckLiveBlocks("at the end");
  MS_CHECK(rewinds >= 40);
  ms_say("600 malloc/calloc/realloc/free steps: %d checkpoints, %d rewinds, %d callocs "
         "checked (+%d large after rewinds), heap grew by up to %lu KiB\n",
         checkpoints, rewinds, callocs, bigCallocs, (unsigned long)((brkMax - brkStart) >> 10));
}

TEST(AllocatorTest, MallocCallocReallocFreeAcrossRewinds) { MS_IN_CHILD(ChurnScenario()); }

// ---------------------------------------------------------------------------------------
// Unpinned: glibc mmap's chunks above the threshold and trims the heap top.

// glibc's chunk header precedes the block: the size word's IS_MMAPPED bit (read through a
// laundered address, the compiler cannot see the header as part of the allocation).
__attribute__((noinline)) bool IsMmappedChunk(const void* p) {
  uintptr_t header = (uintptr_t)p - sizeof(size_t);
  return (*(const volatile size_t*)header & 2) != 0;
}

void UnpinnedSetup(const char* what) {
  // Fixed thresholds (no dynamic adjustment inherited from the test runner).
  MS_CHECK(mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1);
  MS_CHECK(mallopt(M_TRIM_THRESHOLD, 128 * 1024) == 1);
  MS_CHECK(mallopt(M_TOP_PAD, 0) == 1);
  InitializeMemorySnapshots();
  MS_CHECK(memsnap_set_pin_allocator(false) == MemsnapStatus::Ok);
  mstest::ArmWatchdog(what, &gSetupStep, 30);
}

void MmapChunksScenario() {
  UnpinnedSetup("MmapChunksScenario");
  const size_t n = 1 << 20;
  TakeFirstMemorySnapshot();  // checkpoint 0
  // Allocated and freed between two checkpoints: never tracked, nothing to refuse.
  uint8_t* t = (uint8_t*)malloc(n);
  MS_CHECK(t && IsMmappedChunk(t));
  memset(t, 0x33, n);
  free(t);
  TakeDiffMemorySnapshot();  // checkpoint 1
  uint8_t* a = (uint8_t*)malloc(n);
  MS_CHECK(a && IsMmappedChunk(a));
  memset(a, 0x11, n);
  TakeDiffMemorySnapshot();  // checkpoint 2: the chunk's mapping is tracked from here
  MS_CHECK(MemoryRangeIsTracked(a, n));
  memset(a, 0x22, n);
  Rewind(0);  // checkpoint 2
  MS_CHECK(a[0] == 0x11 && a[n - 1] == 0x11 && a[n / 2] == 0x11);
  Rewind(1);  // checkpoint 1: the chunk did not exist; its pages are given back (zero)
  MS_CHECK(!MemoryRangeIsTracked(a, n));
  MS_CHECK(AllZero(a, n));  // still mapped (memsnap never unmaps), reads as zero
  uint8_t* z = (uint8_t*)calloc(1, n);
  MS_CHECK(z && IsMmappedChunk(z));
  MS_CHECK(AllZero(z, n));
  free(z);
  MS_CHECK_EQ(Stats().saved_checkpoints, 2);
}

TEST(AllocatorTest, UnpinnedMmapChunksRewindExactly) {
  SKIP_UNLESS_GLIBC_MALLOC();
  MS_IN_CHILD(MmapChunksScenario());
}

void RewindNewest(void*) { Rewind(0); }

// Parses "tracked memory 0x<a>-0x<b> was unmapped" out of `msg`.
bool UnmappedRange(const char* msg, uintptr_t* a, uintptr_t* b) {
  const char* s = strstr(msg, "tracked memory 0x");
  if (!s) return false;
  unsigned long x, y;
  if (sscanf(s, "tracked memory 0x%lx-0x%lx was unmapped", &x, &y) != 2) return false;
  *a = x;
  *b = y;
  return true;
}

void ExpectRefusedRewind(uintptr_t lo, uintptr_t hi, const char* what) {
  char msg[1024];
  int status = mstest::StatusAndStderrOfChild(RewindNewest, nullptr, msg, sizeof msg);
  uintptr_t a = 0, b = 0;
  if (!(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT) || !UnmappedRange(msg, &a, &b) ||
      strncmp(msg, "memsnap: RestoreMemoryToLastSavedCheckpoint: ", 45) != 0 ||
      strchr(msg, '\n') != msg + strlen(msg) - 1 || a < lo || b > hi || a >= b) {
    ms_say("%s: expected a one-line refusal naming memory within 0x%lx-0x%lx, got status "
           "%#x and: %s\n",
           what, (unsigned long)lo, (unsigned long)hi, status, msg);
    _exit(1);
  }
}

void MmapChunkFreedAfterCheckpointScenario() {
  UnpinnedSetup("MmapChunkFreedAfterCheckpointScenario");
  const size_t n = 1 << 20;
  TakeFirstMemorySnapshot();  // checkpoint 0
  uint8_t* a = (uint8_t*)malloc(n);
  MS_CHECK(a && IsMmappedChunk(a));
  memset(a, 0x44, n);
  TakeDiffMemorySnapshot();  // checkpoint 1: tracked
  const uintptr_t lo = ((uintptr_t)a - 16) & ~(uintptr_t)(Granule() - 1);
  free(a);  // munmap
  // Every rewind now would have to write the vanished pages: refused, naming them.
  ExpectRefusedRewind(lo, (uintptr_t)a + n + Granule(), "munmap'd chunk");
  // A checkpoint taken after the free is restorable, and exactly.
  TakeDiffMemorySnapshot();  // checkpoint 2
  MS_CHECK_EQ(Stats().oldest_restorable, 2);
  uint8_t* c = (uint8_t*)calloc(1, n);
  MS_CHECK(c && AllZero(c, n));
  memset(c, 0x55, n);
  free(c);
  Rewind(0);
  uint8_t* d = (uint8_t*)calloc(1, n);
  MS_CHECK(d && AllZero(d, n));
}

TEST(AllocatorTest, UnpinnedChunkFreedAfterCheckpointRefusesOlderRewinds) {
  SKIP_UNLESS_GLIBC_MALLOC();
  MS_IN_CHILD(MmapChunkFreedAfterCheckpointScenario());
}

// Heap growth and trimming: 40 blocks of 100 KiB from the brk heap, freed after a
// checkpoint. Pinned, the heap keeps its size and the rewind is exact; unpinned (or after
// an explicit malloc_trim) the top is given back and rewinds to before are refused.
void TrimScenario(bool pinned) {
  if (pinned) {
    InitializeMemorySnapshots();
    mstest::ArmWatchdog("TrimScenario(pinned)", &gSetupStep, 30);
  } else {
    MS_CHECK(mallopt(M_MMAP_THRESHOLD, 4 << 20) == 1);  // 100 KiB blocks come from brk
    MS_CHECK(mallopt(M_TRIM_THRESHOLD, 128 * 1024) == 1);
    MS_CHECK(mallopt(M_TOP_PAD, 0) == 1);
    InitializeMemorySnapshots();
    MS_CHECK(memsnap_set_pin_allocator(false) == MemsnapStatus::Ok);
    mstest::ArmWatchdog("TrimScenario", &gSetupStep, 30);
  }
  const int kBlocks = 40;
  const size_t n = 100 * 1024;
  uint8_t** blocks = (uint8_t**)AllocateMemory(kBlocks * sizeof(void*), MemoryKind::Generic);
  TakeFirstMemorySnapshot();  // checkpoint 0
  const uintptr_t brk0 = KernelBrk();
  for (int i = 0; i < kBlocks; i++) {
    blocks[i] = (uint8_t*)malloc(n);
    MS_CHECK(blocks[i] && !IsMmappedChunk(blocks[i]));
    FillBlock(blocks[i], n, (uint32_t)i + 1);
  }
  const uintptr_t brk1 = KernelBrk();
  MS_CHECK(brk1 > brk0);  // the heap grew after checkpoint 0
  TakeDiffMemorySnapshot();  // checkpoint 1: the growth is tracked
  for (int i = kBlocks - 1; i >= 0; i--) free(blocks[i]);
  const uintptr_t brk2 = KernelBrk();
  if (pinned) {
    MS_CHECK_EQ(brk2, brk1);  // no automatic trim
    Rewind(0);  // checkpoint 1: every block back
    for (int i = 0; i < kBlocks; i++) MS_CHECK(HoldsBlock(blocks[i], n, (uint32_t)i + 1));
    for (int i = kBlocks - 1; i >= 0; i--) free(blocks[i]);
    MS_CHECK(malloc_trim(0) == 1);  // an explicit trim still gives the top back
  }
  const uintptr_t brk3 = KernelBrk();
  MS_CHECK(brk3 < brk1);
  ExpectRefusedRewind(brk3 & ~(uintptr_t)(Granule() - 1), brk1 + Granule(), "trimmed heap");
  ms_say("heap %s: +%lu KiB, then %ld KiB after the frees\n", pinned ? "pinned" : "unpinned",
         (unsigned long)(brk1 - brk0) >> 10, ((long)brk3 - (long)brk1) / 1024);
  (void)brk2;
}

TEST(AllocatorTest, PinnedHeapIsNotTrimmedExplicitTrimRefusesRewind) {
  SKIP_UNLESS_GLIBC_MALLOC();
  MS_IN_CHILD(TrimScenario(true));
}

TEST(AllocatorTest, UnpinnedHeapTrimRefusesRewind) {
  SKIP_UNLESS_GLIBC_MALLOC();
  MS_IN_CHILD(TrimScenario(false));
}

// A rewind across heap growth puts the kernel's program break back where it was at the
// checkpoint, matching glibc's rewound record of it (__curbrk). Were the kernel's break
// left higher, the next checkpoint would track that tail again as new memory, glibc's
// next sbrk would move the break down over it (unmapping it) and a later one map it
// afresh, writable, and memsnap would refuse rewinds to every earlier checkpoint though
// the program only called malloc.
void BrkBelowKernelScenario() {
  InitializeMemorySnapshots();
  mstest::ArmWatchdog("BrkBelowKernelScenario", &gSetupStep, 30);
  uint8_t** keep = (uint8_t**)AllocateMemory(4 * sizeof(void*), MemoryKind::Generic);
  TakeFirstMemorySnapshot();  // checkpoint 0
  const uintptr_t brk0 = KernelBrk();
  keep[0] = (uint8_t*)malloc(2 << 20);
  MS_CHECK(keep[0] != nullptr);
  const uintptr_t brk1 = KernelBrk();
  MS_CHECK(brk1 > brk0 + (1 << 20));
  TakeDiffMemorySnapshot();  // checkpoint 1: the growth is tracked
  Rewind(1);                 // checkpoint 0: libc's break is brk0 again, the kernel's is not
  MS_CHECK_EQ((uintptr_t)sbrk(0), brk0);
  TakeDiffMemorySnapshot();  // checkpoint 1 again
  keep[1] = (uint8_t*)malloc(256 << 10);  // sbrk from brk0: the kernel's break moves down
  keep[2] = (uint8_t*)malloc(4 << 20);    // and up again, past brk1
  MS_CHECK(keep[1] && keep[2]);
  memset(keep[2], 0x66, 4 << 20);
  TakeDiffMemorySnapshot();  // checkpoint 2
  MS_CHECK_EQ(Stats().oldest_restorable, 0);  // fails today: 2
  keep[3] = (uint8_t*)calloc(1, 64);
  Rewind(1);  // checkpoint 1: refused today
  uint8_t* z = (uint8_t*)calloc(1, 4 << 20);
  MS_CHECK(z && AllZero(z, 4 << 20));
}

TEST(AllocatorTest, RewindAcrossHeapGrowthThenRegrowth) {
  SKIP_UNLESS_GLIBC_MALLOC();
  MS_IN_CHILD(BrkBelowKernelScenario());
}

}  // namespace allocator_test
