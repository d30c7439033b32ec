// Worker threads allocating through their own allocator caches, rewound across several
// checkpoint levels (issue 12). Four workers each keep a linked list of malloc'd nodes
// (16 bytes to 1 MiB, each filled with the pattern of its seed): they push, free, realloc
// and check nodes, hand nodes to each other through a mutex-guarded mailbox (so blocks
// are freed by a thread other than the one that allocated them), churn, and every other
// round ask the allocator to purge from their own thread. The lists and the mailbox are
// tracked globals, rewound with the heap. Workers are parked on a futex in untracked
// memory at every checkpoint and rewind.
//
// At every checkpoint and after every rewind the controller walks every list, checks each
// node's bytes against its seed and compares a hash of the whole structure with the one
// taken at the checkpoint (kept on its stack). Workers go on after each rewind: an
// allocator whose rewound heap and unrewound thread caches disagree hands out memory that
// is still in use, and the next walk finds a node overwritten. Exit status and output:
// hosts/host_support.h.
#include <pthread.h>

#include "host_support.h"

namespace {

using namespace hs;

constexpr int kWorkers = 4;
constexpr int kMaxLevels = 10;
constexpr long kMaxNodes = 400;  // per list

struct Node {
  Node* next;
  uint64_t seed;
  size_t size;  // payload bytes after the header
  uint8_t* Payload() { return (uint8_t*)(this + 1); }
};

// Tracked, rewound with the heap.
Node* gLists[kWorkers];
long gCounts[kWorkers];
pthread_mutex_t gMailboxLock = PTHREAD_MUTEX_INITIALIZER;  // unlocked at every checkpoint
Node* gMailbox;
long gMailboxCount;

Crew* gCrew;          // untracked
Progress* gProgress;  // untracked

size_t PayloadSize(uint64_t seed) {
  switch (seed % 32) {
    case 0: return (256u << 10) + seed % (768u << 10);
    case 1: case 2: case 3: return (8u << 10) + seed % (56u << 10);
    default: return 16 + seed % 2048;
  }
}

Node* NewNode(uint64_t seed) {
  const size_t n = PayloadSize(seed);
  Node* node = (Node*)malloc(sizeof(Node) + n);
  if (!node) Broken("malloc(%zu) returned null", sizeof(Node) + n);
  node->next = nullptr;
  node->seed = seed;
  node->size = n;
  FillPattern(node->Payload(), n, seed);
  return node;
}

// The node's header and bytes agree with its seed; otherwise a divergence naming it.
// Whether memsnap tracks the memory at `p`, for the divergence messages: a loss in
// untracked memory points at an exclusion, one in tracked memory at a change memsnap did
// not see.
const char* TrackedWord(const void* p) {
  return MemoryRangeIsTracked((void*)p, 1) ? "tracked" : "untracked";
}

void CheckNode(const Node* node, const char* when, const char* where) {
  if (node->size != PayloadSize(node->seed))
    Diverged("%s: a node in %s (%p, %s) has size %zu, its seed says %zu", when, where,
             (const void*)node, TrackedWord(node), node->size, PayloadSize(node->seed));
  const size_t bad = PatternMismatch(((Node*)node)->Payload(), node->size, node->seed);
  if (bad != node->size)
    Diverged("%s: a node in %s (%p, %zu bytes) differs from its seed at byte %zu (%s)", when,
             where, (const void*)node, node->size, bad, TrackedWord(((Node*)node)->Payload() + bad));
}

// Unlinks and returns the i-th node of list `w`.
Node* Unlink(int w, long i) {
  Node** link = &gLists[w];
  for (long k = 0; k < i; k++) link = &(*link)->next;
  Node* node = *link;
  *link = node->next;
  node->next = nullptr;
  gCounts[w]--;
  return node;
}

void WorkerRound(int w, uint64_t* rng, int round) {
  for (int op = 0; op < 160; op++) {
    const uint64_t x = NextRandom(rng);
    const long count = gCounts[w];
    switch (x % 10) {
      case 0: case 1: case 2: case 3: {  // push
        Node* node = NewNode(NextRandom(rng));
        node->next = gLists[w];
        gLists[w] = node;
        gCounts[w]++;
        break;
      }
      case 4: case 5:  // free a node
        if (count > 0) free(Unlink(w, (long)(x >> 8) % count));
        break;
      case 6:  // realloc a node to another size, refilled for its new seed
        if (count > 0) {
          Node* node = Unlink(w, (long)(x >> 8) % count);
          CheckNode(node, "before a realloc", "a worker's list");
          const uint64_t seed = NextRandom(rng);
          Node* q = (Node*)realloc(node, sizeof(Node) + PayloadSize(seed));
          if (!q) Broken("realloc returned null");
          q->seed = seed;
          q->size = PayloadSize(seed);
          FillPattern(q->Payload(), q->size, seed);
          q->next = gLists[w];
          gLists[w] = q;
          gCounts[w]++;
        }
        break;
      case 7:  // hand a node to whoever takes it from the mailbox
        if (count > 0) {
          Node* node = Unlink(w, (long)(x >> 8) % count);
          pthread_mutex_lock(&gMailboxLock);
          node->next = gMailbox;
          gMailbox = node;
          gMailboxCount++;
          pthread_mutex_unlock(&gMailboxLock);
        }
        break;
      case 8: {  // free a node another thread (probably) allocated
        pthread_mutex_lock(&gMailboxLock);
        Node* node = gMailbox;
        if (node) {
          gMailbox = node->next;
          gMailboxCount--;
        }
        pthread_mutex_unlock(&gMailboxLock);
        if (node) {
          CheckNode(node, "taken from the mailbox", "the mailbox");
          free(node);
        }
        break;
      }
      default:  // check a node in place
        if (count > 0) {
          Node* node = gLists[w];
          for (long k = (long)(x >> 8) % count; k > 0; k--) node = node->next;
          CheckNode(node, "during a round", "a worker's list");
        }
        break;
    }
  }
  while (gCounts[w] > kMaxNodes) free(Unlink(w, 0));
  Churn(rng, 2);
  if ((round + w) % 2 == 0) PurgeNow();
}

void* Worker(void* p) {
  const int w = (int)(intptr_t)p;
  uint64_t rng = 0x7ead0000u + (uint64_t)w;  // on this thread's stack: never rewound
  int seen = 0;
  int round = 0;
  while (AwaitRound(gCrew, &seen)) {
    WorkerRound(w, &rng, round++);
    FinishRound(gCrew);
  }
  return nullptr;
}

void ControllerAlongside(void* rng) {
  Churn((uint64_t*)rng, 3);
  PurgeNow();
}

struct State {
  uint64_t hash;
  long nodes;
  long bytes;
};

// Walks every list and the mailbox (workers are parked), checking each node.
State Observe(const char* when) {
  gProgress->phase = "observe";
  Hash h;
  State s = {0, 0, 0};
  char where[32];
  for (int w = 0; w <= kWorkers; w++) {
    Node* node = w < kWorkers ? gLists[w] : gMailbox;
    const long want = w < kWorkers ? gCounts[w] : gMailboxCount;
    snprintf(where, sizeof where, w < kWorkers ? "list %d" : "the mailbox", w);
    long seen = 0;
    const Node* last = nullptr;
    for (; node; node = node->next) {
      if (++seen > want)
        Diverged("%s: %s holds more nodes than its count %ld", when, where, want);
      CheckNode(node, when, where);
      h.Mix(node->seed);
      s.bytes += (long)node->size;
      last = node;
    }
    if (seen != want)
      Diverged("%s: %s holds %ld nodes, its count says %ld (the last node's link at %p is null, %s)",
               when, where, seen, want, last ? (const void*)&last->next : (const void*)&gLists[w],
               TrackedWord(last ? (const void*)&last->next : (const void*)&gLists[w]));
    h.Mix((uint64_t)want);
    s.nodes += want;
  }
  s.hash = h.h;
  return s;
}

}  // namespace

