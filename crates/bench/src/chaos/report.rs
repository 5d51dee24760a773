//! The campaign's figures as markdown tables, and one `chaos-result` line that a test reads.

use std::collections::BTreeMap;

use super::{Fault, FaultEvent, Outcome, Record, Route};
use crate::chaos::stack::SCAN_TIMEOUT_SECONDS;

pub struct Summary {
    pub short: bool,
    pub seed: u64,
    /// Seconds of load.
    pub duration: f64,
    pub records: Vec<Record>,
    pub events: Vec<FaultEvent>,
    /// Uploads of which the origin saw infected bytes.
    pub origin_leaks: Vec<u64>,
    /// Uploads without an id that brought EICAR or the hash sample to the origin.
    pub anonymous_leaks: u64,
    /// Entries left in the task streams after the drain.
    pub open_entries: u64,
    pub enqueued: u64,
    /// Entries lost with Redis's data on the restart without persistence.
    pub wiped: u64,
    /// Verdict keys pushed more than once, with the times of the pushes.
    pub duplicates: Vec<(String, Vec<f64>)>,
    pub verdicts: u64,
    pub spool_left: Vec<String>,
    pub tmpfs: bool,
    pub rss_idle_kib: u64,
    pub rss_peak_kib: u64,
    pub rss_after_kib: u64,
    /// Seconds after the drain at which `rss_after_kib` was read.
    pub rss_settle_seconds: f64,
    /// What the origin saw of each upload (bytes, complete), by id.
    pub arrivals: std::collections::HashMap<u64, (u64, bool)>,
    /// Envoy's ext_proc counters of the two listeners (buffered, then full duplex).
    pub envoy_stats: String,
}

pub struct Invariants {
    /// Ids of the infected requests delivered (at the origin or to a client).
    pub delivered: Vec<u64>,
    pub infected_delivered: u64,
    pub wrong_verdicts: u64,
    pub hung: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub spool_left: u64,
}

impl Invariants {
    pub fn of(s: &Summary) -> Invariants {
        let mut delivered: Vec<u64> = s.origin_leaks.clone();
        for r in &s.records {
            if r.leaked || (r.spec.kind.infected() && r.outcome == Outcome::Passed) {
                delivered.push(r.id);
            }
        }
        delivered.sort_unstable();
        delivered.dedup();
        Invariants {
            delivered: delivered.clone(),
            infected_delivered: delivered.len() as u64 + s.anonymous_leaks,
            wrong_verdicts: s
                .records
                .iter()
                .filter(|r| {
                    !r.spec.kind.infected()
                        && matches!(r.outcome, Outcome::Blocked | Outcome::Corrupt)
                })
                .count() as u64,
            hung: s
                .records
                .iter()
                .filter(|r| r.outcome == Outcome::Hung)
                .count() as u64,
            lost: s.open_entries,
            duplicates: s.duplicates.len() as u64,
            spool_left: s.spool_left.len() as u64,
        }
    }

    pub fn hold(&self) -> bool {
        [
            self.infected_delivered,
            self.wrong_verdicts,
            self.hung,
            self.lost,
            self.duplicates,
            self.spool_left,
        ]
        .iter()
        .all(|n| *n == 0)
    }
}

/// The fault a refused request is put down to: the latest one (other than a consumer kill,
/// which should cost nothing) that was under way, or over for less than a scan deadline,
/// when the answer came.
fn blame(r: &Record, events: &[FaultEvent]) -> Option<usize> {
    let grace = SCAN_TIMEOUT_SECONDS as f64 + 5.0;
    let within = |e: &FaultEvent| e.skipped.is_none() && e.start <= r.end && r.end <= e.end + grace;
    let latest = |consumer_kill: bool| {
        events
            .iter()
            .enumerate()
            .filter(|(_, e)| within(e) && (e.fault == Fault::ConsumerKill) == consumer_kill)
            .max_by(|a, b| a.1.start.total_cmp(&b.1.start))
            .map(|(i, _)| i)
    };
    latest(false).or_else(|| latest(true))
}

/// Seconds from the end of a fault to the first true verdict of a request sent after it, or
/// after the end of another fault still under way when it ended (a consumer kill during a
/// stalled link waits for the link).
fn recovery(e: &FaultEvent, events: &[FaultEvent], records: &[Record]) -> Option<f64> {
    let end = events
        .iter()
        .filter(|f| f.skipped.is_none() && f.start <= e.end && f.end >= e.end)
        .map(|f| f.end)
        .fold(e.end, f64::max);
    records
        .iter()
        .filter(|r| r.unique && r.start >= end && r.correct())
        .map(|r| r.end - end)
        .min_by(f64::total_cmp)
}

fn quantile(mut v: Vec<f64>, q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[((v.len() - 1) as f64 * q).round() as usize])
}

