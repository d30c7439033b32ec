// A real SQLite in-memory database, rewound (issue 12). Three worker threads share one
// serialized connection and insert, update and delete 200-300 KB blobs and small keyed
// rows, with malloc/realloc/free churn of their own; the controller churns too and asks
// the allocator to purge (hs::PurgeNow), so that between checkpoints the allocator gives
// pages back to the kernel as a long-running process's would. Workers are parked on a
// futex in untracked memory at every checkpoint and rewind.
//
// Five checkpoint levels; rewinds to the newest checkpoint and across one, two and three
// levels, each followed by `PRAGMA integrity_check`, a check that every row still holds
// the bytes its seed says, and a hash of the whole database compared with the one taken
// at that checkpoint (kept on the controller's stack). After each rewind the workers go
// on, so a rewound allocator that hands out memory still in use shows up at the next
// check. Exit status and output: hosts/host_support.h.
#include <pthread.h>
#include <sqlite3.h>

#include "host_support.h"

namespace {

using namespace hs;

constexpr int kWorkers = 3;
constexpr int kMaxLevels = 8;
constexpr long kMaxBlobRows = 36;
constexpr int kKeys = 4000;

sqlite3* gDb;        // opened before the first snapshot
Crew* gCrew;         // untracked
Progress* gProgress; // untracked

// ---- SQL helpers. Every failure is fatal: a setup error before the first snapshot, a
// divergence after it (a rewound database that SQLite finds corrupt, or out of memory).

sqlite3_stmt* Prepare(const char* sql) {
  sqlite3_stmt* st = nullptr;
  const int rc = sqlite3_prepare_v2(gDb, sql, -1, &st, nullptr);
  if (rc != SQLITE_OK) Broken("prepare \"%s\": %s", sql, sqlite3_errstr(rc));
  return st;
}

void StepDone(sqlite3_stmt* st, const char* what) {
  const int rc = sqlite3_step(st);
  if (rc != SQLITE_DONE) Broken("%s: %s", what, sqlite3_errstr(rc));
  sqlite3_finalize(st);
}

void Exec(const char* sql) {
  const int rc = sqlite3_exec(gDb, sql, nullptr, nullptr, nullptr);
  if (rc != SQLITE_OK) Broken("\"%s\": %s", sql, sqlite3_errstr(rc));
}

long CountRows(const char* table) {
  char sql[64];
  snprintf(sql, sizeof sql, "SELECT count(*) FROM %s", table);
  sqlite3_stmt* st = Prepare(sql);
  if (sqlite3_step(st) != SQLITE_ROW) Broken("%s", sql);
  const long n = (long)sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return n;
}

size_t BlobLength(uint64_t seed) { return (200u << 10) + seed % (100u << 10); }
size_t TextLength(uint64_t seed) { return 8 + seed % 193; }

// The text a kv row with seed `s` holds: letters from the seed's byte pattern.
void FillText(char* out, size_t n, uint64_t s) {
  FillPattern((uint8_t*)out, n, s);
  for (size_t i = 0; i < n; i++) out[i] = (char)('a' + (uint8_t)out[i] % 26);
}

void WriteBlob(const char* sql, uint64_t seed) {
  const size_t len = BlobLength(seed);
  uint8_t* buf = (uint8_t*)malloc(len);
  if (!buf) Broken("malloc(%zu) returned null", len);
  FillPattern(buf, len, seed);
  sqlite3_stmt* st = Prepare(sql);
  sqlite3_bind_int64(st, 1, (sqlite3_int64)seed);  // below 2^63
  sqlite3_bind_blob(st, 2, buf, (int)len, SQLITE_STATIC);
  StepDone(st, sql);
  free(buf);
}

void PutKey(uint64_t r) {
  const uint64_t s = r >> 1;
  const size_t n = TextLength(s);
  char text[256];
  FillText(text, n, s);
  sqlite3_stmt* st = Prepare("INSERT OR REPLACE INTO kv(k, s, v) VALUES(?1, ?2, ?3)");
  sqlite3_bind_int64(st, 1, (sqlite3_int64)(r % kKeys));
  sqlite3_bind_int64(st, 2, (sqlite3_int64)s);
  sqlite3_bind_text(st, 3, text, (int)n, SQLITE_STATIC);
  StepDone(st, "insert kv");
}

// One worker's share of a round: two new blobs, one rewritten, one deleted once the table
// is large, 60 keyed rows written and a slice of them deleted, allocation churn, and every
// other round a purge from this thread (its own allocator cache included).
void WorkerRound(int w, uint64_t* rng, int round) {
  for (int i = 0; i < 2; i++)
    WriteBlob("INSERT INTO blobs(seed, data) VALUES(?1, ?2)", NextRandom(rng) >> 1);
  WriteBlob("UPDATE blobs SET seed = ?1, data = ?2 "
            "WHERE id = (SELECT id FROM blobs ORDER BY random() LIMIT 1)",
            NextRandom(rng) >> 1);
  if (CountRows("blobs") > kMaxBlobRows)
    Exec("DELETE FROM blobs WHERE id IN (SELECT id FROM blobs ORDER BY random() LIMIT 2)");
  for (int i = 0; i < 60; i++) PutKey(NextRandom(rng));
  char sql[96];
  snprintf(sql, sizeof sql, "DELETE FROM kv WHERE k %% 53 = %d", (int)(NextRandom(rng) % 53));
  Exec(sql);
  Churn(rng, 3);
  if ((round + w) % 2 == 0) PurgeNow();
}

struct WorkerArg {
  int index;
};

void* Worker(void* p) {
  const int w = ((WorkerArg*)p)->index;
  uint64_t rng = 0x5eed0000u + (uint64_t)w;  // on this thread's stack: never rewound
  int seen = 0;
  int round = 0;
  while (AwaitRound(gCrew, &seen)) {
    WorkerRound(w, &rng, round++);
    FinishRound(gCrew);
  }
  return nullptr;
}

// The controller's work during a round: churn, then a purge.
void ControllerAlongside(void* rng) {
  Churn((uint64_t*)rng, 4);
  PurgeNow();
}

// ---- What a checkpoint is compared by.
struct DbState {
  uint64_t hash;
  long blobs;
  long keys;
  long blobBytes;
};

// Integrity check, every row against its seed, and the hash of both tables in key order.
DbState Observe(const char* when) {
  gProgress->phase = "observe";
  DbState s = {0, 0, 0, 0};
  Hash h;
  sqlite3_stmt* st = Prepare("PRAGMA integrity_check");
  int rc = sqlite3_step(st);
  if (rc != SQLITE_ROW) Diverged("%s: PRAGMA integrity_check: %s", when, sqlite3_errstr(rc));
  const char* verdict = (const char*)sqlite3_column_text(st, 0);
  if (!verdict || strcmp(verdict, "ok") != 0) {
    char line[320];  // the verdict's first lines, on one line
    snprintf(line, sizeof line, "%s", verdict ? verdict : "(null)");
    for (char* c = line; *c; c++)
      if (*c == '\n') *c = '|';
    Diverged("%s: PRAGMA integrity_check: %s", when, line);
  }
  sqlite3_finalize(st);

  st = Prepare("SELECT id, seed, data FROM blobs ORDER BY id");
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    const long long id = sqlite3_column_int64(st, 0);
    const uint64_t seed = (uint64_t)sqlite3_column_int64(st, 1);
    const uint8_t* data = (const uint8_t*)sqlite3_column_blob(st, 2);
    const size_t len = (size_t)sqlite3_column_bytes(st, 2);
    if (len != BlobLength(seed))
      Diverged("%s: blob row %lld has %zu bytes, its seed says %zu", when, id, len, BlobLength(seed));
    const size_t bad = PatternMismatch(data, len, seed);
    if (bad != len) Diverged("%s: blob row %lld differs from its seed at byte %zu of %zu", when, id, bad, len);
    h.Mix((uint64_t)id);
    h.Mix(seed);
    h.Bytes(data, len);
    s.blobs++;
    s.blobBytes += (long)len;
  }
  if (rc != SQLITE_DONE) Diverged("%s: reading blobs: %s", when, sqlite3_errstr(rc));
  sqlite3_finalize(st);

