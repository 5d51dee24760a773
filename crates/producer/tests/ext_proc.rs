//! The producer behind a real Envoy, with the real queue, consumer and clamd.
#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::process::CommandExt;

use std::io::Write;
use std::time::{Duration, Instant};

use support::{Stack, StackOptions, curl, post_file, sha256_hex, temp_file};
use virus_scanner_test_support::{
    BodyMode, ClamdOptions, EICAR, EICAR_BODY_SIGNATURE, HASH_SAMPLE_SIGNATURE, clean_bytes,
    hash_signature_sample, http_get, wait_for,
};

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn with_eicar(mut body: Vec<u8>) -> Vec<u8> {
    let at = body.len() / 2;
    body.splice(at..at, EICAR.iter().copied());
    body
}

#[test]
fn buffered_clean_and_infected_uploads_downloads_and_the_safe_route() {
    let stack = Stack::start(StackOptions::new(BodyMode::Buffered));
    let files = tempfile::tempdir().unwrap();

    // Clean upload: 200, and the upstream got the exact bytes.
    let clean = clean_bytes(300_000, 1);
    let r = post_file(
        &stack.url("/upload/clean"),
        &temp_file(&files, "clean", &clean),
        &[],
    );
    stack.assert_only_delivery(&r, &clean);

    // EICAR upload: 406 with the headers and JSON body; the upstream never saw it.
    let r = post_file(
        &stack.url("/upload/eicar"),
        &temp_file(&files, "eicar", EICAR),
        &[],
    );
    assert_eq!(r.status, 406);
    assert_eq!(r.header("x-virus-infected"), Some("true"));
    assert_eq!(r.header("x-virus-name"), Some(EICAR_BODY_SIGNATURE));
    let json = r.json();
    assert_eq!(json["error"], "virus_detected");
    assert_eq!(json["virus"], EICAR_BODY_SIGNATURE);
    assert_eq!(json["direction"], "request");
    assert_eq!(json["task_id"].as_str().unwrap().len(), 32);
    assert_eq!(json["sha256"], sha256_hex(EICAR));
    assert_eq!(
        stack.upstream.received().len(),
        1,
        "the infected upload reached the upstream"
    );

    // EICAR in a response body: 406.
    stack.upstream.serve(
        "eicar.txt",
        EICAR.to_vec(),
        &[("content-type", "text/plain")],
    );
    let r = curl(&[&stack.url("/files/eicar.txt")]);
    assert_eq!(r.status, 406);
    assert_eq!(r.json()["direction"], "response");
    assert!(!r.body.windows(EICAR.len()).any(|w| w == EICAR));

    // A clean download passes byte for byte.
    let page = clean_bytes(200_000, 2);
    stack.upstream.serve("page.bin", page.clone(), &[]);
    let r = curl(&[&stack.url("/files/page.bin")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, page);

    // The opted-out route is not scanned.
    let r = curl(&[&stack.url("/safe/files/eicar.txt")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, EICAR);

    assert_eq!(
        stack.producer_metric("virus_scanner_producer_requests_total{direction=\"request\",verdict=\"infected\",mode=\"buffered\"}"),
        1.0
    );
    assert!(stack.leftovers().is_empty(), "{:?}", stack.leftovers());
}

#[test]
fn encoded_multipart_chunked_and_http2_bodies_are_scanned_as_files() {
    let stack = Stack::start(StackOptions::new(BodyMode::Buffered));
    let files = tempfile::tempdir().unwrap();

    // gzip-encoded response carrying EICAR.
    stack.upstream.serve(
        "eicar.gz",
        gzip(&with_eicar(clean_bytes(50_000, 3))),
        &[("content-encoding", "gzip"), ("content-type", "text/plain")],
    );
    let r = curl(&[&stack.url("/files/eicar.gz")]);
    assert_eq!(r.status, 406, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-virus-infected"), Some("true"));

    // A multipart upload whose file part matches only a whole-file hash signature.
    let sample = temp_file(&files, "sample.bin", &hash_signature_sample());
    let form = format!("file=@{}", sample.display());
    let r = curl(&["-F", "note=hello", "-F", &form, &stack.url("/upload/form")]);
    assert_eq!(r.status, 406, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-virus-name"), Some(HASH_SAMPLE_SIGNATURE));

    // EICAR as a form part, too.
    let eicar = temp_file(&files, "eicar.com", EICAR);
    let form = format!("upload=@{}", eicar.display());
    let r = curl(&["-F", &form, &stack.url("/upload/form")]);
    assert_eq!(r.status, 406);

    // Chunked HTTP/1.1.
    let body = temp_file(&files, "chunked", &with_eicar(clean_bytes(100_000, 4)));
    let r = post_file(
        &stack.url("/upload/chunked"),
        &body,
        &["-H", "Transfer-Encoding: chunked"],
    );
    assert_eq!(r.status, 406);

    // HTTP/2 (cleartext, prior knowledge).
    let r = post_file(
        &stack.url("/upload/h2"),
        &body,
        &["--http2-prior-knowledge"],
    );
    assert_eq!(r.status, 406);
    let clean = temp_file(&files, "clean-h2", &clean_bytes(70_000, 5));
    let r = post_file(
        &stack.url("/upload/h2"),
        &clean,
        &["--http2-prior-knowledge"],
    );
    assert_eq!(r.status, 200);

    let received: Vec<String> = stack
        .upstream
        .received()
        .into_iter()
        .map(|r| r.path)
        .collect();
    assert_eq!(
        received,
        vec!["/upload/h2".to_string()],
        "only the clean upload arrived"
    );
    assert!(stack.leftovers().is_empty());
}

#[test]
fn large_buffered_bodies_pass_byte_exact_or_are_rejected() {
    let mut options = StackOptions::new(BodyMode::Buffered);
    options.producer_args = vec!["--max-body-mb".into(), "64".into()];
    let stack = Stack::start(options);
    let files = tempfile::tempdir().unwrap();
    for (mib, seed) in [(5usize, 10u64), (50, 11)] {
        let clean = clean_bytes(mib << 20, seed);
        let r = post_file(
            &stack.url(&format!("/upload/{mib}m")),
            &temp_file(&files, "clean", &clean),
            &[],
        );
        assert_eq!(
            r.status,
            200,
            "{mib} MiB: {}",
            String::from_utf8_lossy(&r.body)
        );
        let last = stack.upstream.received().pop().unwrap();
        assert_eq!(
            (last.len, last.sha256),
            (clean.len() as u64, sha256_hex(&clean))
        );

        let infected = with_eicar(clean);
        let r = post_file(
            &stack.url("/upload/bad"),
            &temp_file(&files, "bad", &infected),
            &[],
        );
        assert_eq!(r.status, 406, "{mib} MiB infected");
    }
    assert_eq!(stack.upstream.received().len(), 2);
    assert!(
        stack.producer_metric("virus_scanner_producer_spilled_bytes_total") >= (50 << 20) as f64
    );
    assert!(stack.leftovers().is_empty(), "{:?}", stack.leftovers());
}

#[test]
fn full_duplex_gigabyte_upload_passes_byte_exact_in_little_memory() {
    let mut options = StackOptions::new(BodyMode::FullDuplexStreamed);
    options.producer_args = vec![
        "--max-body-mb".into(),
        "1100".into(),
        "--scan-timeout-seconds".into(),
        "240".into(),
    ];
    options.consumer_args = vec![
        "--max-scan-size-mb".into(),
        "1100".into(),
        "--scan-timeout-seconds".into(),
        "240".into(),
    ];
    options.clamd = ClamdOptions {
        stream_max_length: "2000M".into(),
        max_file_size: "2000M".into(),
        ..ClamdOptions::default()
    };
    let stack = Stack::start(options);
    let files = tempfile::tempdir().unwrap();

    let gib = files.path().join("gib");
    let mut f = std::fs::File::create(&gib).unwrap();
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    for i in 0..64 {
        let chunk = clean_bytes(16 << 20, 100 + i);
        sha2::Digest::update(&mut hasher, &chunk);
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    let want = hex::encode(sha2::Digest::finalize(hasher));
    let started = Instant::now();
    let r = post_file(&stack.url("/upload/gib"), &gib, &[]);
    assert_eq!(
        r.status,
        200,
        "{} {}",
        r.error,
        String::from_utf8_lossy(&r.body)
    );
    let last = stack.upstream.received().pop().unwrap();
    assert_eq!((last.len, last.sha256), (1u64 << 30, want));
    let rss = stack.producer_peak_rss();
    eprintln!(
        "1 GiB full-duplex upload: {:?}, producer peak RSS {} MiB",
        started.elapsed(),
        rss >> 20
    );
    assert!(rss < 128 << 20, "producer peak RSS {} MiB", rss >> 20);
    std::fs::remove_file(&gib).unwrap();

    // A large infected upload is rejected and never reaches the upstream.
    let bad = temp_file(&files, "bad", &with_eicar(clean_bytes(40 << 20, 7)));
    let r = post_file(&stack.url("/upload/bad"), &bad, &[]);
    assert_eq!(r.status, 406);
    assert_eq!(stack.upstream.received().len(), 1);

    // Infected and clean downloads in full-duplex mode.
    stack
        .upstream
        .serve("big-bad", with_eicar(clean_bytes(20 << 20, 8)), &[]);
    assert_eq!(curl(&[&stack.url("/files/big-bad")]).status, 406);
    let page = clean_bytes(12 << 20, 9);
    stack.upstream.serve("big-ok", page.clone(), &[]);
    let r = curl(&[&stack.url("/files/big-ok")]);
    assert_eq!(r.status, 200);
    assert!(r.body == page, "download differs");
    assert!(stack.leftovers().is_empty(), "{:?}", stack.leftovers());
}

#[test]
fn full_duplex_upload_with_eicar_is_rejected_and_an_aborted_upload_leaves_nothing() {
    let stack = Stack::start(StackOptions::new(BodyMode::FullDuplexStreamed));
    let files = tempfile::tempdir().unwrap();
    let body = temp_file(&files, "b", &with_eicar(clean_bytes(2 << 20, 1)));
    let r = post_file(
        &stack.url("/upload/x"),
        &body,
        &["-H", "Transfer-Encoding: chunked"],
    );
    assert_eq!(r.status, 406);
    let r = post_file(&stack.url("/upload/x"), &body, &["--http2-prior-knowledge"]);
    assert_eq!(r.status, 406);

    // Abort an upload that has spilled to disk: curl is rate-limited and killed mid-way.
    let big = temp_file(&files, "big", &clean_bytes(40 << 20, 2));
    let data = format!("@{}", big.display());
    let mut child = virus_scanner_test_support::clean_command("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "--limit-rate",
            "20M",
            "-X",
            "POST",
            "--data-binary",
            &data,
        ])
        .arg(stack.url("/upload/aborted"))
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || !stack.leftovers().is_empty()),
        "the upload never spilled"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || stack.leftovers().is_empty()),
        "aborted upload left {:?}",
        stack.leftovers()
    );
    assert!(stack.upstream.received().is_empty());
}

#[test]
fn high_priority_requests_overtake_a_backlog() {
    let mut options = StackOptions::new(BodyMode::Buffered);
    options.consumer_args = vec!["--concurrency".into(), "1".into()];
    let mut stack = Stack::start(options);
    stack.stop_consumer();
    // A backlog of normal-priority work already in the queue.
    let producer = stack.rt.block_on(async {
        virus_scanner_queue::Producer::connect(virus_scanner_queue::QueueConfig::new(
            virus_scanner_queue::RedisConfig::from_host_port(
                "127.0.0.1",
                stack.redis.port(),
                false,
            ),
        ))
        .await
        .unwrap()
    });
    stack.rt.block_on(async {
        for i in 0..300u64 {
            let task = virus_scanner_protocol::task::ScanTask {
                id: format!("backlog-{i}"),
                content: Some(virus_scanner_protocol::task::Content::Body(
                    clean_bytes(256 << 10, i).into(),
                )),
                ..Default::default()
            };
            producer.enqueue(&task).await.unwrap();
        }
    });
    stack.start_consumer();
    let files = tempfile::tempdir().unwrap();
    let body = temp_file(&files, "urgent", EICAR);
    let started = Instant::now();
    let r = post_file(
        &stack.url("/upload/urgent"),
        &body,
        &["-H", "X-Priority: high"],
    );
    let urgent = started.elapsed();
    assert_eq!(r.status, 406);
    let (_, normal_left) = stack.rt.block_on(producer.depth()).unwrap();
    assert!(
        normal_left >= 250,
        "the urgent request waited for the backlog ({normal_left} left, {urgent:?})"
    );
}

#[test]
fn redis_down_blocks_everything_and_service_resumes_without_a_restart() {
    let mut options = StackOptions::new(BodyMode::Buffered);
    options.producer_args = vec!["--scan-timeout-seconds".into(), "3".into()];
    let mut stack = Stack::start(options);
    let files = tempfile::tempdir().unwrap();
    let clean = temp_file(&files, "clean", &clean_bytes(10_000, 1));
    assert_eq!(post_file(&stack.url("/upload/a"), &clean, &[]).status, 200);

    stack.redis.stop();
    // The same bytes, decided a moment ago, must not pass from memory either. The producer
    // learns of the loss at once through its canary connection; its readiness turning red
    // (a PING that fails) is the observable point after that.
    assert!(wait_for(Duration::from_secs(5), || {
        http_get(stack.producer_http, "/ready").is_none_or(|(s, _)| s != 200)
    }));
    let started = Instant::now();
    let r = post_file(&stack.url("/upload/b"), &clean, &[]);
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-virus-scan"), Some("error"));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        stack.upstream.received().len(),
        1,
        "nothing passes while Redis is down"
    );

    stack.redis.restart();
    assert!(
        wait_for(Duration::from_secs(30), || post_file(
            &stack.url("/upload/c"),
            &clean,
            &[]
        )
        .status
            == 200),
        "service did not resume after Redis came back"
    );
    let infected = temp_file(&files, "eicar", EICAR);
    assert_eq!(
        post_file(&stack.url("/upload/d"), &infected, &[]).status,
        406
    );
}

