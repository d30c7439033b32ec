//! The SQLite side of the end-to-end workloads: a minimal hand-written binding to the
//! system libsqlite3 (linked into the bench only, never into the library), the database
//! the workloads share, and the deterministic SQL they run against it.
//!
//! Everything here is deterministic: the same size and seeds give the same rows and the
//! same statements in every process, so a batch run after a rewind, in a fork server's
//! child or in another backend's child must produce the same result digest. That
//! agreement is one of the end-to-end checks (bench/e2e.rs).

use std::ffi::{c_char, c_int, c_void, CStr, CString};

#[allow(non_camel_case_types)]
type sqlite3 = c_void;
#[allow(non_camel_case_types)]
type sqlite3_stmt = c_void;

const SQLITE_OK: c_int = 0;
const SQLITE_ROW: c_int = 100;
const SQLITE_DONE: c_int = 101;
const SQLITE_OPEN_READWRITE: c_int = 0x2;
const SQLITE_OPEN_CREATE: c_int = 0x4;
const SQLITE_INTEGER: c_int = 1;
const SQLITE_FLOAT: c_int = 2;
const SQLITE_NULL: c_int = 5;
/// SQLITE_TRANSIENT: SQLite copies bound bytes before the call returns.
const TRANSIENT: isize = -1;

#[link(name = "sqlite3")]
extern "C" {
    fn sqlite3_open_v2(
        name: *const c_char,
        db: *mut *mut sqlite3,
        flags: c_int,
        vfs: *const c_char,
    ) -> c_int;
    fn sqlite3_errmsg(db: *mut sqlite3) -> *const c_char;
    fn sqlite3_prepare_v2(
        db: *mut sqlite3,
        sql: *const c_char,
        n: c_int,
        st: *mut *mut sqlite3_stmt,
        tail: *mut *const c_char,
    ) -> c_int;
    fn sqlite3_step(st: *mut sqlite3_stmt) -> c_int;
    fn sqlite3_reset(st: *mut sqlite3_stmt) -> c_int;
    fn sqlite3_finalize(st: *mut sqlite3_stmt) -> c_int;
    fn sqlite3_bind_int64(st: *mut sqlite3_stmt, i: c_int, v: i64) -> c_int;
    fn sqlite3_bind_blob(
        st: *mut sqlite3_stmt,
        i: c_int,
        p: *const c_void,
        n: c_int,
        destructor: isize,
    ) -> c_int;
    fn sqlite3_column_count(st: *mut sqlite3_stmt) -> c_int;
    fn sqlite3_column_type(st: *mut sqlite3_stmt, i: c_int) -> c_int;
    fn sqlite3_column_int64(st: *mut sqlite3_stmt, i: c_int) -> i64;
    fn sqlite3_column_double(st: *mut sqlite3_stmt, i: c_int) -> f64;
    fn sqlite3_column_blob(st: *mut sqlite3_stmt, i: c_int) -> *const c_void;
    fn sqlite3_column_bytes(st: *mut sqlite3_stmt, i: c_int) -> c_int;
    fn sqlite3_changes(db: *mut sqlite3) -> c_int;
}

/// A 64-bit mixing hash (FNV-style fold with a multiply-xorshift finish per word).
#[derive(Clone, Copy)]
pub struct Digest(pub u64);

impl Digest {
    pub fn new() -> Self {
        Digest(0xcbf2_9ce4_8422_2325)
    }
    pub fn mix(&mut self, v: u64) {
        let mut x = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^= x >> 29;
        self.0 = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    }
    pub fn bytes(&mut self, b: &[u8]) {
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            self.mix(u64::from_le_bytes(c.try_into().unwrap()));
        }
        let mut last = [0u8; 8];
        last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.mix(u64::from_le_bytes(last) ^ ((b.len() as u64) << 56));
    }
}

/// splitmix64: the statement generator's and the row generator's PRNG.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An open in-memory database. Any SQLite error is fatal to the measuring child: it
/// prints the statement and SQLite's message and exits non-zero, which the parent records
/// as a failed (so unverified) sample.
pub struct Db {
    db: *mut sqlite3,
}

