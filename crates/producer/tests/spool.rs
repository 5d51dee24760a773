//! Spool isolation: a spilled body is released from the descriptor it was written and
//! scanned through, whatever is put at its path meanwhile; and on a volume shared by the
//! producers of two tenants (each its own uid) and the consumers (their group), one tenant
//! can neither read, replace nor remove the other's spilled bodies.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Stack, StackOptions, post_file, sha256_hex, temp_file};
use virus_scanner_protocol::task::{Content, Verdict};
use virus_scanner_queue::{Consumer, QueueConfig, RedisConfig};
use virus_scanner_test_support::{BodyMode, EICAR, clean_bytes};

/// Plays the consumer for one task: claims it, puts `replacement` where the task's file is
/// (a new file renamed over it), then answers `clean`, as a scan of the original would.
fn scan_then_replace(stack: &Stack, replacement: &[u8]) {
    stack.rt.block_on(async {
        let config = QueueConfig::new(RedisConfig::from_host_port(
            "127.0.0.1",
            stack.redis.port(),
            false,
        ));
        let mut consumer = Consumer::connect(config, "spool-test").await.unwrap();
        let give_up = Instant::now() + Duration::from_secs(30);
        let delivery = loop {
            assert!(Instant::now() < give_up, "no task was queued");
            consumer.ensure_group().await.unwrap();
            let mut claimed = consumer.claim(Duration::from_millis(500)).await.unwrap();
            if let Some(d) = claimed.pop() {
                break d;
            }
        };
        let task = delivery.task.as_ref().unwrap();
        let Some(Content::Path(path)) = &task.content else {
            panic!("not a PATH task: {task:?}")
        };
        let path = Path::new(path);
        let swap = path.with_file_name("swap");
        std::fs::write(&swap, replacement).unwrap();
        std::fs::rename(&swap, path).unwrap();
        let mut verdict = Verdict::clean();
        verdict.task_id = task.id.clone();
        assert!(consumer.complete(&delivery, &verdict, None).await.unwrap());
    });
}

fn spilling_stack(mode: BodyMode) -> Stack {
    let mut options = StackOptions::new(mode);
    options.producer_args = vec!["--scan-file-threshold-mb".into(), "1".into()];
    let mut stack = Stack::start(options);
    stack.stop_consumer();
    stack
}

#[test]
fn a_body_replaced_on_disk_after_its_scan_is_released_as_scanned_over_ext_proc() {
    let mut stack = spilling_stack(BodyMode::FullDuplexStreamed);
    let scanned = clean_bytes(3 << 20, 21);
    let mut planted = clean_bytes(3 << 20, 22);
    planted[1000..1000 + EICAR.len()].copy_from_slice(EICAR);
    let files = tempfile::tempdir().unwrap();
    let upload = temp_file(&files, "scanned", &scanned);
    let url = stack.url("/upload/swapped");
    let client = std::thread::spawn(move || post_file(&url, &upload, &[]));
    scan_then_replace(&stack, &planted);
    // The upstream's answer is scanned too.
    stack.start_consumer();
    let reply = client.join().unwrap();
    stack.assert_only_delivery(&reply, &scanned);
    assert!(stack.leftovers().is_empty(), "{:?}", stack.leftovers());
}

#[test]
fn a_body_replaced_on_disk_after_its_scan_is_released_as_scanned_over_icap() {
    let stack = spilling_stack(BodyMode::Buffered);
    let scanned = clean_bytes(3 << 20, 23);
    let mut planted = clean_bytes(3 << 20, 24);
    planted[1000..1000 + EICAR.len()].copy_from_slice(EICAR);
    let port = stack.icap_port;
    let res_hdr = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n";
    // No `Allow: 204`: the answer carries the body back.
    let mut request = format!(
        "RESPMOD icap://127.0.0.1:{port}/avscan ICAP/1.0\r\nHost: 127.0.0.1\r\n\
         Encapsulated: res-hdr=0, res-body={}\r\n\r\n{res_hdr}{:x}\r\n",
        res_hdr.len(),
        scanned.len()
    )
    .into_bytes();
    request.extend_from_slice(&scanned);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    let client = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(&request).unwrap();
        let mut reader = BufReader::new(s);
        let mut head = Vec::new();
        // The ICAP head, then the encapsulated HTTP head.
        for _ in 0..2 {
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                head.extend_from_slice(line.as_bytes());
                if line == "\r\n" || line.is_empty() {
                    break;
                }
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut body = Vec::new();
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).unwrap();
            let size = usize::from_str_radix(size.trim(), 16)
                .unwrap_or_else(|e| panic!("{e}: {size:?} after {head}"));
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).unwrap();
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
        (head, body)
    });
    scan_then_replace(&stack, &planted);
    let (head, body) = client.join().unwrap();
    assert!(head.starts_with("ICAP/1.0 200"), "{head}");
    assert_eq!(
        (body.len(), sha256_hex(&body)),
        (scanned.len(), sha256_hex(&scanned))
    );
    assert!(stack.leftovers().is_empty(), "{:?}", stack.leftovers());
}

