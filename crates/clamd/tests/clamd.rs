//! The client against a real clamd with the repository's test signatures.

#![allow(clippy::unwrap_used)]

use std::io::Write;

use virus_scanner_clamd::{ClamdClient, ClamdConfig, ScanInput, ScanReply};
use virus_scanner_test_support::{
    Clamd, ClamdOptions, EICAR, EICAR_BODY_SIGNATURE, HASH_SAMPLE_SIGNATURE, clean_bytes,
    hash_signature_sample,
};

fn client(clamd: &Clamd) -> ClamdClient {
    ClamdClient::new(ClamdConfig::new(clamd.address().parse().unwrap()))
}

#[tokio::test]
async fn eicar_is_found_and_clean_bytes_pass() {
    let clamd = Clamd::start();
    let client = client(&clamd);
    let mut body = clean_bytes(300_000, 1);
    body.extend_from_slice(EICAR);
    assert_eq!(
        client.scan(ScanInput::Bytes(&body)).await.unwrap(),
        ScanReply::Infected(EICAR_BODY_SIGNATURE.into())
    );
    let clean = clean_bytes(1 << 20, 2);
    assert_eq!(
        client.scan(ScanInput::Bytes(&clean)).await.unwrap(),
        ScanReply::Clean
    );
    assert_eq!(
        client.scan(ScanInput::Bytes(b"")).await.unwrap(),
        ScanReply::Clean
    );
}

#[tokio::test]
async fn hash_signature_matches_the_whole_file_from_disk() {
    let clamd = Clamd::start();
    let client = client(&clamd);
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&hash_signature_sample()).unwrap();
    let mut f = tokio::fs::File::open(file.path()).await.unwrap();
    assert_eq!(
        client.scan(ScanInput::File(&mut f)).await.unwrap(),
        ScanReply::Infected(HASH_SAMPLE_SIGNATURE.into())
    );
    // The same bytes with one more byte are a different file.
    let mut longer = hash_signature_sample();
    longer.push(0);
    assert_eq!(
        client.scan(ScanInput::Bytes(&longer)).await.unwrap(),
        ScanReply::Clean
    );
}

/// Yields an error on every read, like a body store that went away mid-stream.
struct FailingRead;

impl tokio::io::AsyncRead for FailingRead {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Err(std::io::Error::other("the store went away")))
    }
}

#[tokio::test]
async fn a_reader_is_scanned_to_its_end_and_a_failed_read_ends_the_scan_at_once() {
    use tokio::io::AsyncReadExt;
    let clamd = Clamd::start();
    let client = client(&clamd);
    let mut body = clean_bytes(600_000, 4);
    body.extend_from_slice(EICAR);
    let mut reader = &body[..];
    assert_eq!(
        client.scan(ScanInput::Reader(&mut reader)).await.unwrap(),
        ScanReply::Infected(EICAR_BODY_SIGNATURE.into())
    );
    // EICAR was sent, but the stream never ended: no verdict, and no wait for one.
    let started = std::time::Instant::now();
    let mut broken = (&body[..]).chain(FailingRead);
    assert!(matches!(
        client.scan(ScanInput::Reader(&mut broken)).await,
        Err(virus_scanner_clamd::ClamdError::Input(_))
    ));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(
        client.scan(ScanInput::Bytes(b"x")).await.unwrap(),
        ScanReply::Clean
    );
}

#[tokio::test]
async fn version_reports_engine_and_database() {
    let clamd = Clamd::start_with(ClamdOptions {
        db_version: 4242,
        ..ClamdOptions::default()
    });
    let client = client(&clamd);
    client.ping().await.unwrap();
    let version = client.version().await.unwrap();
    assert!(version.engine.starts_with("ClamAV "), "{version:?}");
    assert_eq!(version.database.as_deref(), Some("4242"));
}

#[tokio::test]
async fn stream_over_clamd_limit_is_unscannable_not_clean() {
    let clamd = Clamd::start_with(ClamdOptions {
        stream_max_length: "1M".into(),
        ..ClamdOptions::default()
    });
    let client = client(&clamd);
    let body = clean_bytes(3 << 20, 3);
    assert!(matches!(
        client.scan(ScanInput::Bytes(&body)).await.unwrap(),
        ScanReply::Unscannable(_)
    ));
    // The client recovers on a new session.
    assert_eq!(
        client.scan(ScanInput::Bytes(b"x")).await.unwrap(),
        ScanReply::Clean
    );
}