fn die(what: &str, msg: &str) -> ! {
    eprintln!("bench sqlite: {what}: {msg}");
    // SAFETY: ends the measuring child at once; nothing of its state needs unwinding.
    unsafe { libc::_exit(3) }
}

/// The key column's range: k is uniform in 0..KEYS.
const KEYS: u64 = 1 << 30;

impl Db {
    /// Opens a fresh private in-memory database (`:memory:`): its pages live in SQLite's
    /// page cache on the process's heap, from the real allocator.
    pub fn open_memory() -> Db {
        let mut db = std::ptr::null_mut();
        // SAFETY: a NUL-terminated name and a valid out pointer; no VFS name.
        let rc = unsafe {
            sqlite3_open_v2(
                c":memory:".as_ptr(),
                &mut db,
                SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE,
                std::ptr::null(),
            )
        };
        if rc != SQLITE_OK {
            die("sqlite3_open_v2(:memory:)", &rc.to_string());
        }
        Db { db }
    }

    fn errmsg(&self) -> String {
        // SAFETY: errmsg returns a NUL-terminated string owned by the live connection.
        unsafe { CStr::from_ptr(sqlite3_errmsg(self.db)) }
            .to_string_lossy()
            .into_owned()
    }

    fn prepare(&self, sql: &str) -> *mut sqlite3_stmt {
        let c = CString::new(sql).expect("SQL without NUL");
        let mut st = std::ptr::null_mut();
        // SAFETY: a NUL-terminated statement, valid out pointers, a live connection.
        let rc =
            unsafe { sqlite3_prepare_v2(self.db, c.as_ptr(), -1, &mut st, std::ptr::null_mut()) };
        if rc != SQLITE_OK || st.is_null() {
            die(sql, &self.errmsg());
        }
        st
    }

    /// Runs one statement to completion, mixing every result value and the number of
    /// rows it changed into `d`.
    pub fn run(&self, sql: &str, d: &mut Digest) {
        let st = self.prepare(sql);
        // SAFETY: `st` is a live prepared statement of this connection until finalized;
        // column accessors are called on a row with indexes below the column count, and
        // a blob pointer is read for exactly the byte count SQLite reports for it.
        unsafe {
            let cols = sqlite3_column_count(st);
            loop {
                match sqlite3_step(st) {
                    SQLITE_ROW => {
                        for i in 0..cols {
                            match sqlite3_column_type(st, i) {
                                SQLITE_INTEGER => d.mix(sqlite3_column_int64(st, i) as u64),
                                SQLITE_FLOAT => d.mix(sqlite3_column_double(st, i).to_bits()),
                                SQLITE_NULL => d.mix(0x6e75_6c6c),
                                _ => {
                                    let p = sqlite3_column_blob(st, i) as *const u8;
                                    let n = sqlite3_column_bytes(st, i) as usize;
                                    if !p.is_null() {
                                        d.bytes(std::slice::from_raw_parts(p, n));
                                    }
                                }
                            }
                        }
                    }
                    SQLITE_DONE => break,
                    _ => die(sql, &self.errmsg()),
                }
            }
            sqlite3_finalize(st);
            d.mix(sqlite3_changes(self.db) as u64);
        }
    }

    pub fn exec(&self, sql: &str) {
        self.run(sql, &mut Digest::new());
    }

    /// One integer from a query returning one row.
    pub fn int(&self, sql: &str) -> i64 {
        let st = self.prepare(sql);
        // SAFETY: a live statement; column 0 read only on a row.
        unsafe {
            if sqlite3_step(st) != SQLITE_ROW {
                die(sql, &self.errmsg());
            }
            let v = sqlite3_column_int64(st, 0);
            sqlite3_finalize(st);
            v
        }
    }

    /// The database's size in bytes (pages in use times the page size).
    pub fn bytes(&self) -> usize {
        (self.int("PRAGMA page_count") * self.int("PRAGMA page_size")) as usize
    }

    /// A hash of every row in key order: what a rewind is compared by at the SQL level.
    pub fn content_hash(&self) -> u64 {
        let mut d = Digest::new();
        self.run("SELECT id, k, v FROM t ORDER BY id", &mut d);
        d.0
    }
}