// Two tenants' producers and a consumer as processes of their own uids on one shared
// volume. The processes are this test binary run again (as root, since the binary may sit
// in a directory only root can enter), which takes the role's uid and gids for the thread
// that runs the role before it touches the volume.

const ROLE: &str = "VS_SPOOL_ROLE";
const VOLUME: &str = "VS_SPOOL_VOLUME";
const TARGET: &str = "VS_SPOOL_TARGET";
const TENANT_A_UID: u32 = 47101;
const TENANT_B_UID: u32 = 47102;
const CONSUMER_UID: u32 = 47103;
const CONSUMERS_GID: u32 = 47100;

fn become_user(uid: u32, gid: u32) {
    use rustix::process::{Gid, Uid};
    // Per thread (the raw system calls, not libc's process-wide ones): the role's thread is
    // the only one that touches the volume.
    let gid = Gid::from_raw(gid);
    rustix::thread::set_thread_groups(&[]).unwrap();
    rustix::thread::set_thread_res_gid(gid, gid, gid).unwrap();
    let uid = Uid::from_raw(uid);
    rustix::thread::set_thread_res_uid(uid, uid, uid).unwrap();
}

type Output = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// Runs a role in a child process.
fn spawn_role(role: &str, volume: &Path, target: &str) -> (std::process::Child, Output) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "spool_role",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(ROLE, role)
        .env(VOLUME, volume)
        .env(TARGET, target)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let output = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, output)
}

/// What a role said, until it said `ready` or ended.
fn said(output: &mut Output) -> Vec<String> {
    let mut lines = Vec::new();
    for line in output {
        // With one test thread, libtest's "test spool_role ... " starts the line.
        if let Some((_, l)) = line.unwrap().split_once("ROLE ") {
            lines.push(l.to_owned());
            if l == "ready" {
                break;
            }
        }
    }
    lines
}

