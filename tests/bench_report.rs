//! Unit tests of the bench's pure pieces (bench/json.rs, bench/goals.rs,
//! bench/results_md.rs, bench/heap_hash.rs), compiled here because the bench target runs
//! without a test harness. Run by `make rust-test`.

#[allow(dead_code)]
#[path = "../bench/goals.rs"]
mod goals;
#[allow(dead_code)]
#[path = "../bench/heap_hash.rs"]
mod heap_hash;
#[allow(dead_code)]
#[path = "../bench/json.rs"]
mod json;
#[allow(dead_code)]
#[path = "../bench/results_md.rs"]
mod results_md;

use json::{parse, Value};

#[test]
fn json_parses_nested_documents_and_escapes() {
    let v =
        parse(r#" {"a": [1, -2.5e3, true, null], "b": {"c": "x\"\\\n\u00e9"}, "d": {}} "#).unwrap();
    assert_eq!(v.get("a").arr().len(), 4);
    assert_eq!(v.get("a").arr()[1].num(), Some(-2500.0));
    assert_eq!(v.get("a").arr()[2].bool(), Some(true));
    assert!(v.get("a").arr()[3].is_null());
    assert_eq!(v.get("b").get("c").str(), Some("x\"\\\né"));
    assert!(v.get("d").members().is_empty());
    assert!(v.get("missing").get("deeper").is_null());
}

#[test]
fn json_rejects_malformed_documents() {
    for bad in [
        "",
        "{",
        "[1,]",
        "{\"a\" 1}",
        "\"open",
        "tru",
        "{} x",
        "[1 2]",
    ] {
        assert!(parse(bad).is_err(), "{bad:?} parsed");
    }
}

#[test]
fn json_writer_round_trips_through_the_parser() {
    let s = "tab\there \"quoted\" back\\slash \u{1}";
    assert_eq!(parse(&json::quote(s)).unwrap(), Value::Str(s.into()));
    assert_eq!(json::number(f64::NAN), "null");
    assert_eq!(parse(&json::number(0.125)).unwrap().num(), Some(0.125));
}

#[test]
fn heap_line_is_found_in_a_maps_text() {
    let maps = b"55d0c0000000-55d0c0021000 r--p 00000000 08:01 1 /bin/x\n\
55d0c1a3e000-55d0c5a5f000 rw-p 00000000 00:00 0                          [heap]\n\
7ffd1000-7ffd2000 rw-p 00000000 00:00 0 [stack]\n";
    assert_eq!(
        heap_hash::parse_heap_line(maps),
        Some((0x55d0c1a3e000, 0x55d0c5a5f000))
    );
    assert_eq!(
        heap_hash::parse_heap_line(b"1000-2000 rw-p 0 00:00 0 [stack]\n"),
        None
    );
}

#[test]
fn memory_hash_sees_a_single_changed_byte() {
    let mut v = vec![7u64; 1001];
    let (p, n) = (v.as_ptr() as usize, v.len() * 8);
    // SAFETY: the vector's own initialized memory, alive for the call.
    let a = unsafe { heap_hash::hash_memory(p, n) };
    v[1000] ^= 1 << 40;
    // SAFETY: as above.
    let b = unsafe { heap_hash::hash_memory(p, n) };
    assert_ne!(a, b);
}

#[test]
fn utc_dates_and_units() {
    assert_eq!(results_md::utc(0), "1970-01-01 00:00 UTC");
    assert_eq!(results_md::utc(951_782_400 + 3661), "2000-02-29 01:01 UTC");
    assert_eq!(results_md::fmt("checkpoint_ns", 1.5e6), "1.50 ms");
    assert_eq!(results_md::fmt("own_bytes", 3.0 * 1048576.0), "3.00 MiB");
    assert_eq!(results_md::fmt("iterations_per_s", 1234.4), "1234");
    assert_eq!(results_md::fmt("iterations_per_s", 95.365), "95.4");
}

/// A results.json with the records the goals are computed from.
fn doc(e2e_verified: bool) -> Value {
    let rec = |w: &str, heap: u64, mech: &str, params: &str, metrics: &str| {
        format!(
            r#"{{"workload": "{w}", "heap_bytes": {heap}, "mechanism": "{mech}", "backend": "b",
               "repetitions": 3, "params": {{{params}}}, "metrics": {{{metrics}}},
               "unavailable": null, "failures": []}}"#
        )
    };
    let m =
        |k: &str, v: f64| format!(r#""{k}": {{"median": {v}, "min": {v}, "max": {v}, "n": 3}}"#);
    let gib = 1u64 << 30;
    let records = [
        rec(
            "checkpoint",
            gib,
            "memsnap-uffd-async",
            r#""dirty": "1%""#,
            &format!("{}, {}", m("checkpoint_ns", 1e6), m("fixed_ns", 5e4)),
        ),
        rec(
            "checkpoint",
            gib,
            "fork-cow",
            r#""dirty": "1%""#,
            &m("checkpoint_ns", 2e7),
        ),
        rec(
            "checkpoint",
            gib,
            "memsnap-uffd-async",
            r#""dirty": "100%""#,
            &format!("{}, {}", m("checkpoint_ns", 3e8), m("fixed_ns", 9e4)),
        ),
        rec(
            "checkpoint",
            gib,
            "full-memcpy",
            r#""dirty": "100%""#,
            &m("checkpoint_ns", 1e8),
        ),
        rec(
            "overhead",
            gib,
            "memsnap-uffd-async",
            "",
            &format!(
                "{}, {}",
                m("own_bytes", 1e7),
                m("tracked_bytes", gib as f64)
            ),
        ),
        rec(
            "sparse_words",
            gib,
            "memsnap-uffd-async",
            "",
            &m("kept_bytes_per_dirty_page", 512.0),
        ),
        rec(
            "newthing",
            gib,
            "memsnap-uffd-async",
            r#""x": "y""#,
            &m("brand_new_metric_ns", 42.0),
        ),
    ];
    let verified = if e2e_verified { "true" } else { "false" };
    let text = format!(
        r#"{{"machine": {{"unix_time": "0", "os_page_size": "4096"}}, "records": [{}],
            "ratios": [{{"name": "best backend with read(2) working (x): cycle / fork COW first write (1GiB, 1% dirty)", "value": 0.8, "target_max": 1, "met": true}}],
            "end_to_end": {{"run_seconds": 10, "verified": {verified}, "records": [
               {{"workload": "reset_loop", "db_target_bytes": 52428800, "mechanism": "memsnap-uffd-async", "backend": "b",
                 "repetitions": 1, "params": {{}}, "metrics": {{{}}}, "unavailable": null, "verified": {verified}, "problems": []}}],
              "ratios": [{{"name": "[memsnap-uffd-async] reset loop iterations/s / fork-server (50MiB database)",
                 "value": {}, "target_min": 3, "met": {}, "note": "{}"}}]}}}}"#,
        records.join(","),
        m("iterations_per_s", 500.0),
        if e2e_verified { "4.5" } else { "null" },
        if e2e_verified { "true" } else { "null" },
        if e2e_verified {
            ""
        } else {
            "unverified: no ratio"
        },
    );
    parse(&text).unwrap()
}