#[test]
fn consumer_or_clamd_down_gives_503_at_the_deadline_not_a_hang() {
    let mut options = StackOptions::new(BodyMode::FullDuplexStreamed);
    options.producer_args = vec!["--scan-timeout-seconds".into(), "3".into()];
    let mut stack = Stack::start(options);
    let files = tempfile::tempdir().unwrap();
    // Distinct bytes each time: a cached verdict needs no consumer.
    let clean = |n| temp_file(&files, &format!("c{n}"), &clean_bytes(10_000, n));
    assert_eq!(
        post_file(&stack.url("/upload/a"), &clean(1), &[]).status,
        200
    );

    stack.stop_consumer();
    let started = Instant::now();
    let r = post_file(&stack.url("/upload/b"), &clean(2), &[]);
    let took = started.elapsed();
    assert_eq!(r.status, 503);
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "{took:?}"
    );

    stack.start_consumer();
    assert_eq!(
        post_file(&stack.url("/upload/c"), &clean(3), &[]).status,
        200
    );
    stack.clamd.stop();
    let started = Instant::now();
    let r = post_file(&stack.url("/upload/d"), &clean(4), &[]);
    assert_eq!(r.status, 503);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(stack.upstream.received().len(), 2);
}

#[test]
fn streamed_mode_is_refused_never_passed() {
    let stack = Stack::start(StackOptions::new(BodyMode::Streamed));
    let files = tempfile::tempdir().unwrap();
    let r = post_file(
        &stack.url("/upload/x"),
        &temp_file(&files, "c", &clean_bytes(5000, 1)),
        &[],
    );
    assert!(
        r.status >= 500,
        "STREAMED mode must fail closed, got {}",
        r.status
    );
    assert!(stack.upstream.received().is_empty());
}

