//! Unit tests of the page hash and the zero-run entries.

use super::{hash_words, Entry, ZERO_RUN};

#[test]
fn page_hash() {
    let zero = [0u64; 512];
    let (hz, z) = hash_words(&zero);
    assert!(z);
    let mut page = [0u64; 512];
    page[511] = 1;
    let (h1, z1) = hash_words(&page);
    assert!(!z1);
    assert_ne!(h1, hz);
    // The same high bit flipped in two words of one lane must not cancel out (a plain
    // FNV-1a over words would).
    page[511] = 0;
    page[0] = 1 << 63;
    page[4] = 1 << 63;
    let (h2, _) = hash_words(&page);
    assert_ne!(h2, hz);
    // Swapped words differ.
    let mut a = [0u64; 512];
    a[0] = 7;
    a[1] = 9;
    let mut b = a;
    b.swap(0, 1);
    assert_ne!(hash_words(&a).0, hash_words(&b).0);
    assert_eq!(hash_words(&a), hash_words(&a));
}

#[test]
fn entry_extent() {
    let e = Entry {
        at: 0x10000 | ZERO_RUN,
        value: 3,
    };
    assert_eq!(e.start(), 0x10000);
    assert_eq!(e.end(4096), 0x13000);
    let h = Entry {
        at: 0x20000,
        value: 0xdead,
    };
    assert_eq!(h.end(4096), 0x21000);
}
