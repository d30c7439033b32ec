//! `make bench`: memsnap's checkpoint, fault and restore costs against fork copy-on-write
//! and full copies, measured in one run on one machine. Prints a table and writes
//! bench/results.json and bench/chart.svg.
//!
//! Every measurement runs in a fresh forked child (memsnap's first snapshot happens once
//! per process and changes it for good); repetitions of all mechanisms are interleaved so
//! that drift in machine load hits them alike. Absolute times on a shared machine mean
//! little; the ratios, taken within one run, are the result.
//!
//! Options (after `--`): `--quick` (small heaps, one repetition: a smoke test),
//! `--only <text>` (workloads whose name contains text), `--heaps-mib 64,1024`,
//! `--mechanism <name>[,<name>...]` (those mechanisms only, e.g. to profile one), `--no-write` (print only),
//! `--report` (only regenerate bench/RESULTS.md from bench/results.json). The end-to-end
//! workloads' options are in bench/e2e.rs (`--sqlite-mib`, `--cadence-seconds`,
//! `--reset-iters`).

mod child;
mod e2e;
mod e2e_report;
mod e2e_run;
mod goals;
mod heap_hash;
mod json;
mod mechanisms;
mod report;
mod results_md;
mod sqlite;
mod svg;
mod workloads;

use std::collections::BTreeMap;
use std::time::Instant;

