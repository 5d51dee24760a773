//! The harness and the model on exchanges whose outcome is known.

use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, HeadersResponse, ProcessingResponse, processing_response,
};

use super::*;

fn settings() -> Settings {
    Settings {
        max_body: 1024,
        range_requests: RangeChoice::Strip,
        priority_header: PriorityHeader::XScanPriority,
        allow_unscannable: false,
        scan_yields: 1,
    }
}

fn exchange(mode: Mode, steps: Vec<Step>) -> Exchange {
    Exchange {
        settings: settings(),
        protocol_config: Some(ProtocolConfig {
            request_body_mode: mode,
            response_body_mode: mode,
            send_body_without_waiting_for_header_response: false,
        }),
        observability_mode: false,
        steps,
    }
}

fn headers(dir: Dir, end_of_stream: bool) -> Step {
    Step::Headers {
        dir,
        end_of_stream,
        fields: vec![Field {
            name: FieldName::Path,
            value: FieldValue::Typical(1),
            raw: true,
        }],
    }
}

fn body(dir: Dir, end_of_stream: bool, bytes: &[u8]) -> Step {
    Step::Body {
        dir,
        end_of_stream,
        data: vec![Data::Bytes(bytes.to_vec())],
    }
}

fn immediate_status(run: &Run) -> Option<i32> {
    run.answers.iter().find_map(|a| match &a.response {
        Some(processing_response::Response::ImmediateResponse(i)) => {
            i.status.as_ref().map(|s| s.code)
        }
        _ => None,
    })
}

fn delivered_ok(x: &Exchange) -> ([Vec<u8>; 2], Run) {
    let run = run(x);
    check(x, &run, EnvoyConfig::Documented).expect("no marker delivered");
    let d = delivered(x, &run, EnvoyConfig::Documented).expect("not observability mode");
    (d, run)
}

#[test]
fn infected_buffered_request_body_is_answered_406() {
    let x = exchange(
        Mode::Buffered,
        vec![
            headers(Dir::Request, false),
            body(Dir::Request, true, b"abc EVIL def"),
        ],
    );
    let (d, run) = delivered_ok(&x);
    assert_eq!(immediate_status(&run), Some(406));
    assert_eq!(run.end, End::Ok);
    assert!(d[0].is_empty());
}

#[test]
fn clean_buffered_bodies_pass_both_ways() {
    let x = exchange(
        Mode::Buffered,
        vec![
            headers(Dir::Request, false),
            body(Dir::Request, true, b"question"),
            headers(Dir::Response, false),
            body(Dir::Response, true, b"answer"),
        ],
    );
    let (d, run) = delivered_ok(&x);
    assert_eq!(run.end, End::Ok);
    assert_eq!(d, [b"question".to_vec(), b"answer".to_vec()]);
}

#[test]
fn clean_full_duplex_response_is_released_whole() {
    let x = exchange(
        Mode::FullDuplexStreamed,
        vec![
            headers(Dir::Request, true),
            headers(Dir::Response, false),
            body(Dir::Response, false, b"hello "),
            body(Dir::Response, true, b"world"),
        ],
    );
    let (d, run) = delivered_ok(&x);
    assert_eq!(run.end, End::Ok);
    assert_eq!(d, [Vec::new(), b"hello world".to_vec()]);
}

#[test]
fn marker_split_across_full_duplex_chunks_is_answered_406() {
    let x = exchange(
        Mode::FullDuplexStreamed,
        vec![
            headers(Dir::Response, false),
            Step::Body {
                dir: Dir::Response,
                end_of_stream: false,
                data: vec![
                    Data::Filler {
                        byte: b'a',
                        len: 100,
                    },
                    Data::MarkerHead(1),
                ],
            },
            Step::Body {
                dir: Dir::Response,
                end_of_stream: false,
                data: vec![Data::MarkerTail(1)],
            },
            Step::Trailers { dir: Dir::Response },
        ],
    );
    let (d, run) = delivered_ok(&x);
    assert_eq!(immediate_status(&run), Some(406));
    assert!(d[1].is_empty());
}