fn goal_line<'a>(md: &'a str, what: &str) -> &'a str {
    md.lines()
        .find(|l| l.starts_with("| ") && l.contains(what))
        .unwrap_or_else(|| panic!("no line for {what} in\n{md}"))
}

#[test]
fn goals_are_marked_from_the_records() {
    let md = results_md::render(&doc(true));
    assert!(goal_line(&md, "checkpoint / fork(), 1 GiB, 1% dirty").contains("0.05x"));
    assert!(goal_line(&md, "checkpoint / fork(), 1 GiB, 1% dirty").ends_with("**met** |"));
    assert!(goal_line(&md, "memcpy of the dirty bytes").contains("3.00x"));
    assert!(goal_line(&md, "memcpy of the dirty bytes").ends_with("**missed** |"));
    assert!(goal_line(&md, "0 dirty pages").contains("50.00 µs"));
    assert!(goal_line(&md, "| 2 | best backend").ends_with("**met** |"));
    assert!(goal_line(&md, "own memory / tracked bytes").contains("0.9%"));
    assert!(goal_line(&md, "sparse_words").contains("0.125 page"));
    assert!(goal_line(&md, "| 5 |").contains("4.50x"));
    assert!(goal_line(&md, "| 5 |").ends_with("**met** |"));
    // A workload the generator has never heard of still gets its table.
    assert!(md.contains("### newthing"));
    assert!(md.contains("`brand_new_metric_ns`") && md.contains("42 ns"));
    assert!(md.contains("1970-01-01 00:00 UTC"));
}

#[test]
fn unverified_end_to_end_runs_give_no_ratio() {
    let md = results_md::render(&doc(false));
    let line = goal_line(&md, "| 5 |");
    assert!(line.contains("unverified: no ratio"), "{line}");
    assert!(line.ends_with("not measured |"), "{line}");
    assert!(md.contains("**was not verified**"));
}

#[test]
fn missing_measurements_are_reported_not_fatal() {
    let md = results_md::render(&parse("{}").unwrap());
    assert!(goal_line(&md, "| 1 |").contains("not measured"));
    assert!(goal_line(&md, "| 2 |").contains("not measured"));
    assert!(goal_line(&md, "| 4 |").contains("not measured"));
    assert!(goal_line(&md, "| 5 |").contains("not measured"));
}
