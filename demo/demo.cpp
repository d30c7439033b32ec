// memsnap demo: a small bank ledger that checkpoints and rewinds its own memory.
//
// The workload is an in-memory key-value store of bank accounts:
//   - an open-addressing hash table (linear probing) of 64-byte records in the malloc heap,
//     each record pointing at a malloc'd memo string;
//   - globals: a pseudo-random generator, an operation counter and a statistics struct;
//   - a journal ring buffer in tracked memory from AllocateMemory(n, MemoryKind::Tracked).
// Every byte of that state is rewound by memsnap. The controller (this file's main) keeps
// what it must remember across rewinds on its stack or in untracked memory
// (AllocateMemory(n, MemoryKind::Generic)), and prints with snprintf + write(2): stdio's
// buffers are tracked memory too and would be rewound along with everything else.

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <unistd.h>

#include "MemorySnapshotHelpers.h"

using namespace mozilla::recordreplay;

namespace {

// ---------------------------------------------------------------------------------------
// Output (no stdio buffers: snprintf into the stack, then write(2)).

void say(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void say(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (n <= 0) return;
  size_t len = (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1;
  bool newline = false;
  if (len > 0 && buf[len - 1] == '\n') {
    newline = true;
    len--;
  }
  while (len > 0 && buf[len - 1] == ' ') len--;
  if (newline) buf[len++] = '\n';
  const char* p = buf;
  while (len > 0) {
    ssize_t w = write(1, p, len);
    if (w <= 0) return;
    p += w;
    len -= (size_t)w;
  }
}

// ---------------------------------------------------------------------------------------
// The workload: all of this is tracked memory (globals, malloc heap, tracked allocation).

constexpr uint32_t kFirstAccount = 1000000;
constexpr uint32_t kAccounts = 6000;         // account numbers 1000000 .. 1005999
constexpr uint32_t kSlots = 16384;           // hash table slots (1 MiB of records)
constexpr uint32_t kJournalEntries = 4096;   // 64 KiB journal ring

enum SlotState : uint32_t { kEmpty = 0, kLive = 1, kTombstone = 2 };

struct Record {
  uint32_t key;
  uint32_t state;
  int64_t balance;  // cents
  uint32_t version;
  uint32_t memo_len;
  char* memo;       // malloc'd, NUL-terminated
  char owner[32];
};
static_assert(sizeof(Record) == 64, "one record is 64 bytes");

struct JournalEntry {
  uint32_t seq;
  uint32_t key;
  int32_t amount;
  uint16_t op;
  uint16_t aux;
};
static_assert(sizeof(JournalEntry) == 16, "one journal entry is 16 bytes");

enum Op : uint16_t { kOpen = 1, kClose, kDeposit, kTransfer, kInterest, kMiss };

struct BankStats {
  uint64_t opened, closed, deposits, transfers, interest, misses;
  uint64_t live;
  int64_t money_in;   // cents ever deposited (incl. interest)
  int64_t money_out;  // cents paid out on closing
};

Record* g_table;            // malloc'd before the first snapshot
JournalEntry* g_journal;    // AllocateMemory(Tracked)
uint32_t g_journal_head;
uint64_t g_rng;
uint64_t g_ops;
BankStats g_stats;

uint64_t next_rand() {  // splitmix64
  uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint32_t slot_of(uint32_t key) { return (uint32_t)((key * 0x9E3779B1u) >> 18) & (kSlots - 1); }

Record* find(uint32_t key) {
  uint32_t i = slot_of(key);
  for (uint32_t n = 0; n < kSlots; n++, i = (i + 1) & (kSlots - 1)) {
    Record* r = &g_table[i];
    if (r->state == kEmpty) return nullptr;
    if (r->state == kLive && r->key == key) return r;
  }
  return nullptr;
}

Record* insert_slot(uint32_t key) {  // key must be absent
  uint32_t i = slot_of(key);
  for (uint32_t n = 0; n < kSlots; n++, i = (i + 1) & (kSlots - 1)) {
    if (g_table[i].state != kLive) return &g_table[i];
  }
  abort();
}

void journal(Op op, uint32_t key, int64_t amount, uint16_t aux = 0) {
  JournalEntry* e = &g_journal[g_journal_head];
  g_journal_head = (g_journal_head + 1) % kJournalEntries;
  e->seq = (uint32_t)g_ops;
  e->key = key;
  e->amount = (int32_t)amount;
  e->op = op;
  e->aux = aux;
}

void set_memo(Record* r, const char* what) {
  char text[512];
  int pad = (int)(next_rand() % 160);  // variable sizes so the heap layout varies
  int n = snprintf(text, sizeof text, "acct %u %s at op %llu, v%u, balance %lld.%02lld%*s|",
                   r->key, what, (unsigned long long)g_ops, r->version,
                   (long long)(r->balance / 100), (long long)(r->balance % 100), pad, "");
  char* m = (char*)malloc((size_t)n + 1);
  if (!m) abort();
  memcpy(m, text, (size_t)n + 1);
  free(r->memo);
  r->memo = m;
  r->memo_len = (uint32_t)n;
}

const char* const kNames[] = {"Ada", "Brook", "Cyra", "Dov", "Elif", "Femi", "Goran", "Hana",
                              "Ines", "Jun", "Kofi", "Lior", "Mira", "Nils", "Oona", "Pavel"};

void open_account(uint32_t key, int64_t deposit) {
  Record* r = insert_slot(key);
  r->key = key;
  r->state = kLive;
  r->balance = deposit;
  r->version = 1;
  r->memo = nullptr;
  snprintf(r->owner, sizeof r->owner, "%s %s-%u", kNames[key % 16], kNames[(key / 16) % 16],
           key % 97);
  set_memo(r, "opened");
  g_stats.opened++;
  g_stats.live++;
  g_stats.money_in += deposit;
  journal(kOpen, key, deposit);
}

void close_account(Record* r) {
  g_stats.money_out += r->balance;
  journal(kClose, r->key, r->balance);
  free(r->memo);
  memset(r, 0, sizeof *r);
  r->state = kTombstone;
  g_stats.closed++;
  g_stats.live--;
}

uint32_t random_key() { return kFirstAccount + (uint32_t)(next_rand() % kAccounts); }

enum Workload { kSeed, kBanking, kReconcile, kInterestRun, kAudit };

// One operation of the "banking" day: opens, closes, deposits, transfers.
void banking_op() {
  uint64_t dice = next_rand() % 100;
  uint32_t key = random_key();
  Record* r = find(key);
  if (dice < 30) {
    int64_t amount = 1000 + (int64_t)(next_rand() % 500000);
    if (!r) {
      open_account(key, amount);
    } else {
      r->balance += amount;
      r->version++;
      g_stats.deposits++;
      g_stats.money_in += amount;
      journal(kDeposit, key, amount);
    }
  } else if (dice < 45) {
    if (r) {
      close_account(r);
    } else {
      g_stats.misses++;
      journal(kMiss, key, 0);
    }
  } else if (dice < 65) {
    if (r) {
      int64_t amount = 100 + (int64_t)(next_rand() % 20000);
      r->balance += amount;
      r->version++;
      g_stats.deposits++;
      g_stats.money_in += amount;
      if (r->version % 4 == 0) set_memo(r, "updated");
      journal(kDeposit, key, amount);
    } else {
      g_stats.misses++;
      journal(kMiss, key, 0);
    }
  } else {
    Record* to = find(random_key());
    if (r && to && r != to && r->balance > 0) {
      int64_t amount = 1 + (int64_t)(next_rand() % (uint64_t)r->balance);
      r->balance -= amount;
      to->balance += amount;
      r->version++;
      to->version++;
      g_stats.transfers++;
      journal(kTransfer, key, amount, (uint16_t)(to->key - kFirstAccount));
    } else {
      g_stats.misses++;
      journal(kMiss, key, 0);
    }
  }
}

// Runs a round; returns the number of operations it performed.
uint64_t run_round(Workload w, uint64_t count) {
  uint64_t done = 0;
  switch (w) {
    case kSeed:
      while (g_stats.live < count) {
        uint32_t key = random_key();
        if (!find(key)) open_account(key, 1000 + (int64_t)(next_rand() % 1000000));
        g_ops++;
        done++;
      }
      break;
    case kBanking:
      for (; done < count; done++) {
        banking_op();
        g_ops++;
      }
      break;
    case kReconcile:  // rewrites every record's owner with the same bytes; 1 in 64 gets a
                      // 1-cent correction. Every table page is written, few change.
      for (uint32_t i = 0; i < kSlots; i++) {
        Record* r = &g_table[i];
        if (r->state != kLive) continue;
        char owner[sizeof r->owner];
        memset(owner, 0, sizeof owner);
        snprintf(owner, sizeof owner, "%s %s-%u", kNames[r->key % 16],
                 kNames[(r->key / 16) % 16], r->key % 97);
        memcpy(r->owner, owner, sizeof owner);
        if (++done % 64 == 0) {
          r->balance += 1;
          r->version++;
          g_stats.money_in += 1;
          journal(kDeposit, r->key, 1);
        }
        g_ops++;
      }
      break;
    case kInterestRun:  // 1.5% interest on every account: touches every table page
      for (uint32_t i = 0; i < kSlots; i++) {
        Record* r = &g_table[i];
        if (r->state != kLive) continue;
        int64_t interest = r->balance * 15 / 1000;
        r->balance += interest;
        r->version++;
        g_stats.interest++;
        g_stats.money_in += interest;
        g_ops++;
        done++;
      }
      journal(kInterest, 0, 15);
      break;
    case kAudit:  // close every account holding less than $500 (new memos for the rest)
      for (uint32_t i = 0; i < kSlots; i++) {
        Record* r = &g_table[i];
        if (r->state != kLive) continue;
        if (r->balance < 50000) {
          close_account(r);
        } else if (r->version % 3 == 0) {
          set_memo(r, "audited");
        }
        g_ops++;
        done++;
      }
      break;
  }
  return done;
}

// ---------------------------------------------------------------------------------------
// Reading the state (never writes tracked memory).

struct Fnv {
  uint64_t h = 0xcbf29ce484222325ull;
  void word(uint64_t w) {
    h ^= w;
    h *= 0x100000001b3ull;
  }
  void bytes(const void* p, size_t n) {
    const unsigned char* b = (const unsigned char*)p;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      uint64_t w;
      memcpy(&w, b + i, 8);
      word(w);
    }
    for (; i < n; i++) word(b[i]);
  }
};

// A 64-bit fingerprint of the whole workload state: globals, every table slot (including
// the memo pointer values, i.e. the heap layout), every memo's bytes, and the journal.
uint64_t fingerprint() {
  Fnv f;
  f.word(g_rng);
  f.word(g_ops);
  f.word(g_journal_head);
  f.bytes(&g_stats, sizeof g_stats);
  f.bytes(g_table, sizeof(Record) * kSlots);
  for (uint32_t i = 0; i < kSlots; i++) {
    const Record* r = &g_table[i];
    if (r->state == kLive && r->memo) f.bytes(r->memo, (size_t)r->memo_len + 1);
  }
  f.bytes(g_journal, sizeof(JournalEntry) * kJournalEntries);
  return f.h;
}

// Whether the ledger is internally consistent: live count and money match the globals.
bool ledger_balanced() {
  int64_t sum = 0;
  uint64_t live = 0;
  for (uint32_t i = 0; i < kSlots; i++) {
    const Record* r = &g_table[i];
    if (r->state != kLive) continue;
    sum += r->balance;
    live++;
    if (!r->memo || strlen(r->memo) != r->memo_len) return false;
  }
  return live == g_stats.live && sum == g_stats.money_in - g_stats.money_out;
}

// ---------------------------------------------------------------------------------------
// The controller's records: untracked memory (AllocateMemory(Generic)), never rewound.

constexpr int kMaxPositions = 16;
constexpr size_t kBitmapBytes = kAccounts / 8;

struct Saved {  // what the controller remembers about one saved checkpoint position
  char label[8];
  uint64_t fingerprint;
  uint64_t ops;
  uint64_t live;
  uint8_t accounts[kBitmapBytes];  // which account numbers were open
};

struct Ledger {
  Saved pos[kMaxPositions];
  uint64_t first_timeline_fp[kMaxPositions];  // fingerprints of timeline A, by position
  uint64_t first_timeline_ops[kMaxPositions];
  Record table_at_0[kSlots];  // byte copy of the table at checkpoint A0
};

void account_bitmap(uint8_t* out) {
  memset(out, 0, kBitmapBytes);
  for (uint32_t i = 0; i < kSlots; i++) {
    const Record* r = &g_table[i];
    if (r->state == kLive) {
      uint32_t k = r->key - kFirstAccount;
      out[k / 8] |= (uint8_t)(1u << (k % 8));
    }
  }
}

bool bit(const uint8_t* bm, uint32_t k) { return (bm[k / 8] >> (k % 8)) & 1; }

MemsnapStats get_stats() {
  MemsnapStats s;
  memset(&s, 0, sizeof s);
  s.struct_size = sizeof s;
  if (memsnap_get_stats(&s) != MemsnapStatus::Ok) {
    say("memsnap_get_stats failed\n");
    _exit(2);
  }
  return s;
}

const char* backend_name(MemsnapBackend b) {
  switch (b) {
    case MemsnapBackend::Inactive: return "inactive";
    case MemsnapBackend::LinuxMprotect: return "Linux mprotect + SIGSEGV";
    case MemsnapBackend::MacExceptionPort: return "macOS Mach exception port";
    case MemsnapBackend::MacSignal: return "macOS SIGBUS/SIGSEGV";
    case MemsnapBackend::LinuxUffd: return "Linux userfaultfd write protection (sync)";
    case MemsnapBackend::LinuxUffdAsync: return "Linux userfaultfd write protection (async, PAGEMAP_SCAN)";
  }
  return "?";
}

void fmt_time(char* out, size_t n, uint64_t ns) {
  double us = (double)ns / 1000.0;
  if (us >= 10000.0)
    snprintf(out, n, "%.1f ms", us / 1000.0);
  else if (us >= 100.0)
    snprintf(out, n, "%.0f us", us);
  else
    snprintf(out, n, "%.1f us", us);
}

constexpr char kRowFmt[] = "  %-9s %-13s %7s %7s %9s %10s %9s  %016llx  %s";

void row(const char* event, const char* checkpoint, const char* ops, const char* pages,
         const char* kib, const char* time, const char* live, unsigned long long fp,
         const char* note) {
  char line[512];
  snprintf(line, sizeof line, kRowFmt, event, checkpoint, ops, pages, kib, time, live, fp, note);
  say("%s\n", line);
}

struct Demo {
  Ledger* L;
  size_t saved = 0;         // saved checkpoint positions (stack: survives rewinds)
  int rewinds_ok = 0;
  int rewinds_total = 0;
  int failures = 0;

  // Records what position `saved - 1` holds (in untracked memory).
  void remember(const char* label, uint64_t fp) {
    Saved* s = &L->pos[saved - 1];
    snprintf(s->label, sizeof s->label, "%s", label);
    s->fingerprint = fp;
    s->ops = g_ops;
    s->live = g_stats.live;
    account_bitmap(s->accounts);
  }

  void first() {
    TakeFirstMemorySnapshot();
    saved = 1;
    uint64_t fp = fingerprint();
    remember("A0", fp);
    L->first_timeline_fp[0] = fp;
    L->first_timeline_ops[0] = g_ops;
    memcpy(L->table_at_0, g_table, sizeof(Record) * kSlots);
  }

  // Takes a diff snapshot after a round of `ops` operations; prints the line.
  uint64_t checkpoint(const char* label, uint64_t ops, const char* note) {
    MemsnapStats before = get_stats();
    TakeDiffMemorySnapshot();
    saved++;
    MemsnapStats after = get_stats();
    uint64_t fp = fingerprint();
    remember(label, fp);
    size_t diff_pages = after.saved_diff_pages - before.saved_diff_pages;
    if (after.saved_checkpoints != saved) {
      say("  !! library reports %zu saved checkpoints, expected %zu\n", after.saved_checkpoints, saved);
      failures++;
    }
    char t[32], o[16], dirty[16], kib[16], live[16];
    fmt_time(t, sizeof t, after.last_snapshot_ns);
    snprintf(o, sizeof o, "%llu", (unsigned long long)ops);
    snprintf(dirty, sizeof dirty, "%zu", before.active_dirty_pages);
    snprintf(kib, sizeof kib, "%.1f", (double)(diff_pages * after.page_size) / 1024.0);
    snprintf(live, sizeof live, "%llu", (unsigned long long)g_stats.live);
    row("snapshot", label, o, dirty, kib, t, live, (unsigned long long)fp, note);
    return fp;
  }

  // Prints an uncommitted round.
  void scribble(uint64_t ops) {
    MemsnapStats s = get_stats();
    char o[16], dirty[16], live[16];
    snprintf(o, sizeof o, "%llu", (unsigned long long)ops);
    snprintf(dirty, sizeof dirty, "%zu", s.active_dirty_pages);
    snprintf(live, sizeof live, "%llu", (unsigned long long)g_stats.live);
    row("scribble", "(uncommitted)", o, dirty, "-", "-", live,
        (unsigned long long)fingerprint(), "");
  }

  // Rewinds to saved position `target`, then proves the state is the one recorded there.
  void rewind_to(size_t target) {
    rewinds_total++;
    const Saved* want = &L->pos[target];
    const Saved* from = &L->pos[saved - 1];

    // Before: pick one account open now but not at the target (must vanish) and one open
    // at the target but closed now (must come back). Stack copies only.
    uint8_t now[kBitmapBytes];
    account_bitmap(now);
    uint32_t gone = 0, back = 0;
    for (uint32_t k = 0; k < kAccounts && (!gone || !back); k++) {
      uint32_t j = (k * 2654435761u + 17) % kAccounts;  // spread the pick around
      if (!gone && bit(now, j) && !bit(want->accounts, j)) gone = kFirstAccount + j;
      if (!back && !bit(now, j) && bit(want->accounts, j)) back = kFirstAccount + j;
    }
    bool gone_before = gone && find(gone) != nullptr;
    bool back_before = back && find(back) != nullptr;
    char from_label[16];
    snprintf(from_label, sizeof from_label, "%s", from->label);
    size_t levels = saved - 1 - target;

    MemsnapStats before = get_stats();
    {
      AutoDisallowMemoryChanges disallow;
      RestoreMemoryToLastSavedCheckpoint();
      for (size_t i = 0; i < levels; i++) RestoreMemoryToLastSavedDiffCheckpoint();
    }
    FixupFreeRegionsAfterRewind();
    saved = target + 1;
    MemsnapStats after = get_stats();

    size_t pages = before.active_dirty_pages + (before.saved_diff_pages - after.saved_diff_pages);
    uint64_t ns = after.total_restore_ns - before.total_restore_ns;
    uint64_t fp = fingerprint();
    uint8_t then[kBitmapBytes];
    account_bitmap(then);
    bool fp_ok = fp == want->fingerprint;
    bool ops_ok = g_ops == want->ops && g_stats.live == want->live;
    bool accounts_ok = memcmp(then, want->accounts, kBitmapBytes) == 0;
    bool balanced = ledger_balanced();
    Record* g = gone ? find(gone) : nullptr;
    Record* b = back ? find(back) : nullptr;
    bool probes_ok = (!gone || (gone_before && !g)) && (!back || (!back_before && b));
    bool lib_ok = after.saved_checkpoints == saved && after.active_dirty_pages == 0;
    bool ok = fp_ok && ops_ok && accounts_ok && balanced && probes_ok && lib_ok;
    if (ok) rewinds_ok++; else failures++;

    char route[48], pg[16], t[32], live[16];
    snprintf(route, sizeof route, "%s -> %s", from_label, want->label);
    snprintf(pg, sizeof pg, "%zu", pages);
    fmt_time(t, sizeof t, ns);
    snprintf(live, sizeof live, "%llu", (unsigned long long)g_stats.live);
    row("rewind", route, "-", pg, "-", t, live, (unsigned long long)fp,
        ok ? "OK" : "MISMATCH");
    if (gone)
      say("  %-9s   acct %u, opened after %s: %s\n", "", gone, want->label,
          !g ? "lookup finds nothing (gone)" : "STILL PRESENT");
    if (back && b)
      say("  %-9s   acct %u, closed after %s: back, owner \"%s\", balance %lld.%02lld\n", "", back,
          want->label, b->owner, (long long)(b->balance / 100), (long long)(b->balance % 100));
    else if (back)
      say("  %-9s   acct %u, closed after %s: STILL MISSING\n", "", back, want->label);
    say("  %-9s   %s fingerprint, %s op counter (%llu), %s account set, ledger %s; %zu level%s popped\n",
        "", fp_ok ? "same" : "DIFFERENT", ops_ok ? "same" : "DIFFERENT",
        (unsigned long long)g_ops, accounts_ok ? "same" : "DIFFERENT",
        balanced ? "balanced" : "UNBALANCED", levels, levels == 1 ? "" : "s");
    if (!lib_ok)
      say("  %-9s   !! library reports %zu saved checkpoints and %zu dirty pages (expected %zu, 0)\n",
          "", after.saved_checkpoints, after.active_dirty_pages, saved);
  }
};

}  // namespace

int main() {
  // Each round of timeline A: a different size, so the pages written vary.
  // (A3 is a reconciliation pass that writes every table page but changes few of them.)
  static const uint64_t kRoundOps[] = {150, 1200, 0, 5000, 400, 12000, 40};
  constexpr int kRounds = sizeof kRoundOps / sizeof kRoundOps[0];

  InitializeMemorySnapshots();
  Demo d;
  d.L = (Ledger*)AllocateMemory(sizeof(Ledger), MemoryKind::Generic);

  // The store, built before the first snapshot.
  g_table = (Record*)calloc(kSlots, sizeof(Record));
  if (!g_table) return 2;
  g_journal = (JournalEntry*)AllocateMemory(sizeof(JournalEntry) * kJournalEntries, MemoryKind::Tracked);
  g_rng = 0x5eedba4cull;

  say("memsnap demo: a bank ledger that checkpoints and rewinds its own memory\n");
  say("  state: %u-slot open-addressing table (%zu KiB, malloc heap) + malloc'd memos,\n", kSlots,
      sizeof(Record) * kSlots / 1024);
  say("         globals (rng, op counter, stats), %zu KiB journal ring (AllocateMemory Tracked)\n",
      sizeof(JournalEntry) * kJournalEntries / 1024);
  uint64_t seed_ops = run_round(kSeed, 2800);

  d.first();  // checkpoint A0
  {
    MemsnapStats s = get_stats();
    say("  memsnap: %s, %zu-byte pages, tracking %.1f MiB in %zu regions, %zu restore thread%s\n",
        backend_name(s.backend), s.page_size, (double)s.tracked_bytes / (1024.0 * 1024.0),
        s.tracked_regions, s.restore_threads, s.restore_threads == 1 ? "" : "s");
    if (s.backend == MemsnapBackend::LinuxUffd || s.backend == MemsnapBackend::LinuxUffdAsync)
      say("           %.1f MiB of it guarded by userfaultfd (the rest, mapping edges and file\n"
          "           data the mode cannot register, by mprotect); base copy %.1f MiB\n",
          (double)s.uffd_tracked_bytes / (1024.0 * 1024.0),
          (double)s.base_copy_bytes / (1024.0 * 1024.0));
    say("\n");
  }
  say("  PAGES  snapshot/scribble: pages written since the newest checkpoint (active_dirty_pages);\n");
  say("         rewind: page copies written back (dirty pages + every diff popped)\n");
  say("  DIFF   what the snapshot saved of them, unchanged pages dropped (saved_diff_pages growth)\n");
  say("  TIME   memsnap's own time: the snapshot call, or all restore calls of a rewind\n\n");
  say("  %-9s %-13s %7s %7s %9s %10s %9s  %-16s  %s\n", "EVENT", "CHECKPOINT", "OPS", "PAGES",
      "DIFF KiB", "TIME", "ACCOUNTS", "FINGERPRINT", "CHECK / NOTE");
  say("  %-9s %-13s %7s %7s %9s %10s %9s  %-16s  %s\n", "---------", "-------------", "-------",
      "-------", "---------", "----------", "---------", "----------------", "------------");
  {
    MemsnapStats s = get_stats();
    char t[32], ops[16], live[16];
    fmt_time(t, sizeof t, s.last_snapshot_ns);
    snprintf(ops, sizeof ops, "%llu", (unsigned long long)seed_ops);
    snprintf(live, sizeof live, "%llu", (unsigned long long)g_stats.live);
    row("first", "A0", ops, "-", "-", t, live,
        (unsigned long long)d.L->pos[0].fingerprint, "seed: open accounts");
  }

  // Timeline A: checkpoints A1..A7.
  for (int r = 0; r < kRounds; r++) {
    bool reconcile = r == 2;
    uint64_t ops = run_round(reconcile ? kReconcile : kBanking, kRoundOps[r]);
    char label[8];
    snprintf(label, sizeof label, "A%d", r + 1);
    uint64_t fp = d.checkpoint(label, ops, reconcile ? "reconcile: rewrite all, change 1/64" : "banking");
    d.L->first_timeline_fp[r + 1] = fp;
    d.L->first_timeline_ops[r + 1] = g_ops;
  }

  // 1. Scribble past the newest checkpoint, then undo it.
  d.scribble(run_round(kBanking, 3000));
  d.rewind_to(d.saved - 1);

  // 2. Back to the middle of timeline A.
  d.rewind_to(3);

  // 3. A different future from A3: new seed, interest run, a banking day, an audit.
  g_rng = 0xb4a7c4ull;
  d.checkpoint("B4", run_round(kInterestRun, 0), "interest (new future)");
  d.checkpoint("B5", run_round(kBanking, 2000), "banking, new seed");
  d.checkpoint("B6", run_round(kAudit, 0), "audit: close < $500");
  if (d.L->pos[4].fingerprint == d.L->first_timeline_fp[4]) {
    say("  !! B4 equals A4: the new future is not different\n");
    d.failures++;
  }

  // 4. Back to the middle of timeline B, then all the way to A0.
  d.rewind_to(4);
  d.rewind_to(0);
  bool table_same = memcmp(d.L->table_at_0, g_table, sizeof(Record) * kSlots) == 0;
  say("  %-9s   table bytes vs. the copy taken at A0: %s\n", "", table_same ? "identical" : "DIFFERENT");
  if (!table_same) d.failures++;

  // 5. Determinism: the rng is part of the rewound state, so replaying round 1 from A0
  //    must land exactly on A1's fingerprint.
  uint64_t fp = d.checkpoint("A1'", run_round(kBanking, kRoundOps[0]), "replay of round 1");
  bool replay_ok = fp == d.L->first_timeline_fp[1] && g_ops == d.L->first_timeline_ops[1];
  say("  %-9s   replayed A1 fingerprint %s recorded A1 %016llx: %s\n", "",
      replay_ok ? "equals" : "DIFFERS FROM", (unsigned long long)d.L->first_timeline_fp[1],
      replay_ok ? "OK" : "MISMATCH");
  if (!replay_ok) d.failures++;

  MemsnapStats s = get_stats();
  char tsnap[32], trest[32];
  fmt_time(tsnap, sizeof tsnap, s.total_snapshot_ns);
  fmt_time(trest, sizeof trest, s.total_restore_ns);
  say("\n  summary: %llu write faults handled, %.1f MiB tracked, %.1f KiB held by page copies "
      "(%zu diff pages, %zu checkpoints saved)\n",
      (unsigned long long)s.faults_handled, (double)s.tracked_bytes / (1024.0 * 1024.0),
      (double)s.copy_bytes / 1024.0, s.saved_diff_pages, s.saved_checkpoints);
  say("           %llu snapshots in %s, %llu restore calls in %s\n",
      (unsigned long long)s.checkpoints_taken, tsnap, (unsigned long long)s.rewinds, trest);
  if (s.verify_pages_checked != 0) {
    say("           verifying mode: %llu pages compared with their checkpoint's hashes\n",
        (unsigned long long)s.verify_pages_checked);
  }

  if (d.failures == 0 && d.rewinds_ok == d.rewinds_total) {
    say("demo: all %d rewinds verified\n", d.rewinds_total);
    return 0;
  }
  say("demo: FAILED: %d of %d rewinds verified, %d check(s) failed\n", d.rewinds_ok,
      d.rewinds_total, d.failures);
  return 1;
}