#[tokio::test]
async fn pooled_session_survives_a_clamd_restart() {
    let mut clamd = Clamd::start();
    let client = client(&clamd);
    assert_eq!(
        client.scan(ScanInput::Bytes(b"a")).await.unwrap(),
        ScanReply::Clean
    );
    clamd.restart();
    assert_eq!(
        client.scan(ScanInput::Bytes(EICAR)).await.unwrap(),
        ScanReply::Infected(EICAR_BODY_SIGNATURE.into())
    );
}

#[tokio::test]
async fn unreachable_clamd_is_a_connect_error() {
    let port = virus_scanner_test_support::free_port();
    let client = ClamdClient::new(ClamdConfig::new(
        format!("127.0.0.1:{port}").parse().unwrap(),
    ));
    let err = client.scan(ScanInput::Bytes(b"x")).await.unwrap_err();
    assert_eq!(err.metric_label(), "connect");
    assert!(err.is_unreachable() && err.is_retryable());
}

/// A client that can only scan by descriptor: its main address has nothing listening, so
/// every verdict below came over FILDES on the local socket.
fn descriptor_only_client(clamd: &Clamd) -> ClamdClient {
    let port = virus_scanner_test_support::free_port();
    let mut config = ClamdConfig::new(format!("127.0.0.1:{port}").parse().unwrap());
    config.local_socket = Some(clamd.socket_path());
    ClamdClient::new(config)
}

/// The test corpus, scanned with whatever the client chooses; the same verdicts either way.
async fn corpus_verdicts(client: &ClamdClient) {
    let mut body = clean_bytes(300_000, 1);
    body.extend_from_slice(EICAR);
    assert_eq!(
        client.scan(ScanInput::Bytes(&body)).await.unwrap(),
        ScanReply::Infected(EICAR_BODY_SIGNATURE.into())
    );
    let clean = clean_bytes(1 << 20, 2);
    assert_eq!(
        client.scan(ScanInput::Bytes(&clean)).await.unwrap(),
        ScanReply::Clean
    );
    assert_eq!(
        client.scan(ScanInput::Bytes(b"")).await.unwrap(),
        ScanReply::Clean
    );
    assert_eq!(
        client
            .scan(ScanInput::Bytes(&hash_signature_sample()))
            .await
            .unwrap(),
        ScanReply::Infected(HASH_SAMPLE_SIGNATURE.into())
    );
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&hash_signature_sample()).unwrap();
    let mut f = tokio::fs::File::open(file.path()).await.unwrap();
    // Twice: the second scan starts from the file's start again.
    for _ in 0..2 {
        assert_eq!(
            client.scan(ScanInput::File(&mut f)).await.unwrap(),
            ScanReply::Infected(HASH_SAMPLE_SIGNATURE.into())
        );
    }
    let mut longer = hash_signature_sample();
    longer.push(0);
    assert_eq!(
        client.scan(ScanInput::Bytes(&longer)).await.unwrap(),
        ScanReply::Clean
    );
}

#[tokio::test]
async fn scans_by_descriptor_give_the_verdicts_of_instream() {
    let clamd = Clamd::start();
    corpus_verdicts(&client(&clamd)).await;
    let local = descriptor_only_client(&clamd);
    assert!(local.passes_descriptors());
    corpus_verdicts(&local).await;
    assert!(local.passes_descriptors());
}

#[tokio::test]
async fn over_limit_by_descriptor_is_unscannable_not_clean() {
    let clamd = Clamd::start_with(ClamdOptions {
        max_file_size: "1M".into(),
        ..ClamdOptions::default()
    });
    let body = clean_bytes(3 << 20, 3);
    for client in [client(&clamd), descriptor_only_client(&clamd)] {
        assert!(matches!(
            client.scan(ScanInput::Bytes(&body)).await.unwrap(),
            ScanReply::Unscannable(_)
        ));
        assert_eq!(
            client.scan(ScanInput::Bytes(b"x")).await.unwrap(),
            ScanReply::Clean
        );
    }
}

#[tokio::test]
async fn without_the_local_socket_scans_stream_over_the_main_address() {
    let clamd = Clamd::start();
    let mut config = ClamdConfig::new(clamd.address().parse().unwrap());
    config.local_socket = Some(clamd.socket_path().with_file_name("absent.sock"));
    let client = ClamdClient::new(config);
    assert!(client.passes_descriptors());
    corpus_verdicts(&client).await;
    assert!(!client.passes_descriptors());
}