/// The prepared database: table `t(id, k, v)` with an index on `k`, filled with rows of
/// 200-1799 bytes of pseudo-random payload until it holds about `target` bytes (the index
/// is built last: a sort, much faster than random inserts). Returns the number of rows
/// (ids run 1..=rows).
pub fn build(db: &Db, target: usize) -> u64 {
    db.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER NOT NULL, v BLOB NOT NULL)");
    db.exec("BEGIN");
    let st = db.prepare("INSERT INTO t(id, k, v) VALUES(?1, ?2, ?3)");
    let mut rng = Rng::new(0x5eed_0fdb);
    let mut payload = vec![0u8; 2048];
    let mut rows = 0u64;
    loop {
        rows += 1;
        let len = 200 + rng.below(1600) as usize;
        for c in payload[..len].chunks_mut(8) {
            let w = rng.next().to_le_bytes();
            c.copy_from_slice(&w[..c.len()]);
        }
        // SAFETY: a live statement; the payload outlives the step (and SQLite copies it).
        let rc = unsafe {
            sqlite3_bind_int64(st, 1, rows as i64);
            sqlite3_bind_int64(st, 2, rng.below(KEYS) as i64);
            sqlite3_bind_blob(st, 3, payload.as_ptr() as *const _, len as c_int, TRANSIENT);
            let rc = sqlite3_step(st);
            sqlite3_reset(st);
            rc
        };
        if rc != SQLITE_DONE {
            die("INSERT INTO t", &db.errmsg());
        }
        // The index adds about 3% (20 bytes a row).
        if rows % 4096 == 0 && db.bytes() + db.bytes() / 32 >= target {
            break;
        }
    }
    // SAFETY: finalizing the live statement once.
    unsafe { sqlite3_finalize(st) };
    db.exec("COMMIT");
    db.exec("CREATE INDEX t_k ON t(k)");
    rows
}

/// One generated SQL statement over a database of about `rows` rows, as a fuzzer would
/// produce it: literal values in the text, so every statement is parsed and planned.
/// `writes_only` leaves out the queries (the record/replay write load).
pub fn statement(rng: &mut Rng, rows: u64, writes_only: bool) -> String {
    let id = 1 + rng.below(rows + rows / 8);
    let k = rng.below(KEYS);
    let len = 100 + rng.below(400);
    let tag = rng.next() as u32;
    // A key range of `span` holds one row on average, whatever the database's size, so a
    // statement's work does not grow with it (only the tree's depth does).
    let span = KEYS / rows.max(1);
    let roll = if writes_only {
        rng.below(60)
    } else {
        rng.below(100)
    };
    match roll {
        0..=29 => format!("UPDATE t SET k = {k}, v = printf('%08x%0{len}d', {tag}, {id}) WHERE id = {id}"),
        30..=44 => format!("INSERT OR REPLACE INTO t(id, k, v) VALUES({id}, {k}, printf('%08x%0{len}d', {tag}, {k}))"),
        45..=54 => format!("DELETE FROM t WHERE id = {id}"),
        55..=59 => format!("UPDATE t SET k = k + 1 WHERE k BETWEEN {k} AND {}", k + span * 2),
        60..=84 => format!(
            "SELECT count(*), total(length(v)) FROM t WHERE k BETWEEN {k} AND {}",
            k + span * 8
        ),
        _ => format!("SELECT id, k, length(v), substr(v, 1, 8) FROM t WHERE id >= {id} ORDER BY id LIMIT 10"),
    }
}

/// One batch: `n` generated statements from `seed` in a transaction. Returns the digest
/// of everything the statements returned and changed.
pub fn batch(db: &Db, rows: u64, seed: u64, n: usize, writes_only: bool) -> u64 {
    let mut rng = Rng::new(seed);
    let mut d = Digest::new();
    db.run("BEGIN", &mut d);
    for _ in 0..n {
        let sql = statement(&mut rng, rows, writes_only);
        db.run(&sql, &mut d);
    }
    db.run("COMMIT", &mut d);
    d.0
}