#[test]
fn full_duplex_body_cut_short_ends_with_an_error_status() {
    let x = exchange(
        Mode::FullDuplexStreamed,
        vec![
            headers(Dir::Request, false),
            body(Dir::Request, false, b"EVIL"),
        ],
    );
    let (d, run) = delivered_ok(&x);
    assert!(matches!(run.end, End::Status(_)));
    assert!(d[0].is_empty());
}

#[test]
fn body_over_the_message_limit_is_answered_413() {
    let x = exchange(
        Mode::Buffered,
        vec![
            headers(Dir::Request, false),
            Step::Failed {
                code: FailCode::OutOfRange,
                lost: Lost::Body {
                    dir: Dir::Request,
                    end_of_stream: true,
                    data: vec![Data::Marker],
                },
            },
            body(Dir::Request, true, b"EVIL"),
        ],
    );
    let (_, run) = delivered_ok(&x);
    assert_eq!(immediate_status(&run), Some(413));
}

#[test]
fn range_request_refused_with_416() {
    let mut x = exchange(
        Mode::Buffered,
        vec![Step::Headers {
            dir: Dir::Request,
            end_of_stream: true,
            fields: vec![Field {
                name: FieldName::Range,
                value: FieldValue::Typical(0),
                raw: false,
            }],
        }],
    );
    x.settings.range_requests = RangeChoice::Refuse;
    let (_, run) = delivered_ok(&x);
    assert_eq!(immediate_status(&run), Some(416));
}

fn answer(response: processing_response::Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(response),
        ..Default::default()
    }
}

fn infected_buffered_request() -> Exchange {
    exchange(
        Mode::Buffered,
        vec![
            headers(Dir::Request, false),
            body(Dir::Request, true, b"EVIL"),
        ],
    )
}

#[test]
fn model_flags_a_continue_for_an_infected_body() {
    use processing_response::Response as P;
    let x = infected_buffered_request();
    let run = Run {
        answers: vec![
            answer(P::RequestHeaders(HeadersResponse::default())),
            answer(P::RequestBody(BodyResponse::default())),
        ],
        end: End::Ok,
    };
    assert!(check(&x, &run, EnvoyConfig::Documented).is_err());
}

#[test]
fn model_flags_an_ok_end_while_envoy_holds_an_infected_body() {
    use processing_response::Response as P;
    let x = infected_buffered_request();
    let mut run = Run {
        answers: vec![answer(P::RequestHeaders(HeadersResponse::default()))],
        end: End::Ok,
    };
    assert!(check(&x, &run, EnvoyConfig::Documented).is_err());
    run.end = End::Status(Code::Aborted);
    assert!(check(&x, &run, EnvoyConfig::Documented).is_ok());
}

#[test]
fn model_flags_an_ok_end_after_a_lost_body_envoy_goes_on_with() {
    let x = exchange(
        Mode::Buffered,
        vec![
            headers(Dir::Request, false),
            Step::Failed {
                code: FailCode::OutOfRange,
                lost: Lost::Body {
                    dir: Dir::Request,
                    end_of_stream: true,
                    data: vec![Data::Marker],
                },
            },
        ],
    );
    let run = Run {
        answers: Vec::new(),
        end: End::Ok,
    };
    assert!(check(&x, &run, EnvoyConfig::Documented).is_err());
    // A reset stream is Envoy's to answer.
    let mut reset = x.clone();
    reset.steps[1] = Step::Failed {
        code: FailCode::Cancelled,
        lost: Lost::Trailers { dir: Dir::Request },
    };
    reset.steps.push(body(Dir::Request, true, b"EVIL"));
    assert!(check(&reset, &run, EnvoyConfig::Documented).is_ok());
}

#[test]
fn model_ignores_bodies_envoy_cannot_send() {
    let x = exchange(
        Mode::Buffered,
        vec![
            headers(Dir::Request, true),
            body(Dir::Request, true, b"EVIL"),
        ],
    );
    let run = Run {
        answers: Vec::new(),
        end: End::Ok,
    };
    assert!(check(&x, &run, EnvoyConfig::Documented).is_ok());
    // With header mode SKIP, a body needs no headers before it.
    let skip = exchange(Mode::Buffered, vec![body(Dir::Request, true, b"EVIL")]);
    assert!(check(&skip, &run, EnvoyConfig::Documented).is_ok());
    assert!(check(&skip, &run, EnvoyConfig::Wide).is_err());
}
