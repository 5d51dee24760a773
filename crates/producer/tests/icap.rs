//! The ICAP service against `c-icap-client` (Debian package c-icap) and raw sockets: OPTIONS,
//! REQMOD and RESPMOD with and without preview, 204 and echo, the block page with
//! c-icap-compatible headers, persistent connections, limits and malformed input.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{Stack, StackOptions, temp_file};
use virus_scanner_test_support::{BodyMode, EICAR, EICAR_BODY_SIGNATURE, clean_bytes};

fn c_icap_client(port: u16, args: &[&str]) -> String {
    let out = virus_scanner_test_support::clean_command("c-icap-client")
        .args([
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-s",
            "avscan",
            "-v",
        ])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("c-icap-client (Debian package c-icap) is missing: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "c-icap-client {args:?} failed:\n{text}"
    );
    text
}

fn stack(extra: &[&str]) -> Stack {
    let mut options = StackOptions::new(BodyMode::Buffered);
    options.producer_args = extra.iter().map(|s| s.to_string()).collect();
    Stack::start(options)
}

fn with_eicar_inside(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = clean_bytes(len, seed);
    let at = len / 2;
    bytes[at..at + EICAR.len()].copy_from_slice(EICAR);
    bytes
}

#[test]
fn c_icap_client_options_respmod_and_reqmod() {
    let stack = stack(&[]);
    let dir = tempfile::tempdir().unwrap();
    let port = stack.icap_port;

    let options = c_icap_client(port, &[]);
    for needle in [
        "Methods: REQMOD, RESPMOD",
        "ISTag: \"VS-",
        "Max-Connections: 1024",
        "Options-TTL: 300",
        "Preview: 1024",
        "Transfer-Preview: *",
        "Allow: 204",
    ] {
        assert!(
            options.contains(needle),
            "OPTIONS lacks {needle}:\n{options}"
        );
    }

    // RESPMOD with preview: EICAR blocked with the block page and c-icap's headers.
    let eicar = temp_file(&dir, "eicar.com", EICAR);
    let out_file = dir.path().join("blocked.html");
    let respmod = c_icap_client(
        port,
        &[
            "-f",
            &eicar.display().to_string(),
            "-resp",
            "http://origin.test/files/eicar.com",
            "-o",
            &out_file.display().to_string(),
        ],
    );
    assert!(respmod.contains("ICAP/1.0 200 OK"), "{respmod}");
    assert!(respmod.contains("HTTP/1.1 403 Forbidden"), "{respmod}");
    assert!(
        respmod.contains(&format!(
            "X-Infection-Found: Type=0; Resolution=2; Threat={EICAR_BODY_SIGNATURE};"
        )),
        "{respmod}"
    );
    assert!(respmod.contains("X-Violations-Found: 1"), "{respmod}");
    let page = std::fs::read_to_string(&out_file).unwrap();
    assert!(page.contains(EICAR_BODY_SIGNATURE), "{page}");

    // A clean file with preview: 204.
    let clean = temp_file(&dir, "clean.bin", &clean_bytes(300 * 1024, 7));
    let ok = c_icap_client(
        port,
        &[
            "-f",
            &clean.display().to_string(),
            "-resp",
            "http://origin.test/files/clean.bin",
        ],
    );
    assert!(ok.contains("ICAP/1.0 204"), "{ok}");

    // Without 204 and without preview, the body comes back byte for byte.
    let echoed = dir.path().join("echo.bin");
    let echo = c_icap_client(
        port,
        &[
            "-f",
            &clean.display().to_string(),
            "-resp",
            "http://origin.test/files/clean.bin",
            "-no204",
            "-nopreview",
            "-o",
            &echoed.display().to_string(),
        ],
    );
    assert!(echo.contains("ICAP/1.0 200 OK"), "{echo}");
    let (got, sent) = (
        std::fs::read(&echoed).unwrap(),
        std::fs::read(&clean).unwrap(),
    );
    assert!(
        got == sent,
        "echoed {} bytes of {}:\n{echo}",
        got.len(),
        sent.len()
    );

    // REQMOD: an EICAR upload is refused, a clean one allowed.
    let reqmod = c_icap_client(
        port,
        &[
            "-f",
            &eicar.display().to_string(),
            "-req",
            "http://origin.test/upload",
            "-method",
            "POST",
        ],
    );
    assert!(reqmod.contains("HTTP/1.1 403 Forbidden"), "{reqmod}");
    assert!(reqmod.contains("X-Infection-Found"), "{reqmod}");
    let upload = c_icap_client(
        port,
        &[
            "-f",
            &clean.display().to_string(),
            "-req",
            "http://origin.test/upload",
            "-method",
            "POST",
        ],
    );
    assert!(upload.contains("ICAP/1.0 204"), "{upload}");

    // Large bodies (spilled to disk): clean passes, EICAR in the middle is found.
    let big_clean = temp_file(&dir, "big.bin", &clean_bytes(40 << 20, 11));
    let big = c_icap_client(
        port,
        &[
            "-f",
            &big_clean.display().to_string(),
            "-resp",
            "http://origin.test/big.bin",
        ],
    );
    assert!(big.contains("ICAP/1.0 204"), "{big}");
    let big_bad = temp_file(&dir, "big-bad.bin", &with_eicar_inside(40 << 20, 12));
    let blocked = c_icap_client(
        port,
        &[
            "-f",
            &big_bad.display().to_string(),
            "-resp",
            "http://origin.test/big-bad.bin",
        ],
    );
    assert!(blocked.contains("HTTP/1.1 403 Forbidden"), "{blocked}");

    let infected = stack.producer_metric(
        "virus_scanner_producer_icap_requests_total{method=\"RESPMOD\",verdict=\"infected\"}",
    );
    assert!(infected >= 2.0, "{infected}");
    assert!(stack.leftovers().is_empty(), "{:?}", stack.leftovers());
}

