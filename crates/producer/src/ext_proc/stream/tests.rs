//! One ext_proc stream against a scanner that needs no Redis: what Envoy is answered when a
//! body message is not the body its headers declared.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, ProtocolConfiguration,
    processing_request::Request as R, processing_response::Response as A,
};
use tokio_stream::StreamExt;
use tonic::Status;

use super::BodySendMode;
use crate::config::RangeRequests;
use crate::ext_proc::ExtProcService;
use crate::scan::fake::FakeScan;

fn headers(fields: &[(&str, &str)], end_of_stream: bool) -> HttpHeaders {
    HttpHeaders {
        headers: Some(HeaderMap {
            headers: fields
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: (*k).into(),
                    raw_value: v.as_bytes().to_vec(),
                    ..Default::default()
                })
                .collect(),
        }),
        end_of_stream,
        ..Default::default()
    }
}

fn body(bytes: &[u8], end_of_stream: bool) -> HttpBody {
    HttpBody {
        body: bytes.to_vec(),
        end_of_stream,
        ..Default::default()
    }
}

/// A GET's headers, first message of a stream in which Envoy says its body modes.
fn get(request_mode: BodySendMode, response_mode: BodySendMode) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(R::RequestHeaders(headers(
            &[(":method", "GET"), (":path", "/files/x")],
            true,
        ))),
        protocol_config: Some(ProtocolConfiguration {
            request_body_mode: request_mode as i32,
            response_body_mode: response_mode as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Every answer of a stream of these messages, its ending status included.
async fn answers_to(messages: Vec<ProcessingRequest>) -> Vec<Result<ProcessingResponse, Status>> {
    let scan = Arc::new(FakeScan::new(RangeRequests::Strip, 1 << 20));
    ExtProcService::new(scan)
        .process_messages(tokio_stream::iter(messages.into_iter().map(Ok)))
        .collect()
        .await
}

/// A download: the GET's headers, then the response's headers and body, in `mode`.
async fn download(
    mode: BodySendMode,
    response_fields: &[(&str, &str)],
    bodies: Vec<HttpBody>,
) -> (Vec<ProcessingResponse>, Option<Status>, Vec<Vec<u8>>) {
    let scan = Arc::new(FakeScan::new(RangeRequests::Strip, 1 << 20));
    let mut messages = vec![get(mode, mode)];
    messages.push(ProcessingRequest {
        request: Some(R::ResponseHeaders(headers(response_fields, false))),
        ..Default::default()
    });
    for b in bodies {
        messages.push(ProcessingRequest {
            request: Some(R::ResponseBody(b)),
            ..Default::default()
        });
    }
    let inbound = tokio_stream::iter(messages.into_iter().map(Ok));
    let mut answers = ExtProcService::new(scan.clone()).process_messages(inbound);
    let (mut ok, mut failed) = (Vec::new(), None);
    while let Some(a) = answers.next().await {
        match a {
            Ok(a) => ok.push(a),
            Err(s) => failed = Some(s),
        }
    }
    let scanned = scan
        .scanned
        .lock()
        .unwrap()
        .iter()
        .map(|(b, _)| b.clone())
        .collect();
    (ok, failed, scanned)
}

fn lets_response_body_through(answers: &[ProcessingResponse]) -> bool {
    answers.iter().any(|a| {
        matches!(a.response, Some(A::ResponseBody(_)))
            || matches!(&a.response, Some(A::ResponseHeaders(h))
                if h.response.as_ref().and_then(|c| c.body_mutation.as_ref()).is_some())
    })
}

#[tokio::test]
async fn a_buffered_body_shorter_or_longer_than_its_content_length_is_refused_not_continued() {
    let whole = b"0123456789";
    // The body as declared: scanned and let through.
    let (answers, failed, scanned) = download(
        BodySendMode::Buffered,
        &[(":status", "200"), ("content-length", "10")],
        vec![body(whole, true)],
    )
    .await;
    assert!(failed.is_none(), "{failed:?}");
    assert!(lets_response_body_through(&answers));
    assert_eq!(scanned, vec![whole.to_vec()]);

    // Part of it (or nothing) under a Content-Length of 10: a verdict on it would let
    // Envoy pass its own, whole copy. The stream fails with an error status, unscanned.
    for short in [&whole[..0], &whole[..4], &b"0123456789ab"[..]] {
        let (answers, failed, scanned) = download(
            BodySendMode::Buffered,
            &[(":status", "200"), ("content-length", "10")],
            vec![body(short, true)],
        )
        .await;
        let failed = failed.expect("an error status ends the stream");
        assert_eq!(failed.code(), tonic::Code::DataLoss, "{failed:?}");
        assert!(
            !lets_response_body_through(&answers),
            "{} bytes",
            short.len()
        );
        assert!(scanned.is_empty(), "{} bytes were scanned", short.len());
    }

    // Without a Content-Length (chunked) there is nothing to compare.
    let (_, failed, _) = download(
        BodySendMode::Buffered,
        &[(":status", "200")],
        vec![body(&whole[..4], true)],
    )
    .await;
    assert!(failed.is_none(), "{failed:?}");
}

#[tokio::test]
async fn a_full_duplex_body_that_ends_short_of_its_content_length_is_refused() {
    let (answers, failed, scanned) = download(
        BodySendMode::FullDuplexStreamed,
        &[(":status", "200"), ("content-length", "10")],
        vec![body(b"0123", false), body(b"45", true)],
    )
    .await;
    assert_eq!(failed.map(|s| s.code()), Some(tonic::Code::DataLoss));
    assert!(
        answers
            .iter()
            .all(|a| !matches!(a.response, Some(A::ResponseBody(_))))
    );
    assert!(scanned.is_empty());

    let (answers, failed, _) = download(
        BodySendMode::FullDuplexStreamed,
        &[(":status", "200"), ("content-length", "6")],
        vec![body(b"0123", false), body(b"45", true)],
    )
    .await;
    assert!(failed.is_none(), "{failed:?}");
    assert!(
        answers
            .iter()
            .any(|a| matches!(a.response, Some(A::ResponseBody(_))))
    );
}

#[tokio::test]
async fn a_stream_that_ends_before_the_response_came_ends_with_an_error_not_ok() {
    // Envoy said it sends response bodies; the GET's headers were answered, then the stream
    // ended: an OK end would tell Envoy that the response needs no processing.
    for mode in [BodySendMode::Buffered, BodySendMode::FullDuplexStreamed] {
        let answers = answers_to(vec![get(mode, mode)]).await;
        assert!(
            answers[0].is_ok(),
            "{mode:?}: the request headers are answered"
        );
        let end = answers.last().unwrap().as_ref().unwrap_err();
        assert_eq!(end.code(), tonic::Code::Aborted, "{mode:?}");
    }

    // Response bodies not sent (uploads only): nothing is left to process, the end is OK.
    let answers = answers_to(vec![get(BodySendMode::Buffered, BodySendMode::None)]).await;
    assert!(answers.iter().all(|a| a.is_ok()), "{answers:?}");

    // A whole exchange, response included, ends OK.
    let (answers, failed, _) = download(
        BodySendMode::Buffered,
        &[(":status", "200"), ("content-length", "2")],
        vec![body(b"ok", true)],
    )
    .await;
    assert!(failed.is_none(), "{failed:?}");
    assert!(lets_response_body_through(&answers));
}

#[tokio::test]
async fn buffered_trailers_without_the_declared_body_are_refused() {
    use envoy_types::pb::envoy::service::ext_proc::v3::HttpTrailers;
    let buffered = BodySendMode::Buffered;
    let answers = answers_to(vec![
        get(buffered, buffered),
        ProcessingRequest {
            request: Some(R::ResponseHeaders(headers(
                &[(":status", "200"), ("content-length", "10")],
                false,
            ))),
            ..Default::default()
        },
        ProcessingRequest {
            request: Some(R::ResponseTrailers(HttpTrailers::default())),
            ..Default::default()
        },
    ])
    .await;
    let end = answers.last().unwrap().as_ref().unwrap_err();
    assert_eq!(end.code(), tonic::Code::DataLoss, "{answers:?}");
    assert!(!answers.iter().any(|a| matches!(
        a.as_ref().map(|a| &a.response),
        Ok(Some(A::ResponseTrailers(_)))
    )));
}
