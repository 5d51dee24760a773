//! The ICAP flow over an in-memory connection, with a scanner that needs no Redis: what
//! each request shape is answered, byte for byte where it matters.

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use virus_scanner_protocol::task::Priority;

use super::*;
use crate::config::RangeRequests;
use crate::scan::fake::FakeScan;

fn server(range: RangeRequests) -> Arc<IcapServer<FakeScan>> {
    let scan = FakeScan::new(range, 64);
    let config = IcapConfig {
        service_path: "/avscan".into(),
        max_connections: 4,
        preview: 8,
        options_ttl: Duration::from_secs(300),
        idle_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
        block_status: 403,
    };
    Arc::new(IcapServer::new(Arc::new(scan), config))
}

/// A client end whose server end is served by `server` until it closes.
fn connect(server: &Arc<IcapServer<FakeScan>>) -> DuplexStream {
    let (client, end) = tokio::io::duplex(64 * 1024);
    let server = server.clone();
    tokio::spawn(async move {
        let (read, write) = tokio::io::split(end);
        server.serve_connection(read, write).await;
    });
    client
}

/// Reads until `end` has arrived (the answer's last bytes).
async fn read_until(client: &mut DuplexStream, end: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(end) {
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "closed before {end:?}: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(got).unwrap()
}

const REQ_HDR: &str = "POST /upload/file.bin HTTP/1.1\r\nHost: o\r\nX-Priority: high\r\n\r\n";

fn reqmod(extra: &str, body_chunks: &str) -> String {
    format!(
        "REQMOD icap://i/avscan ICAP/1.0\r\nHost: i\r\n{extra}Encapsulated: req-hdr=0, req-body={}\r\n\r\n{REQ_HDR}{body_chunks}",
        REQ_HDR.len()
    )
}

#[tokio::test]
async fn options_announce_the_service_and_its_istag() {
    let s = server(RangeRequests::Strip);
    let mut c = connect(&s);
    c.write_all(b"OPTIONS icap://i/avscan ICAP/1.0\r\nHost: i\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until(&mut c, "\r\n\r\n").await;
    assert!(answer.starts_with("ICAP/1.0 200 OK\r\n"), "{answer}");
    for line in [
        "Methods: REQMOD, RESPMOD\r\n",
        "ISTag: \"VS-27000\"\r\n",
        "Max-Connections: 4\r\n",
        "Preview: 8\r\n",
        "Allow: 204\r\n",
    ] {
        assert!(answer.contains(line), "{line} in {answer}");
    }
}

#[tokio::test]
async fn a_preview_is_continued_and_the_whole_body_scanned_on_one_connection_twice() {
    let s = server(RangeRequests::Strip);
    let mut c = connect(&s);
    for _ in 0..2 {
        c.write_all(
            reqmod("Allow: 204\r\nPreview: 8\r\n", "8\r\nclean pa\r\n0\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let cont = read_until(&mut c, "\r\n\r\n").await;
        assert_eq!(cont, "ICAP/1.0 100 Continue\r\n\r\n");
        // EVIL only after the preview: the verdict must wait for it.
        c.write_all(b"6\r\nrtEVIL\r\n0\r\n\r\n").await.unwrap();
        let answer = read_until(&mut c, "0\r\n\r\n").await;
        assert!(answer.starts_with("ICAP/1.0 200 OK\r\n"), "{answer}");
        assert!(answer.contains("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
        assert!(answer.contains("X-Infection-Found: Type=0; Resolution=2; Threat=Test.Evil;"));
        assert!(answer.contains("\tfile.bin\r\n"), "{answer}");
    }
    let scanned = s.scan.scanned.lock().unwrap().clone();
    assert_eq!(
        scanned,
        vec![(b"clean partEVIL".to_vec(), Priority::High); 2]
    );
    assert_eq!(
        *s.scan.counted.lock().unwrap(),
        vec![("REQMOD", "infected"); 2]
    );
}

#[tokio::test]
async fn a_clean_body_is_204_when_allowed_and_echoed_otherwise() {
    let s = server(RangeRequests::Strip);
    let mut c = connect(&s);
    c.write_all(reqmod("Allow: 204\r\n", "5\r\nhello\r\n0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let answer = read_until(&mut c, "\r\n\r\n").await;
    assert_eq!(
        answer,
        "ICAP/1.0 204 No Content\r\nISTag: \"VS-27000\"\r\n\r\n"
    );
    c.write_all(reqmod("", "5\r\nhello\r\n0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let answer = read_until(&mut c, "0\r\n\r\n").await;
    let expected = format!(
        "ICAP/1.0 200 OK\r\nISTag: \"VS-27000\"\r\nEncapsulated: req-hdr=0, req-body={}\r\n\r\n{REQ_HDR}5\r\nhello\r\n0\r\n\r\n",
        REQ_HDR.len()
    );
    assert_eq!(answer, expected);
}

#[tokio::test]
async fn a_range_request_is_answered_without_its_range_or_refused() {
    let get = "GET /f HTTP/1.1\r\nHost: o\r\nRange: bytes=0-9\r\nIf-Range: \"e\"\r\n\r\n";
    let request = format!(
        "REQMOD icap://i/avscan ICAP/1.0\r\nHost: i\r\nAllow: 204\r\nEncapsulated: req-hdr=0, null-body={}\r\n\r\n{get}",
        get.len()
    );
    let s = server(RangeRequests::Strip);
    let mut c = connect(&s);
    c.write_all(request.as_bytes()).await.unwrap();
    let stripped = "GET /f HTTP/1.1\r\nHost: o\r\n\r\n";
    let answer = read_until(&mut c, stripped).await;
    assert_eq!(
        answer,
        format!(
            "ICAP/1.0 200 OK\r\nISTag: \"VS-27000\"\r\nEncapsulated: req-hdr=0, null-body={}\r\n\r\n{stripped}",
            stripped.len()
        )
    );

    let s = server(RangeRequests::Refuse);
    let mut c = connect(&s);
    c.write_all(request.as_bytes()).await.unwrap();
    let answer = read_until(&mut c, "0\r\n\r\n").await;
    assert!(
        answer.contains("HTTP/1.1 416 Content Not Scanned\r\n"),
        "{answer}"
    );

    let s = server(RangeRequests::Allow);
    let mut c = connect(&s);
    c.write_all(request.as_bytes()).await.unwrap();
    let answer = read_until(&mut c, "\r\n\r\n").await;
    assert!(answer.starts_with("ICAP/1.0 204 No Content"), "{answer}");
}

#[tokio::test]
async fn a_partial_206_is_refused_and_a_body_over_the_limit_is_not_read_past_the_preview() {
    let s = server(RangeRequests::Allow);
    let mut c = connect(&s);
    let res = "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4/10\r\n\r\n";
    c.write_all(
        format!(
            "RESPMOD icap://i/avscan ICAP/1.0\r\nHost: i\r\nAllow: 204\r\nEncapsulated: res-hdr=0, res-body={}\r\n\r\n{res}5\r\nhello\r\n0\r\n\r\n",
            res.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let answer = read_until(&mut c, "0\r\n\r\n").await;
    assert!(
        answer.contains("HTTP/1.1 413 Content Not Scanned\r\n"),
        "{answer}"
    );
    assert!(answer.contains("part of a representation"), "{answer}");

    // 65 bytes in the preview, past the 64-byte limit: refused without 100 Continue.
    let big = "x".repeat(65);
    c.write_all(
        reqmod(
            "Allow: 204\r\nPreview: 65\r\n",
            &format!("41\r\n{big}\r\n0\r\n\r\n"),
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let answer = read_until(&mut c, "0\r\n\r\n").await;
    assert!(!answer.contains("100 Continue"), "{answer}");
    assert!(
        answer.contains("HTTP/1.1 413 Content Not Scanned\r\n"),
        "{answer}"
    );
}

#[tokio::test]
async fn malformed_requests_get_400_and_the_connection_closes() {
    let s = server(RangeRequests::Strip);
    for bad in [
        "GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
        "REQMOD icap://i/avscan ICAP/1.0\r\nEncapsulated: req-body=zz\r\n\r\n".to_owned(),
        reqmod("", "zz\r\nbad\r\n0\r\n\r\n"),
    ] {
        let mut c = connect(&s);
        c.write_all(bad.as_bytes()).await.unwrap();
        let answer = read_until(&mut c, "\r\n\r\n").await;
        assert!(
            answer.starts_with("ICAP/1.0 400 Bad Request\r\n"),
            "{bad:?}: {answer}"
        );
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
            .await
            .expect("closed")
            .unwrap();
        assert_eq!(n, 0, "{bad:?}");
    }
    let mut c = connect(&s);
    c.write_all(b"OPTIONS icap://i/other ICAP/1.0\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until(&mut c, "\r\n\r\n").await;
    assert!(answer.starts_with("ICAP/1.0 404"), "{answer}");
}