/// Not a test of its own: the body of the child processes of
/// `tenants_sharing_a_volume_cannot_read_replace_or_remove_each_others_bodies`.
#[test]
fn spool_role() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let volume = PathBuf::from(std::env::var(VOLUME).unwrap());
    let target = PathBuf::from(std::env::var(TARGET).unwrap());
    let say = |s: String| println!("ROLE {s}");
    match role.as_str() {
        "producer-a" => {
            become_user(TENANT_A_UID, TENANT_A_UID);
            let dir = virus_scanner_producer::body::tenant_spill_dir(&volume, "team-a").unwrap();
            let limits = virus_scanner_producer::body::BodyLimits {
                spill_dir: dir,
                spill_threshold: 10,
                max: 1 << 20,
            };
            let body = virus_scanner_producer::body::Body::from_vec(
                b"tenant a's body".repeat(10),
                &limits,
            )
            .unwrap();
            let virus_scanner_producer::body::BodyData::Spilled(spill) = &body.data else {
                panic!("not spilled")
            };
            say(format!("path {}", spill.path().display()));
            say("ready".into());
            // Held until the parent has played the other roles.
            let mut wait = String::new();
            let _ = std::io::stdin().read_line(&mut wait);
            drop(body);
        }
        "producer-b" => {
            become_user(TENANT_B_UID, TENANT_B_UID);
            let outcome = |r: std::io::Result<()>| match r {
                Ok(()) => "ok".to_owned(),
                Err(e) => format!("{:?}", e.kind()),
            };
            say(format!(
                "read {}",
                outcome(std::fs::read(&target).map(drop))
            ));
            say(format!(
                "rename {}",
                outcome(std::fs::rename(&target, volume.join("team-b-stole-it")))
            ));
            let replacement = volume.join("planted");
            std::fs::write(&replacement, b"planted").unwrap();
            say(format!(
                "replace {}",
                outcome(std::fs::rename(&replacement, &target))
            ));
            say(format!("remove {}", outcome(std::fs::remove_file(&target))));
            say(format!(
                "list {}",
                outcome(std::fs::read_dir(target.parent().unwrap()).map(drop))
            ));
            say(format!(
                "link {}",
                outcome(std::fs::hard_link(&target, volume.join("team-b-link")))
            ));
            // B's producer, told to use A's directory, refuses it.
            let takeover = virus_scanner_producer::body::tenant_spill_dir(&volume, "team-a");
            say(format!("takeover {}", takeover.is_ok()));
            say("done".into());
        }
        "consumer" => {
            become_user(CONSUMER_UID, CONSUMERS_GID);
            let dir = virus_scanner_consumer::scan_dir::ScanDir::new(&volume).unwrap();
            let target = target.to_str().unwrap();
            let read = dir.open("team-a", target).map(|mut f| {
                let mut s = String::new();
                f.read_to_string(&mut s).unwrap();
                s
            });
            say(format!(
                "read {}",
                read.is_ok_and(|s| s.starts_with("tenant a"))
            ));
            say(format!("as-b {}", dir.open("team-b", target).is_ok()));
            say(format!("remove {}", std::fs::remove_file(target).is_ok()));
            say("done".into());
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn tenants_sharing_a_volume_cannot_read_replace_or_remove_each_others_bodies() {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "this test runs processes as other uids: run it as root (CI does)"
    );
    // The volume's root as the Kubernetes section of the README sets it up: the consumers'
    // group, set-group-ID (tenant directories and files inherit the group), sticky (no one
    // renames or removes another's entry), writable by every producer.
    let volume = tempfile::Builder::new()
        .prefix("vs-shared-")
        .tempdir_in("/tmp")
        .unwrap();
    std::os::unix::fs::chown(volume.path(), Some(0), Some(CONSUMERS_GID)).unwrap();
    std::fs::set_permissions(volume.path(), std::fs::Permissions::from_mode(0o3777)).unwrap();

    let (mut a, mut a_output) = spawn_role("producer-a", volume.path(), "");
    let lines = said(&mut a_output);
    let target = lines
        .iter()
        .find_map(|l| l.strip_prefix("path "))
        .unwrap_or_else(|| panic!("producer A said {lines:?}"))
        .to_owned();
    let meta = std::fs::metadata(&target).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (TENANT_A_UID, CONSUMERS_GID, 0o640)
    );
    let dir = std::fs::metadata(Path::new(&target).parent().unwrap()).unwrap();
    assert_eq!(
        (dir.uid(), dir.gid(), dir.mode() & 0o777),
        (TENANT_A_UID, CONSUMERS_GID, 0o750)
    );

    let (mut b, mut b_output) = spawn_role("producer-b", volume.path(), &target);
    let said_b = said(&mut b_output);
    assert!(b.wait().unwrap().success(), "{said_b:?}");
    for refused in ["read", "rename", "replace", "remove", "list", "link"] {
        assert!(
            said_b.contains(&format!("{refused} PermissionDenied")),
            "tenant B could {refused} tenant A's body: {said_b:?}"
        );
    }
    assert!(said_b.contains(&"takeover false".to_owned()), "{said_b:?}");

    let (mut c, mut c_output) = spawn_role("consumer", volume.path(), &target);
    let said_c = said(&mut c_output);
    assert!(c.wait().unwrap().success(), "{said_c:?}");
    assert_eq!(
        said_c,
        ["read true", "as-b false", "remove false", "done"],
        "the consumer reads A's body for A only, and never removes it"
    );

    assert_eq!(
        std::fs::read(&target).unwrap(),
        b"tenant a's body".repeat(10),
        "tenant A's body changed"
    );
    drop(a.stdin.take());
    said(&mut a_output);
    assert!(a.wait().unwrap().success());
    assert!(
        !Path::new(&target).exists(),
        "producer A left its body behind"
    );
}