/// Sends raw bytes and returns everything the server answers until it closes.
fn exchange(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn respmod(port: u16, encapsulated: &str, rest: &str) -> Vec<u8> {
    format!(
        "RESPMOD icap://127.0.0.1:{port}/avscan ICAP/1.0\r\nHost: 127.0.0.1\r\nAllow: 204\r\nEncapsulated: {encapsulated}\r\n\r\n{rest}"
    )
    .into_bytes()
}

const RES_HDR: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n";

#[test]
fn malformed_icap_gets_400_and_a_closed_connection() {
    let stack = stack(&[
        "--icap-read-timeout-seconds",
        "2",
        "--icap-max-connections",
        "3",
    ]);
    let port = stack.icap_port;
    let hdr_len = RES_HDR.len();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\x01garbage\r\n\r\n".to_vec()),
        (
            "http instead of icap",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "no Encapsulated",
            format!("RESPMOD icap://127.0.0.1:{port}/avscan ICAP/1.0\r\nHost: x\r\n\r\n")
                .into_bytes(),
        ),
        (
            "bad Encapsulated",
            respmod(port, "res-hdr=zz, res-body=4", RES_HDR),
        ),
        (
            "offsets past the headers",
            respmod(
                port,
                &format!("res-hdr=0, res-body={}", hdr_len - 5),
                RES_HDR,
            ),
        ),
        (
            "negative chunk size",
            respmod(
                port,
                &format!("res-hdr=0, res-body={hdr_len}"),
                &format!("{RES_HDR}-5\r\nhello\r\n0\r\n\r\n"),
            ),
        ),
        (
            "huge chunk size",
            respmod(
                port,
                &format!("res-hdr=0, res-body={hdr_len}"),
                &format!("{RES_HDR}fffffffffffffff\r\nhello\r\n0\r\n\r\n"),
            ),
        ),
        (
            "chunk without CRLF",
            respmod(
                port,
                &format!("res-hdr=0, res-body={hdr_len}"),
                &format!("{RES_HDR}5\r\nhelloXX0\r\n\r\n"),
            ),
        ),
        ("huge head", {
            let mut v = b"OPTIONS icap://127.0.0.1/avscan ICAP/1.0\r\nX-Big: ".to_vec();
            v.extend(std::iter::repeat_n(b'a', 70 * 1024));
            v.extend_from_slice(b"\r\n\r\n");
            v
        }),
    ];
    for (name, request) in cases {
        let answer = exchange(port, &request);
        assert!(
            answer.starts_with("ICAP/1.0 400 Bad Request\r\n"),
            "{name}: {answer:?}"
        );
        assert!(answer.contains("Connection: close"), "{name}: {answer:?}");
    }

    // A truncated head: the connection is closed at the read timeout, without an answer.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(b"RESPMOD icap://127.0.0.1/avscan ICAP/1.0\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "slowloris held {:?}",
        started.elapsed()
    );

    // Persistent connection: OPTIONS then a clean RESPMOD then an infected one, on one socket.
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let read_answer = |conn: &mut TcpStream, until: &str| {
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !String::from_utf8_lossy(&got).contains(until) {
            assert_eq!(
                conn.read(&mut byte).unwrap(),
                1,
                "closed early: {}",
                String::from_utf8_lossy(&got)
            );
            got.push(byte[0]);
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    conn.write_all(
        format!("OPTIONS icap://127.0.0.1:{port}/avscan ICAP/1.0\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let options = read_answer(&mut conn, "\r\n\r\n");
    assert!(options.starts_with("ICAP/1.0 200 OK"), "{options}");
    let body = format!("{RES_HDR}5\r\nhello\r\n0\r\n\r\n");
    conn.write_all(&respmod(
        port,
        &format!("res-hdr=0, res-body={hdr_len}"),
        &body,
    ))
    .unwrap();
    let clean = read_answer(&mut conn, "\r\n\r\n");
    assert!(clean.starts_with("ICAP/1.0 204 No Content"), "{clean}");
    let eicar = String::from_utf8_lossy(EICAR).into_owned();
    let body = format!("{RES_HDR}{:x}\r\n{eicar}\r\n0\r\n\r\n", EICAR.len());
    conn.write_all(&respmod(
        port,
        &format!("res-hdr=0, res-body={hdr_len}"),
        &body,
    ))
    .unwrap();
    let blocked = read_answer(&mut conn, "0\r\n\r\n");
    assert!(blocked.contains("HTTP/1.1 403 Forbidden"), "{blocked}");

    // Preview with ieof: the whole body was in the preview, no 100 Continue.
    let body = format!("{RES_HDR}5\r\nhello\r\n0; ieof\r\n\r\n");
    let mut request = respmod(port, &format!("res-hdr=0, res-body={hdr_len}"), &body);
    let at = request.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    request.splice(at..at, b"Preview: 1024\r\n".iter().copied());
    conn.write_all(&request).unwrap();
    let previewed = read_answer(&mut conn, "\r\n\r\n");
    assert!(previewed.starts_with("ICAP/1.0 204"), "{previewed}");

    // Max-Connections: with three held open (conn, and two more), the next is refused.
    // Each holds its slot once it has been answered: the server accepted it by then.
    let options = format!("OPTIONS icap://127.0.0.1:{port}/avscan ICAP/1.0\r\nHost: x\r\n\r\n");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(options.as_bytes()).unwrap();
        let answer = read_answer(&mut c, "\r\n\r\n");
        assert!(answer.starts_with("ICAP/1.0 200 OK"), "{answer}");
        held.push(c);
    }
    let refused = exchange(port, b"");
    assert!(refused.starts_with("ICAP/1.0 503"), "{refused:?}");

    assert!(
        stack.producer_metric("virus_scanner_producer_icap_requests_total{method=\"invalid\"")
            >= 8.0
    );
    assert!(stack.leftovers().is_empty(), "{:?}", stack.leftovers());
}