  st = Prepare("SELECT k, s, v FROM kv ORDER BY k");
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    const long long k = sqlite3_column_int64(st, 0);
    const uint64_t seed = (uint64_t)sqlite3_column_int64(st, 1);
    const char* v = (const char*)sqlite3_column_text(st, 2);
    const size_t n = (size_t)sqlite3_column_bytes(st, 2);
    char want[256];
    FillText(want, TextLength(seed), seed);
    if (n != TextLength(seed) || memcmp(v, want, n) != 0)
      Diverged("%s: kv row %lld does not hold the text of its seed", when, k);
    h.Mix((uint64_t)k);
    h.Mix(seed);
    s.keys++;
  }
  if (rc != SQLITE_DONE) Diverged("%s: reading kv: %s", when, sqlite3_errstr(rc));
  sqlite3_finalize(st);
  // The index agrees with the table (integrity_check checks its structure, this its use).
  st = Prepare("SELECT count(*) FROM kv INDEXED BY kv_s WHERE s >= 0");
  if (sqlite3_step(st) != SQLITE_ROW || sqlite3_column_int64(st, 0) != s.keys)
    Diverged("%s: the kv_s index does not count the table's %ld rows", when, s.keys);
  sqlite3_finalize(st);
  h.Mix((uint64_t)s.blobs);
  h.Mix((uint64_t)s.keys);
  s.hash = h.h;
  return s;
}

}  // namespace