fn seconds(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.2}")).unwrap_or_else(|| "–".into())
}

fn outcome_label(o: Outcome) -> String {
    match o {
        Outcome::FailClosed(s) => s.to_string(),
        Outcome::Reset => "reset".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[derive(Default)]
struct FaultRow {
    injected: u64,
    /// Fail-closed answers put down to it.
    refused: Vec<Outcome>,
    /// Seconds to the first true verdict after each injection.
    recoveries: Vec<f64>,
    /// Injections after which no true verdict came.
    never_recovered: u64,
    orphans: u64,
    wiped: u64,
    notes: Vec<String>,
}

/// Prints the tables and the `chaos-result` line; true when every invariant held.
pub fn print(s: &Summary) -> bool {
    let inv = Invariants::of(s);
    let mode = if s.short { "short" } else { "long" };
    println!(
        "## Chaos campaign ({mode}, {:.0} s of load, seed {})\n",
        s.duration, s.seed
    );
    println!("| check | result | goal |\n|---|---|---|");
    let row = |what: &str, n: u64| println!("| {what} | {n} | 0 |");
    row(
        "infected bodies delivered (a byte at the origin or a client)",
        inv.infected_delivered,
    );
    row(
        "clean bodies refused as infected or delivered altered",
        inv.wrong_verdicts,
    );
    row("requests without an answer by their deadline", inv.hung);
    if inv.lost == u64::MAX {
        println!(
            "| tasks lost (enqueued, never answered: stream entries after the drain) | unknown: Redis did not answer | 0 |"
        );
    } else {
        row(
            "tasks lost (enqueued, never answered: stream entries after the drain)",
            inv.lost,
        );
    }
    row("tasks answered twice", inv.duplicates);
    row("files left in the spool", inv.spool_left);
    println!(
        "| tasks enqueued / verdicts written | {} / {} | |",
        s.enqueued, s.verdicts
    );
    if s.wiped > 0 {
        println!(
            "| queued tasks dropped with Redis's data (their requests answered fail-closed) | {} | |",
            s.wiped
        );
    }
    println!(
        "| producer RSS idle / peak / after the load ({:.0} s after the drain) | {:.0} / {:.0} / {:.0} MiB | after ≈ idle |",
        s.rss_settle_seconds,
        s.rss_idle_kib as f64 / 1024.0,
        s.rss_peak_kib as f64 / 1024.0,
        s.rss_after_kib as f64 / 1024.0
    );

    println!(
        "\n| route | requests | true verdict | fail-closed | refused as unscannable (413) | hung | aborted by the client |\n|---|---|---|---|---|---|---|"
    );
    let mut routes: BTreeMap<Route, [u64; 6]> = BTreeMap::new();
    for r in &s.records {
        let c = routes.entry(r.route).or_default();
        c[0] += 1;
        c[1] += r.correct() as u64;
        c[2] += r.fail_closed() as u64;
        c[3] += (r.outcome == Outcome::Hung) as u64;
        c[4] += (r.outcome == Outcome::Aborted) as u64;
        c[5] += (r.outcome == Outcome::Unscannable) as u64;
    }
    for (route, c) in &routes {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            route.label(),
            c[0],
            c[1],
            c[2],
            c[5],
            c[3],
            c[4]
        );
    }
    let total = s.records.len();
    let correct = s.records.iter().filter(|r| r.correct()).count();
    let infected = s.records.iter().filter(|r| r.spec.kind.infected()).count();
    let spilled = s.records.iter().filter(|r| r.spec.size > 1 << 20).count();
    let high = s.records.iter().filter(|r| r.high).count();
    println!(
        "\n{total} requests ({infected} infected, {spilled} spilled, {high} high priority, {} probes), \
         {correct} with their true verdict.",
        s.records.iter().filter(|r| r.probe).count()
    );

    // Per fault.
    let mut blamed: Vec<Vec<Outcome>> = vec![Vec::new(); s.events.len()];
    let mut unblamed: Vec<Outcome> = Vec::new();
    for r in s.records.iter().filter(|r| r.fail_closed()) {
        match blame(r, &s.events) {
            Some(i) => blamed[i].push(r.outcome),
            None => unblamed.push(r.outcome),
        }
    }
    let mut by_fault: BTreeMap<Fault, FaultRow> = BTreeMap::new();
    for (i, e) in s.events.iter().enumerate() {
        let row = by_fault.entry(e.fault).or_default();
        if let Some(why) = &e.skipped {
            row.notes.push(format!("not run: {why}"));
            continue;
        }
        row.injected += 1;
        row.refused.extend(blamed[i].iter().copied());
        match recovery(e, &s.events, &s.records) {
            Some(t) => row.recoveries.push(t),
            None => row.never_recovered += 1,
        }
        row.orphans += e.orphans;
        row.wiped += e.wiped;
    }
    for row in by_fault.values_mut() {
        if row.orphans > 0 {
            row.notes.push(format!(
                "{} spilled bodies orphaned by the kills, all removed by the restarted \
                 producer's janitor",
                row.orphans
            ));
        }
        if row.wiped > 0 {
            row.notes
                .push(format!("{} queued tasks lost with the data", row.wiped));
        }
    }
    println!(
        "\n| fault | injected | fail-closed answers it caused | first true verdict after it ends: median / max s | notes |\n|---|---|---|---|---|"
    );
    for (fault, row) in &by_fault {
        let FaultRow {
            injected: n,
            refused: outcomes,
            recoveries,
            never_recovered: never,
            notes,
            ..
        } = row;
        let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
        for o in outcomes {
            *statuses.entry(outcome_label(*o)).or_default() += 1;
        }
        let statuses: Vec<String> = statuses.iter().map(|(k, v)| format!("{k}×{v}")).collect();
        let mut notes = notes.clone();
        if *never > 0 {
            notes.push(format!("{never} without a true verdict after"));
        }
        notes.dedup();
        println!(
            "| {} | {n} | {}{} | {} / {} | {} |",
            fault.label(),
            outcomes.len(),
            if statuses.is_empty() {
                String::new()
            } else {
                format!(" ({})", statuses.join(", "))
            },
            seconds(quantile(recoveries.clone(), 0.5)),
            seconds(quantile(recoveries.clone(), 1.0)),
            notes.join("; ")
        );
    }
    println!(
        "| none (outside every fault and its {}-s aftermath) | | {} | | |",
        SCAN_TIMEOUT_SECONDS + 5,
        unblamed.len()
    );
    if !s.tmpfs {
        println!("\nThe spool was not a tmpfs of its own (no mount namespace): no ENOSPC fault.");
    }
    for (key, times) in s.duplicates.iter().take(20) {
        let times: Vec<String> = times.iter().map(|t| format!("{t:.2}")).collect();
        println!("\nAnswered twice: {key} at {} s", times.join(", "));
    }
    for id in &inv.delivered {
        let faults: Vec<String> = |r: Option<&Record>| -> Vec<String> {
            let Some(r) = r else { return Vec::new() };
            s.events
                .iter()
                .filter(|e| e.skipped.is_none() && e.start <= r.end && r.start <= e.end + 1.0)
                .map(|e| format!("{} {:.2}–{:.2} s", e.fault.key(), e.start, e.end))
                .collect()
        }(s.records.iter().find(|r| r.id == *id));
        match s.records.iter().find(|r| r.id == *id) {
            Some(r) => println!(
                "\nDelivered infected: request {id}, {} {:?} of {} bytes{}, {:.2}–{:.2} s, \
                 answered {}{}, faults under way: {}",
                r.route.label(),
                r.spec.kind,
                r.spec.size,
                if r.high { " (high)" } else { "" },
                r.start,
                r.end,
                outcome_label(r.outcome),
                match (s.origin_leaks.contains(id), s.arrivals.get(id)) {
                    (true, Some((bytes, complete))) => format!(
                        ", {bytes} bytes seen at the origin{}",
                        if *complete { ", complete" } else { ", cut off" }
                    ),
                    (true, None) => ", seen at the origin".to_owned(),
                    (false, _) => ", seen by the client".to_owned(),
                },
                if faults.is_empty() {
                    "none".to_string()
                } else {
                    faults.join(", ")
                }
            ),
            None => println!("\nDelivered infected: request {id} (no record)"),
        }
    }
    if !s.envoy_stats.is_empty() {
        println!(
            "\nEnvoy's ext_proc counters:\n```\n{}\n```",
            s.envoy_stats.trim_end()
        );
    }
    if s.anonymous_leaks > 0 {
        println!(
            "\nDelivered infected without a request id: {}",
            s.anonymous_leaks
        );
    }
    if !s.spool_left.is_empty() {
        println!("\nLeft in the spool: {}", s.spool_left.join(", "));
    }

    let faults: Vec<String> = by_fault
        .iter()
        .map(|(f, row)| format!("{}:{}", f.key(), row.injected))
        .collect();
    println!(
        "\nchaos-result infected_delivered={} wrong_verdicts={} hung={} lost={} duplicates={} \
         spool_left={} requests={total} true_verdicts={correct} rss_idle_kib={} rss_after_kib={} \
         faults={}",
        inv.infected_delivered,
        inv.wrong_verdicts,
        inv.hung,
        inv.lost,
        inv.duplicates,
        inv.spool_left,
        s.rss_idle_kib,
        s.rss_after_kib,
        faults.join(",")
    );
    inv.hold()
}