int main() {
  InitializeMemorySnapshots();
  gProgress = StartWatchdog("threaded_host", 120);
  DetectAllocator();
  gCrew = (Crew*)AllocateMemory(sizeof(Crew), MemoryKind::Generic);
  gCrew->workers = kWorkers;
  uint64_t rng = 0xfeed;  // the controller's, on its stack

  pthread_t threads[kWorkers];
  for (int w = 0; w < kWorkers; w++) {
    if (pthread_create(&threads[w], nullptr, Worker, (void*)(intptr_t)w) != 0) HostError("pthread_create");
  }
  RunRound(gCrew, ControllerAlongside, &rng);  // every thread has its allocator caches now
  RunRound(gCrew, ControllerAlongside, &rng);
  Observe("before the first snapshot");

  Snapshotted() = true;
  Mark("first snapshot");
  TakeFirstMemorySnapshot();
  CheckBackend();
  Timeline<State, kMaxLevels> t;  // on the controller's stack: never rewound
  t.rounds = 2;
  t.expect[0] = Observe("checkpoint 0");
  auto round = [&]() { t.Round([&] { RunRound(gCrew, ControllerAlongside, &rng); }); };
  auto checkpoint = [&]() { t.Checkpoint(Observe); };
  auto rewind = [&](int levels) {
    t.RewindAndCheck(levels, Observe, [](const State& s, const State& e, const char* when) {
      if (s.hash != e.hash || s.nodes != e.nodes)
        Diverged("%s: hash %016llx over %ld nodes; the checkpoint had %016llx over %ld nodes",
                 when, (unsigned long long)s.hash, s.nodes, (unsigned long long)e.hash, e.nodes);
    });
  };

  // Checkpoints 1..6, then rewinds of every depth, each followed by new work.
  for (int i = 0; i < 6; i++) {
    round();
    checkpoint();
  }
  round();
  rewind(0);  // checkpoint 6
  round();
  round();
  rewind(1);  // checkpoint 5
  round();
  checkpoint();  // 6
  round();
  rewind(2);  // checkpoint 4
  round();
  checkpoint();  // 5
  round();
  checkpoint();  // 6
  round();
  rewind(3);  // checkpoint 3
  round();
  round();
  checkpoint();  // 4
  round();
  rewind(4);  // checkpoint 0
  for (int i = 0; i < 3; i++) {
    round();
    checkpoint();  // 1..3
  }
  round();
  rewind(1);  // checkpoint 2
  round();
  round();
  snprintf(t.when, sizeof t.when, "after %d rewinds and %d rounds", t.rewinds, t.rounds);
  const State last = Observe(t.when);

  const MemsnapStats st = Stats();
  StopCrew(gCrew);
  for (int w = 0; w < kWorkers; w++) pthread_join(threads[w], nullptr);
  Say("PASS threaded_host: allocator %s, backend %s, %zu-byte pages: %d rounds, %d rewinds, "
      "%ld nodes (%ld KiB) at the end, %llu faults\n",
      TheAllocator()->name, BackendName(st.backend), memsnap_page_size(), t.rounds, t.rewinds,
      last.nodes, last.bytes >> 10, (unsigned long long)st.faults_handled);
  _exit(0);
}