int main() {
  InitializeMemorySnapshots();
  gProgress = StartWatchdog("sqlite_host", 120);
  DetectAllocator();
  gCrew = (Crew*)AllocateMemory(sizeof(Crew), MemoryKind::Generic);
  gCrew->workers = kWorkers;

  if (sqlite3_threadsafe() == 0) HostError("this SQLite is built without thread support");
  int rc = sqlite3_open_v2(":memory:", &gDb,
                           SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr);
  if (rc != SQLITE_OK) HostError("sqlite3_open_v2: %s", sqlite3_errstr(rc));
  Exec("CREATE TABLE blobs(id INTEGER PRIMARY KEY, seed INTEGER NOT NULL, data BLOB NOT NULL)");
  Exec("CREATE TABLE kv(k INTEGER PRIMARY KEY, s INTEGER NOT NULL, v TEXT NOT NULL)");
  Exec("CREATE INDEX kv_s ON kv(s)");
  uint64_t rng = 0xc0ffee;  // the controller's, on its stack
  for (int i = 0; i < 16; i++) WriteBlob("INSERT INTO blobs(seed, data) VALUES(?1, ?2)", NextRandom(&rng) >> 1);
  for (int i = 0; i < 500; i++) PutKey(NextRandom(&rng));

  pthread_t threads[kWorkers];
  WorkerArg args[kWorkers];
  for (int w = 0; w < kWorkers; w++) {
    args[w].index = w;
    if (pthread_create(&threads[w], nullptr, Worker, &args[w]) != 0) HostError("pthread_create");
  }
  RunRound(gCrew, ControllerAlongside, &rng);  // every thread has its allocator caches now
  Observe("before the first snapshot");

  Snapshotted() = true;
  Mark("first snapshot");
  TakeFirstMemorySnapshot();
  CheckBackend();
  Timeline<DbState, kMaxLevels> t;  // on the controller's stack: never rewound
  t.rounds = 1;
  t.expect[0] = Observe("checkpoint 0");
  auto round = [&]() { t.Round([&] { RunRound(gCrew, ControllerAlongside, &rng); }); };
  auto checkpoint = [&]() { t.Checkpoint(Observe); };
  auto rewind = [&](int levels) {
    t.RewindAndCheck(levels, Observe, [](const DbState& s, const DbState& e, const char* when) {
      if (s.hash != e.hash || s.blobs != e.blobs || s.keys != e.keys)
        Diverged("%s: database hash %016llx with %ld blobs and %ld keys; the checkpoint had "
                 "%016llx with %ld blobs and %ld keys",
                 when, (unsigned long long)s.hash, s.blobs, s.keys, (unsigned long long)e.hash,
                 e.blobs, e.keys);
    });
  };

  for (int i = 0; i < 4; i++) {  // checkpoints 1..4
    round();
    checkpoint();
  }
  round();
  rewind(0);  // back to checkpoint 4
  round();
  rewind(1);  // one level: checkpoint 3
  round();
  checkpoint();  // 4 again
  round();
  rewind(2);  // two levels: checkpoint 2
  round();
  checkpoint();  // 3 again
  round();
  round();
  rewind(3);  // three levels: checkpoint 0
  // Keep using the rewound database and allocator, then once more around.
  round();
  round();
  checkpoint();  // 1 again
  round();
  rewind(0);
  round();
  snprintf(t.when, sizeof t.when, "after %d rewinds and %d rounds", t.rewinds, t.rounds);
  const DbState last = Observe(t.when);

  const MemsnapStats st = Stats();
  StopCrew(gCrew);
  for (int w = 0; w < kWorkers; w++) pthread_join(threads[w], nullptr);
  Say("PASS sqlite_host: allocator %s, backend %s, %zu-byte pages: %d rounds, %d rewinds, "
      "%ld blobs (%ld KiB) and %ld keys at the end, %llu faults\n",
      TheAllocator()->name, BackendName(st.backend), memsnap_page_size(), t.rounds, t.rewinds,
      last.blobs, last.blobBytes >> 10, last.keys, (unsigned long long)st.faults_handled);
  _exit(0);
}
