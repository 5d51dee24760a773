//! The messages the processor sends back to Envoy.

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
    ProcessingResponse, StreamedBodyResponse, TrailersResponse, body_mutation, processing_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use virus_scanner_protocol::task::VerdictStatus;

use super::HttpDirection;
use crate::scan::Outcome;

/// Request headers that ask for part of a representation (RFC 9110 14.2, 13.1.5).
pub const RANGE_HEADERS: [&str; 2] = ["range", "if-range"];

/// The answer to a headers message: go on, with the headers named in `remove` taken out.
pub fn headers_continue(d: HttpDirection, remove: &[&str]) -> ProcessingResponse {
    use processing_response::Response as P;
    let header_mutation = (!remove.is_empty()).then(|| HeaderMutation {
        remove_headers: remove.iter().map(|h| (*h).to_owned()).collect(),
        ..Default::default()
    });
    let r = HeadersResponse {
        response: Some(CommonResponse {
            header_mutation,
            ..Default::default()
        }),
    };
    ProcessingResponse {
        response: Some(match d {
            HttpDirection::Request => P::RequestHeaders(r),
            HttpDirection::Response => P::ResponseHeaders(r),
        }),
        ..Default::default()
    }
}

fn body_response(d: HttpDirection, common: CommonResponse) -> ProcessingResponse {
    use processing_response::Response as P;
    let r = BodyResponse {
        response: Some(common),
    };
    ProcessingResponse {
        response: Some(match d {
            HttpDirection::Request => P::RequestBody(r),
            HttpDirection::Response => P::ResponseBody(r),
        }),
        ..Default::default()
    }
}

pub fn body_continue(d: HttpDirection) -> ProcessingResponse {
    body_response(d, CommonResponse::default())
}

pub fn streamed_body(d: HttpDirection, chunk: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
    body_response(
        d,
        CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::StreamedResponse(
                    StreamedBodyResponse {
                        body: chunk,
                        end_of_stream,
                        ..Default::default()
                    },
                )),
            }),
            ..Default::default()
        },
    )
}

pub fn trailers_continue(d: HttpDirection) -> ProcessingResponse {
    use processing_response::Response as P;
    let r = TrailersResponse::default();
    ProcessingResponse {
        response: Some(match d {
            HttpDirection::Request => P::RequestTrailers(r),
            HttpDirection::Response => P::ResponseTrailers(r),
        }),
        ..Default::default()
    }
}

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            raw_value: value.as_bytes().to_vec(),
            ..Default::default()
        }),
        // OVERWRITE_IF_EXISTS_OR_ADD
        append_action: 2,
        ..Default::default()
    }
}

fn immediate(
    status: u16,
    headers: Vec<HeaderValueOption>,
    body: serde_json::Value,
    details: String,
) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(processing_response::Response::ImmediateResponse(
            ImmediateResponse {
                status: Some(HttpStatus {
                    code: i32::from(status),
                }),
                headers: Some(HeaderMutation {
                    set_headers: headers,
                    ..Default::default()
                }),
                body: format!("{body}\n").into_bytes(),
                details,
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// The answer that replaces a blocked body.
pub fn block(d: HttpDirection, outcome: &Outcome, status: u16) -> ProcessingResponse {
    let v = &outcome.verdict;
    let mut headers = vec![header("content-type", "application/json")];
    let body = match v.status() {
        VerdictStatus::Infected => {
            headers.push(header("x-virus-infected", "true"));
            headers.push(header("x-virus-name", &v.signature));
            serde_json::json!({
                "error": "virus_detected",
                "verdict": "infected",
                "virus": v.signature,
                "direction": d.label(),
                "task_id": outcome.task_id,
                "sha256": outcome.sha256_hex(),
            })
        }
        VerdictStatus::Unscannable => {
            headers.push(header("x-virus-scan", "unscannable"));
            serde_json::json!({
                "error": "not_scannable",
                "verdict": "unscannable",
                "detail": v.detail,
                "direction": d.label(),
                "task_id": outcome.task_id,
            })
        }
        _ => {
            headers.push(header("x-virus-scan", "error"));
            serde_json::json!({
                "error": "scan_failed",
                "verdict": "error",
                "detail": v.detail,
                "direction": d.label(),
                "task_id": outcome.task_id,
            })
        }
    };
    immediate(
        status,
        headers,
        body,
        format!("virus_scanner_{}", v.status().label()),
    )
}

/// The answer to a request for part of a representation where the policy refuses them.
pub fn range_refused() -> ProcessingResponse {
    immediate(
        416,
        vec![
            header("content-type", "application/json"),
            header("x-virus-scan", "range-refused"),
        ],
        serde_json::json!({
            "error": "range_not_scannable",
            "detail": "parts of a file cannot be scanned; request the whole file",
        }),
        "virus_scanner_range_refused".into(),
    )
}