#[test]
fn unix_socket_processor_blocks_eicar() {
    let mut options = StackOptions::new(BodyMode::Buffered);
    options.unix_socket = true;
    let stack = Stack::start(options);
    // Envoy runs as another uid of the pod (Istio's proxy as 1337): it can connect whatever
    // the producer's umask.
    let socket = stack.scan_dir.path().with_extension("sock");
    let connect_as_1337 = std::process::Command::new("python3")
        .args([
            "-c",
            "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
        ])
        .arg(&socket)
        .uid(1337)
        .gid(1337)
        .output()
        .expect("python3 as uid 1337 (the tests run as root)");
    assert!(
        connect_as_1337.status.success(),
        "uid 1337 cannot connect to {}: {}",
        socket.display(),
        String::from_utf8_lossy(&connect_as_1337.stderr)
    );
    let files = tempfile::tempdir().unwrap();
    let r = post_file(&stack.url("/upload/x"), &temp_file(&files, "e", EICAR), &[]);
    assert_eq!(r.status, 406);
    let r = post_file(
        &stack.url("/upload/y"),
        &temp_file(&files, "c", b"fine"),
        &[],
    );
    assert_eq!(r.status, 200);
}

#[test]
fn without_a_shared_spool_large_bodies_are_scanned_through_redis_and_leave_nothing() {
    let mut options = StackOptions::new(BodyMode::Buffered);
    options.spool_shared = false;
    options.producer_args = vec!["--scan-file-threshold-mb".into(), "1".into()];
    let stack = Stack::start(options);
    let files = tempfile::tempdir().unwrap();

    // Spilled to a directory the consumer cannot open: infected, and never upstream.
    let mut infected = clean_bytes(12 << 20, 21);
    infected.extend_from_slice(EICAR);
    let r = post_file(
        &stack.url("/upload/big-bad"),
        &temp_file(&files, "bad", &infected),
        &[],
    );
    assert_eq!(r.status, 406, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-virus-name"), Some(EICAR_BODY_SIGNATURE));
    assert_eq!(r.json()["sha256"], sha256_hex(&infected));
    assert!(stack.upstream.received().is_empty());

    // A clean body of the same size passes byte for byte.
    let clean = clean_bytes(infected.len(), 22);
    let r = post_file(
        &stack.url("/upload/big-ok"),
        &temp_file(&files, "ok", &clean),
        &[],
    );
    stack.assert_only_delivery(&r, &clean);

    // Downloads take the same way (other bytes, so that no cached verdict answers).
    let mut download = clean_bytes(12 << 20, 23);
    download.extend_from_slice(EICAR);
    stack.upstream.serve("big-bad", download, &[]);
    assert_eq!(curl(&[&stack.url("/files/big-bad")]).status, 406);

    assert!(
        stack.producer_metric("virus_scanner_producer_spilled_bytes_total")
            >= (3 * infected.len()) as f64,
        "the bodies were not spilled"
    );
    assert_eq!(
        stack.redis_keys("{virus-scanner}:body:*"),
        Vec::<String>::new()
    );
    assert!(stack.leftovers().is_empty(), "{:?}", stack.leftovers());
}

/// One HTTP/1.1 exchange on a fresh connection (`Connection: close`): the status and the body
/// after the head, as far as it came.
fn raw_exchange(port: u16, head: &str, body: &[u8]) -> (u16, Vec<u8>) {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, Vec::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    if s.write_all(head.as_bytes()).is_err() || s.write_all(body).is_err() {
        return (0, Vec::new());
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    let status = String::from_utf8_lossy(&raw[..end])
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, raw[(end + 4).min(raw.len())..].to_vec())
}

/// A block that needs no wait (the hash-only sample, once its verdict is cached) is decided in
/// the same poll that read the body, and the stream's work ends right after queuing it. Many
/// of them at once, beside large uploads that keep the producer's connection with Envoy busy
/// (and so the serving task's cooperative budget low), must all be refused: a block left in
/// the queue while the stream ended OK would let Envoy pass the whole body as a 200.
#[test]
fn cached_infected_downloads_under_load_are_never_passed() {
    let stack = Stack::start(StackOptions::new(BodyMode::Buffered));
    let sample = hash_signature_sample();
    stack.upstream.serve("sample", sample.clone(), &[]);
    // The first one is scanned; the rest are answered from the producer's memo.
    assert_eq!(curl(&[&stack.url("/files/sample")]).status, 406);
    let port = stack.envoy.port();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut threads = Vec::new();
    for t in 0..12 {
        let sample = sample.clone();
        threads.push(std::thread::spawn(move || {
            let mut seen = (0u32, 0u32, 0u32); // refused, passed, other
            let upload = clean_bytes(6 << 20, t);
            let mut n = 0u64;
            while Instant::now() < deadline && seen.0 + seen.1 + seen.2 < 400 {
                n += 1;
                if t % 3 == 2 {
                    // A large clean upload: many body frames on the producer's connection.
                    let head = format!(
                        "POST /upload/load-{t}-{n} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        upload.len()
                    );
                    raw_exchange(port, &head, &upload);
                    continue;
                }
                let head = "GET /files/sample HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
                match raw_exchange(port, head, &[]) {
                    (406, _) => seen.0 += 1,
                    (200, body) if body == sample => seen.1 += 1,
                    _ => seen.2 += 1,
                }
            }
            seen
        }));
    }
    let (mut refused, mut passed, mut other) = (0, 0, 0);
    for t in threads {
        let (r, p, o) = t.join().unwrap();
        (refused, passed, other) = (refused + r, passed + p, other + o);
    }
    assert_eq!(
        passed, 0,
        "infected downloads passed ({refused} refused, {other} other)"
    );
    assert_eq!(other, 0, "answers other than 406 ({refused} refused)");
    assert!(refused >= 1000, "only {refused} downloads made");
}
