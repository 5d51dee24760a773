//! The short fault campaign (`virus-scanner-bench chaos --short`) against the real stack:
//! Envoy (BUFFERED and FULL_DUPLEX_STREAMED), the producer's ICAP listener, the producer, Redis
//! with AOF, three consumers and clamd, while consumers are killed, Redis, clamd and the
//! producer restarted, the producer's link to Redis lost and the spool filled.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

/// The crates the producer and consumer binaries are built from.
const SERVICE_CRATES: [&str; 6] = [
    "producer", "consumer", "queue", "protocol", "clamd", "runtime",
];

/// The newest modification time under `path`.
fn newest(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .flatten()
        .filter(|e| e.file_name() != "target" && e.file_name() != "fuzz")
        .filter_map(|e| newest(&e.path()))
        .max()
}

/// The campaign starts the producer and consumer binaries found next to its own. `cargo test
/// --workspace` has just built them; a test of this package alone has not, so they are built
/// when a source is newer than they are (a second cargo with other features would rebuild
/// them for nothing under the workspace run).
fn build_services() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_virus-scanner-bench"))
        .parent()
        .expect("the binary's directory")
        .to_path_buf();
    let built = ["virus-scanner-producer", "virus-scanner-handler"]
        .iter()
        .map(|b| newest(&bin_dir.join(b)))
        .min()
        .flatten();
    let sources = SERVICE_CRATES
        .iter()
        .map(|c| root.join("crates").join(c))
        .chain([root.join("Cargo.toml"), root.join("Cargo.lock")])
        .filter_map(|p| newest(&p))
        .max();
    if built.is_some() && built >= sources {
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--manifest-path"])
        .arg(root.join("Cargo.toml"))
        .args([
            "-p",
            "virus-scanner-producer",
            "-p",
            "virus-scanner-consumer",
            "--bins",
        ])
        .status()
        .expect("run cargo build");
    assert!(
        status.success(),
        "building the producer and consumer failed"
    );
}

/// `key=value` fields of the campaign's `chaos-result` line.
fn result_fields(stdout: &str) -> HashMap<String, String> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("chaos-result "))
        .unwrap_or_else(|| panic!("no chaos-result line in:\n{stdout}"));
    line.split_whitespace()
        .skip(1)
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn short_chaos_campaign_delivers_nothing_infected_and_loses_no_task() {
    build_services();
    let out = Command::new(env!("CARGO_BIN_EXE_virus-scanner-bench"))
        .args(["chaos", "--short"])
        .output()
        .expect("run virus-scanner-bench chaos --short");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = format!("{stdout}\n--- stderr ---\n{stderr}");
    let fields = result_fields(&stdout);
    let count = |k: &str| -> u64 {
        fields
            .get(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k}= in the result\n{report}"))
    };
    for invariant in [
        "infected_delivered",
        "wrong_verdicts",
        "hung",
        "lost",
        "duplicates",
        "spool_left",
    ] {
        assert_eq!(count(invariant), 0, "{invariant}\n{report}");
    }
    assert!(out.status.success(), "the campaign failed\n{report}");
    // The producer gives back what the load made it allocate (within 20 s of the drain).
    let (idle, after) = (count("rss_idle_kib"), count("rss_after_kib"));
    assert!(
        idle > 0 && after <= idle * 2,
        "producer RSS {after} KiB after the load, {idle} KiB idle\n{report}"
    );
    // The campaign did run: load flowed, and the faults the short mode promises happened.
    let requests = count("requests");
    assert!(requests >= 500, "only {requests} requests\n{report}");
    // Most requests outside the faults get their verdict (a link refusing connections makes
    // many quick 503s, and aborted requests have none).
    assert!(
        count("true_verdicts") * 2 >= requests,
        "fewer than half the requests got their true verdict\n{report}"
    );
    let faults: HashMap<&str, u64> = fields
        .get("faults")
        .map(|f| {
            f.split(',')
                .filter_map(|kv| kv.split_once(':'))
                .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
                .collect()
        })
        .unwrap_or_default();
    for (fault, at_least) in [
        ("consumer-kill", 5),
        ("consumer-stop", 1),
        ("redis-restart", 1),
        ("redis-wipe", 1),
        ("clamd-restart", 1),
        ("producer-kill", 1),
        ("net-stall", 1),
        ("net-reset", 1),
    ] {
        let n = faults.get(fault).copied().unwrap_or(0);
        assert!(n >= at_least, "{fault}: {n} injected\n{report}");
    }
}