use report::Record;
use workloads::{Workload, GIB, MIB};

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn command(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    m.insert("cpu".into(), model);
    m.insert(
        "cpus_online".into(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .to_string(),
    );
    m.insert("kernel".into(), command("uname", &["-sr"]));
    m.insert("os_page_size".into(), child::os_page().to_string());
    m.insert(
        "vm_max_map_count".into(),
        read("/proc/sys/vm/max_map_count"),
    );
    m.insert(
        "transparent_hugepage".into(),
        read("/sys/kernel/mm/transparent_hugepage/enabled"),
    );
    m.insert("loadavg_start".into(), read("/proc/loadavg"));
    m.insert(
        "mem_total".into(),
        read("/proc/meminfo").lines().next().unwrap_or("").into(),
    );
    m.insert(
        "git_commit".into(),
        command(
            "git",
            &["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"],
        ),
    );
    m.insert(
        "unix_time".into(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .to_string(),
    );
    m
}

/// For the map-count workload: the curve the child left in shared memory (it may have
/// died on the way), as JSON and summary numbers.
fn harvest_curve(shared: &[u8], s: &mut child::Sample) {
    let f = |i: usize| f64::from_ne_bytes(shared[i * 8..i * 8 + 8].try_into().unwrap());
    let n = f(0) as usize;
    if n == 0 {
        return;
    }
    let pts: Vec<String> = (0..n)
        .map(|i| format!("[{}, {}, {:.0}]", f(1 + 3 * i), f(2 + 3 * i), f(3 + 3 * i)))
        .collect();
    s.text.insert(
        "curve".into(),
        format!("{{\"columns\": [\"pages_written\", \"map_count\", \"ns_per_page\"], \"points\": [{}]}}", pts.join(", ")),
    );
    let max = (0..n).map(|i| f(2 + 3 * i)).fold(0.0, f64::max);
    s.nums.insert("max_maps".into(), max);
    s.nums.insert("pages_written".into(), f(1 + 3 * (n - 1)));
    s.nums
        .insert("ns_per_page_last_step".into(), f(3 + 3 * (n - 1)));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/bench");
    if args.iter().any(|a| a == "--report") {
        results_md::write(dir).unwrap_or_else(|e| panic!("bench --report: {e}"));
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let no_write = args.iter().any(|a| a == "--no-write");
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let heaps: Vec<usize> = match arg("--heaps-mib") {
        Some(list) => list
            .split(',')
            .map(|m| m.parse::<usize>().expect("--heaps-mib 64,1024") * MIB)
            .collect(),
        None if quick => vec![16 * MIB, 64 * MIB],
        None => vec![64 * MIB, GIB],
    };
    let mech = arg("--mechanism");
    let mechanisms: Vec<_> = mechanisms::all()
        .into_iter()
        .filter(|m| {
            mech.as_ref()
                .is_none_or(|x| x.split(',').any(|x| m.name() == x))
        })
        .collect();
    let mut machine = machine();
    let only = arg("--only");
    let plan: Vec<Workload> = workloads::plan(&heaps, child::os_page())
        .into_iter()
        .filter(|w| only.as_ref().is_none_or(|o| w.name().contains(o.as_str())))
        .collect();
    // Here `--only` may also list names: `--only reset_loop,cadence`.
    let e2e_plan: Vec<e2e::E2e> = e2e::plan(arg, quick)
        .into_iter()
        .filter(|w| {
            only.as_ref()
                .is_none_or(|o| o.split(',').any(|p| w.name().contains(p)))
        })
        .collect();
    let shared = child::map_shared(1 << 20);
    let t_start = Instant::now();
    // Asked once per mechanism, in a child (probing userfaultfd opens descriptors); an
    // unavailable mechanism is recorded with the reason and never run.
    let unavailable: Vec<Option<String>> = mechanisms
        .iter()
        .map(|m| {
            let s = child::in_child(|r| {
                if let Some(why) = m.unavailable() {
                    r.text("unavailable", &why);
                }
            });
            s.text.get("unavailable").cloned()
        })
        .collect();
    for (m, why) in mechanisms.iter().zip(&unavailable) {
        if let Some(why) = why {
            eprintln!("bench: {} is unavailable here: {why}", m.name());
        }
    }
    let mut records: Vec<Record> = vec![];
    for w in &plan {
        let t0 = Instant::now();
        let first = records.len();
        let runs: Vec<_> = mechanisms
            .iter()
            .zip(&unavailable)
            .filter(|(m, _)| m.supports(w))
            .collect();
        for (m, why) in &runs {
            records.push(Record {
                workload: w.clone(),
                mechanism: m.name(),
                unavailable: (*why).clone(),
                samples: vec![],
            });
        }
        for _ in 0..workloads::reps(w, quick) {
            for (i, (m, why)) in (first..).zip(&runs) {
                if why.is_some() {
                    continue;
                }
                shared.fill(0);
                let mut s = child::in_child(|r| m.run(w, shared, r));
                if matches!(w, Workload::Maps { .. }) && !s.nums.contains_key("max_maps") {
                    harvest_curve(shared, &mut s);
                }
                records[i].samples.push(s);
            }
        }
        eprintln!(
            "bench: {:<12} {:>7} {:<40} {:6.1}s",
            w.name(),
            workloads::size_name(w.heap()),
            w.params()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
            t0.elapsed().as_secs_f64()
        );
    }
    let t_e2e = Instant::now();
    let e2e_records = e2e::run(&e2e_plan, mech.as_deref(), shared, quick);
    let e2e_seconds = t_e2e.elapsed().as_secs_f64();
    machine.insert("loadavg_end".into(), read("/proc/loadavg"));
    machine.insert(
        "run_seconds".into(),
        format!("{:.1}", t_start.elapsed().as_secs_f64()),
    );
    let ratios = report::all_ratios(&records);
    println!("{}", report::table(&records, &ratios));
    let e2e_problems = e2e::problems(&e2e_records);
    let e2e_ratios = e2e::ratios(&e2e_records, &e2e_problems);
    if !e2e_plan.is_empty() {
        println!(
            "{}",
            e2e_report::table(&e2e_records, &e2e_ratios, &e2e_problems)
        );
        println!("end-to-end workloads: {e2e_seconds:.1}s");
    }
    println!(
        "run: {:.1}s, load average at start {} / end {}",
        t_start.elapsed().as_secs_f64(),
        machine["loadavg_start"],
        machine["loadavg_end"]
    );
    if !no_write {
        let doc = e2e_report::splice(
            &report::json(&records, &ratios, &machine),
            &e2e_report::json(&e2e_records, &e2e_ratios, &e2e_problems, e2e_seconds),
        );
        std::fs::write(format!("{dir}/results.json"), doc).expect("write bench/results.json");
        std::fs::write(format!("{dir}/chart.svg"), svg::chart(&records))
            .expect("write bench/chart.svg");
        results_md::write(dir).unwrap_or_else(|e| panic!("bench/RESULTS.md: {e}"));
        println!("wrote {dir}/results.json, {dir}/chart.svg and {dir}/RESULTS.md");
    }
    if !e2e_problems.is_empty() {
        eprintln!("bench: end-to-end verification failed (see UNVERIFIED above)");
        std::process::exit(1);
    }
}
