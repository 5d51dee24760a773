//! The producer's ext_proc state machine under any sequence of messages, against a model of
//! what Envoy delivers from its answers.
//!
//! A fake scanner (no Redis) finds a body infected when its bytes hold [`MARKER`]. Each input
//! is one ext_proc stream: the messages Envoy sends for one HTTP exchange, in any order and
//! shape, with inbound errors where tonic could not read a message. The answers are
//! collected until the answer stream ends, and [`check`] replays them through the model:
//!
//! * BUFFERED (and the modes the producer refuses): a body message is held by Envoy until
//!   its answer; a continue releases its bytes.
//! * FULL_DUPLEX_STREAMED: the body reaches the other side only as the bytes of
//!   `streamed_response` mutations.
//! * An ImmediateResponse or an error status ends the exchange: nothing more is delivered.
//! * An OK end lets through every body message that had no answer yet, and, since Envoy
//!   then goes on without the processor, every body it sends after.
//!
//! The model holds the processor only to sequences Envoy can send: one headers message per
//! direction before its body and trailers, no body after an end of stream, one body
//! message in BUFFERED mode, none in mode NONE. From the first message Envoy could not have
//! sent, later messages are no longer let through at an OK end (the processor's explicit
//! answers still count). An inbound error stands for a message over the gRPC limit
//! (`OutOfRange`, `ResourceExhausted`: Envoy sent a message the processor never saw, and
//! waits for the answer) or for a reset stream (any other code: Envoy is gone and decides
//! alone, 500 or nothing). By default Envoy is configured as the README says (header modes
//! SEND, and headers far below the message limit, so only a body can be too large);
//! `EXT_PROC_FUZZ_ENVOY=wide` also allows header modes SKIP and oversized headers or
//! trailers.
#![forbid(unsafe_code)]

use std::future::Future;
use std::io::Read;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest,
    ProcessingResponse, ProtocolConfiguration, body_mutation, processing_request,
    processing_response,
};
use tokio_stream::StreamExt;
use tonic::{Code, Status};
use virus_scanner_producer::body::{Body, BodyLimits};
use virus_scanner_producer::config::RangeRequests;
use virus_scanner_producer::ext_proc::{BodyScan, ExtProcService};
use virus_scanner_producer::scan::{Decision, Outcome, ScanContext};
use virus_scanner_producer::unpack::BodyHeaders;
use virus_scanner_protocol::task::{Priority, Verdict, VerdictStatus};

/// The bytes the fake scanner calls infected.
pub const MARKER: &[u8] = b"EVIL";
/// Messages of one stream taken from an input.
pub const MAX_MESSAGES: usize = 64;
/// Below the size from which the producer hashes a body in `block_in_place`, which a
/// current-thread runtime does not allow.
const MAX_MESSAGE_BYTES: usize = 128 * 1024;

/// One ext_proc stream as the fuzzer makes it.
#[derive(Arbitrary, Debug, Clone)]
pub struct Exchange {
    pub settings: Settings,
    /// Sent with the first message.
    pub protocol_config: Option<ProtocolConfig>,
    pub observability_mode: bool,
    pub steps: Vec<Step>,
}

/// The scanner's configuration.
#[derive(Arbitrary, Debug, Clone)]
pub struct Settings {
    /// The body limit is 16 bytes plus this modulo 4096.
    pub max_body: u16,
    pub range_requests: RangeChoice,
    pub priority_header: PriorityHeader,
    pub allow_unscannable: bool,
    /// How often the fake scan yields to the runtime (modulo 4).
    pub scan_yields: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum RangeChoice {
    Strip,
    Refuse,
    Allow,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum PriorityHeader {
    XScanPriority,
    /// A name that is also a field the scan reads.
    ContentType,
    Path,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct ProtocolConfig {
    pub request_body_mode: Mode,
    pub response_body_mode: Mode,
    pub send_body_without_waiting_for_header_response: bool,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Mode {
    None,
    Streamed,
    Buffered,
    BufferedPartial,
    FullDuplexStreamed,
    Grpc,
    Raw(i32),
}

impl Mode {
    fn raw(self) -> i32 {
        match self {
            Mode::None => BodySendMode::None as i32,
            Mode::Streamed => BodySendMode::Streamed as i32,
            Mode::Buffered => BodySendMode::Buffered as i32,
            Mode::BufferedPartial => BodySendMode::BufferedPartial as i32,
            Mode::FullDuplexStreamed => BodySendMode::FullDuplexStreamed as i32,
            Mode::Grpc => BodySendMode::Grpc as i32,
            Mode::Raw(r) => r,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Request,
    Response,
}

impl Dir {
    fn index(self) -> usize {
        match self {
            Dir::Request => 0,
            Dir::Response => 1,
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Step {
    Headers {
        dir: Dir,
        end_of_stream: bool,
        fields: Vec<Field>,
    },
    Body {
        dir: Dir,
        end_of_stream: bool,
        data: Vec<Data>,
    },
    Trailers {
        dir: Dir,
    },
    /// A `ProcessingRequest` without a message.
    Empty,
    /// tonic could not read a message.
    Failed {
        code: FailCode,
        lost: Lost,
    },
}

/// What the message was that could not be read (for the model; the processor sees only the
/// status).
#[derive(Arbitrary, Debug, Clone)]
pub enum Lost {
    Body {
        dir: Dir,
        end_of_stream: bool,
        data: Vec<Data>,
    },
    Headers {
        dir: Dir,
        end_of_stream: bool,
    },
    Trailers {
        dir: Dir,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum FailCode {
    OutOfRange,
    ResourceExhausted,
    Cancelled,
    Unknown,
    Internal,
    Unavailable,
    DeadlineExceeded,
    Aborted,
    InvalidArgument,
    DataLoss,
}

impl FailCode {
    fn code(self) -> Code {
        match self {
            FailCode::OutOfRange => Code::OutOfRange,
            FailCode::ResourceExhausted => Code::ResourceExhausted,
            FailCode::Cancelled => Code::Cancelled,
            FailCode::Unknown => Code::Unknown,
            FailCode::Internal => Code::Internal,
            FailCode::Unavailable => Code::Unavailable,
            FailCode::DeadlineExceeded => Code::DeadlineExceeded,
            FailCode::Aborted => Code::Aborted,
            FailCode::InvalidArgument => Code::InvalidArgument,
            FailCode::DataLoss => Code::DataLoss,
        }
    }

    /// The codes tonic gives a message over the limit: Envoy sent it and is still there.
    fn message_lost(self) -> bool {
        matches!(self, FailCode::OutOfRange | FailCode::ResourceExhausted)
    }
}

/// A piece of a body.
#[derive(Arbitrary, Debug, Clone)]
pub enum Data {
    Bytes(Vec<u8>),
    Marker,
    /// The first 1 to 3 bytes of the marker.
    MarkerHead(u8),
    /// The last 1 to 3 bytes of the marker.
    MarkerTail(u8),
    /// `len` modulo twice the body limit (plus a little) copies of `byte`.
    Filler {
        byte: u8,
        len: u16,
    },
}

#[derive(Arbitrary, Debug, Clone)]
pub struct Field {
    pub name: FieldName,
    pub value: FieldValue,
    /// Sent as `raw_value` (what Envoy sends) rather than `value`.
    pub raw: bool,
}

#[derive(Arbitrary, Debug, Clone)]
pub enum FieldName {
    Path,
    Status,
    ContentRange,
    Range,
    IfRange,
    Priority,
    ContentType,
    ContentEncoding,
    ForwardedFor,
    ExternalAddress,
    RequestId,
    Other(String),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum FieldValue {
    /// One of the values typical of the field.
    Typical(u8),
    Other(String),
}

impl Field {
    fn header(&self, priority_header: &str) -> HeaderValue {
        let (key, typical): (&str, &[&str]) = match &self.name {
            FieldName::Path => (":path", &["/", "/upload?id=1", "/safe/x", "", "/a?"]),
            FieldName::Status => (":status", &["200", "206", "416", "500", "20x"]),
            FieldName::ContentRange => (
                "content-range",
                &[
                    "bytes 0-99/100",
                    "bytes 0-3/8",
                    "bytes */100",
                    "bytes 0-9/*",
                    "bytes 4-7/8",
                    "lines 0-1/2",
                ],
            ),
            FieldName::Range => ("range", &["bytes=0-3", "bytes=4-", "bytes=0-0,2-3"]),
            FieldName::IfRange => ("if-range", &["\"etag\""]),
            FieldName::Priority => (priority_header, &["high", "HIGH", "low", "", "1"]),
            FieldName::ContentType => (
                "content-type",
                &[
                    "application/octet-stream",
                    "text/plain",
                    "multipart/form-data; boundary=b",
                    "multipart/byteranges; boundary=r",
                    "application/json",
                ],
            ),
            FieldName::ContentEncoding => (
                "content-encoding",
                &[
                    "gzip",
                    "identity",
                    "br",
                    "zstd",
                    "x-unknown",
                    "gzip, identity",
                ],
            ),
            FieldName::ForwardedFor => (
                "x-forwarded-for",
                &["203.0.113.7, 10.0.0.1", "", " , ", "2001:db8::1"],
            ),
            FieldName::ExternalAddress => ("x-envoy-external-address", &["198.51.100.2", ""]),
            FieldName::RequestId => ("x-request-id", &["4c1a", ""]),
            FieldName::Other(name) => (name.as_str(), &["x"]),
        };
        let value = match &self.value {
            FieldValue::Typical(i) => typical[usize::from(*i) % typical.len()].to_owned(),
            FieldValue::Other(v) => v.clone(),
        };
        let mut h = HeaderValue {
            key: key.to_owned(),
            ..Default::default()
        };
        if self.raw {
            h.raw_value = value.into_bytes();
        } else {
            h.value = value;
        }
        h
    }
}

fn body_bytes(data: &[Data], limit: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for d in data {
        match d {
            Data::Bytes(b) => out.extend_from_slice(b),
            Data::Marker => out.extend_from_slice(MARKER),
            Data::MarkerHead(n) => out.extend_from_slice(&MARKER[..1 + usize::from(*n) % 3]),
            Data::MarkerTail(n) => out.extend_from_slice(&MARKER[3 - usize::from(*n) % 3..]),
            Data::Filler { byte, len } => {
                let len = usize::from(*len) % (2 * limit as usize + 64);
                out.resize(out.len() + len, *byte);
            }
        }
        if out.len() >= MAX_MESSAGE_BYTES {
            out.truncate(MAX_MESSAGE_BYTES);
            break;
        }
    }
    out
}

pub fn contains_marker(bytes: &[u8]) -> bool {
    bytes.windows(MARKER.len()).any(|w| w == MARKER)
}

/// A scanner without Redis: infected iff the body holds [`MARKER`].
pub struct MarkerScanner {
    limits: BodyLimits,
    priority_header: &'static str,
    range_requests: RangeRequests,
    allow_unscannable: bool,
    yields: u8,
}

static SPILL_DIR: LazyLock<tempfile::TempDir> = LazyLock::new(|| {
    tempfile::Builder::new()
        .prefix("ext-proc-fuzz-")
        .tempdir()
        .expect("a temporary directory")
});

impl MarkerScanner {
    pub fn new(s: &Settings) -> MarkerScanner {
        MarkerScanner {
            limits: BodyLimits {
                spill_dir: SPILL_DIR.path().to_path_buf(),
                // Nothing is written to disk: the fuzzer stays fast.
                spill_threshold: 1 << 30,
                max: 16 + u64::from(s.max_body % 4096),
            },
            priority_header: match s.priority_header {
                PriorityHeader::XScanPriority => "x-scan-priority",
                PriorityHeader::ContentType => "content-type",
                PriorityHeader::Path => ":path",
            },
            range_requests: match s.range_requests {
                RangeChoice::Strip => RangeRequests::Strip,
                RangeChoice::Refuse => RangeRequests::Refuse,
                RangeChoice::Allow => RangeRequests::Allow,
            },
            allow_unscannable: s.allow_unscannable,
            yields: s.scan_yields % 4,
        }
    }
}

fn verdict(status: VerdictStatus, signature: &str, detail: &str) -> Verdict {
    Verdict {
        task_id: "fuzz".into(),
        status: status as i32,
        signature: signature.into(),
        detail: detail.into(),
        ..Verdict::default()
    }
}

impl BodyScan for MarkerScanner {
    fn limits(&self) -> &BodyLimits {
        &self.limits
    }

    fn priority_header(&self) -> &str {
        self.priority_header
    }

    fn priority(&self, header_value: Option<&str>) -> Priority {
        match header_value {
            Some(v) if v.trim().eq_ignore_ascii_case("high") => Priority::High,
            _ => Priority::Normal,
        }
    }

    fn range_requests(&self) -> RangeRequests {
        self.range_requests
    }

    fn scan(
        &self,
        body: &Body,
        _headers: &BodyHeaders,
        _ctx: &ScanContext,
    ) -> impl Future<Output = Outcome> + Send {
        let mut bytes = Vec::new();
        let read = body.reader().and_then(|mut r| r.read_to_end(&mut bytes));
        let (verdict, decision) = match read {
            Err(e) => (
                verdict(VerdictStatus::Error, "", &e.to_string()),
                Decision::Block { status: 503 },
            ),
            Ok(_) if contains_marker(&bytes) => (
                verdict(VerdictStatus::Infected, "Fuzz.Marker", ""),
                Decision::Block { status: 406 },
            ),
            Ok(_) => (verdict(VerdictStatus::Clean, "", ""), Decision::Allow),
        };
        let outcome = Outcome {
            verdict,
            decision,
            sha256: Some(body.sha256),
            task_id: "fuzz".into(),
        };
        let yields = self.yields;
        async move {
            for _ in 0..yields {
                tokio::task::yield_now().await;
            }
            outcome
        }
    }

    fn refuse_unscanned(&self, why: String, _ctx: &ScanContext) -> Outcome {
        Outcome {
            verdict: verdict(VerdictStatus::Unscannable, "", &why),
            decision: if self.allow_unscannable {
                Decision::Allow
            } else {
                Decision::Block { status: 413 }
            },
            sha256: None,
            task_id: String::new(),
        }
    }

    fn scan_failed(&self, why: String, _ctx: &ScanContext) -> Outcome {
        Outcome {
            verdict: verdict(VerdictStatus::Error, "", &why),
            decision: Decision::Block { status: 503 },
            sha256: None,
            task_id: String::new(),
        }
    }

    fn front_end_error(&self, _kind: &'static str) {}

    fn count_icap(&self, _method: &'static str, _verdict: &'static str) {}

    fn signature_version(&self) -> impl Future<Output = Option<String>> + Send {
        std::future::ready(None)
    }
}

/// The inbound items of an exchange, as `process_messages` reads them.
pub fn inbound(x: &Exchange) -> Vec<Result<ProcessingRequest, Status>> {
    use processing_request::Request as R;
    let limit = 16 + u64::from(x.settings.max_body % 4096);
    let priority_header = MarkerScanner::new(&x.settings).priority_header;
    let mut items = Vec::new();
    for step in x.steps.iter().take(MAX_MESSAGES) {
        let request = match step {
            Step::Headers {
                dir,
                end_of_stream,
                fields,
            } => {
                let h = HttpHeaders {
                    headers: Some(HeaderMap {
                        headers: fields.iter().map(|f| f.header(priority_header)).collect(),
                    }),
                    end_of_stream: *end_of_stream,
                    ..Default::default()
                };
                Some(match dir {
                    Dir::Request => R::RequestHeaders(h),
                    Dir::Response => R::ResponseHeaders(h),
                })
            }
            Step::Body {
                dir,
                end_of_stream,
                data,
            } => {
                let b = HttpBody {
                    body: body_bytes(data, limit),
                    end_of_stream: *end_of_stream,
                    ..Default::default()
                };
                Some(match dir {
                    Dir::Request => R::RequestBody(b),
                    Dir::Response => R::ResponseBody(b),
                })
            }
            Step::Trailers { dir } => {
                let t = HttpTrailers {
                    trailers: Some(HeaderMap::default()),
                };
                Some(match dir {
                    Dir::Request => R::RequestTrailers(t),
                    Dir::Response => R::ResponseTrailers(t),
                })
            }
            Step::Empty => None,
            Step::Failed { code, .. } => {
                items.push(Err(Status::new(code.code(), "fuzz: message not read")));
                continue;
            }
        };
        let mut message = ProcessingRequest {
            request,
            ..Default::default()
        };
        if items.is_empty() {
            message.protocol_config = x.protocol_config.map(|pc| ProtocolConfiguration {
                request_body_mode: pc.request_body_mode.raw(),
                response_body_mode: pc.response_body_mode.raw(),
                send_body_without_waiting_for_header_response: pc
                    .send_body_without_waiting_for_header_response,
            });
            message.observability_mode = x.observability_mode;
        }
        items.push(Ok(message));
    }
    items
}

/// How the answer stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Ok,
    Status(Code),
    /// Every task waited and no answer or end came.
    Hung,
}

#[derive(Debug)]
pub struct Run {
    pub answers: Vec<ProcessingResponse>,
    pub end: End,
}

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime")
});

/// Runs one stream through the producer's state machine and collects its answers.
pub fn run(x: &Exchange) -> Run {
    let service = ExtProcService::new(Arc::new(MarkerScanner::new(&x.settings)));
    let items = inbound(x);
    RUNTIME.block_on(async move {
        let mut answers = service.process_messages(tokio_stream::iter(items));
        let mut collected = Vec::new();
        let collect = async {
            loop {
                match answers.next().await {
                    Some(Ok(a)) => collected.push(a),
                    Some(Err(status)) => {
                        // Nothing may follow the status that ends the stream.
                        assert!(
                            answers.next().await.is_none(),
                            "an item after the error status"
                        );
                        return End::Status(status.code());
                    }
                    None => return End::Ok,
                }
            }
        };
        // The clock is paused and moves only when every task waits: this fires only for a
        // stream that would never end.
        let end = tokio::time::timeout(Duration::from_secs(24 * 3600), collect)
            .await
            .unwrap_or(End::Hung);
        Run {
            answers: collected,
            end,
        }
    })
}

/// Which sequences Envoy can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvoyConfig {
    /// As the README configures it: header modes SEND; only a body can exceed the gRPC
    /// message limit.
    Documented,
    /// Also header modes SKIP (a body without headers), and headers or trailers over the
    /// limit.
    Wide,
}

impl EnvoyConfig {
    pub fn from_env() -> EnvoyConfig {
        match std::env::var("EXT_PROC_FUZZ_ENVOY").as_deref() {
            Ok("wide") => EnvoyConfig::Wide,
            _ => EnvoyConfig::Documented,
        }
    }
}

/// A body message Envoy sent (or would send).
#[derive(Debug)]
struct SentBody {
    bytes: Vec<u8>,
    /// Envoy could have sent it, and everything before it.
    plausible: bool,
}

/// What Envoy has sent of one direction so far, to judge what it can send next.
#[derive(Default)]
struct Sent {
    headers: Option<bool>,
    body_messages: usize,
    body_ended: bool,
    trailers: bool,
}

/// The exchange as Envoy sent it, per direction.
struct Trace {
    modes: [Option<BodySendMode>; 2],
    /// Observability mode: Envoy does not wait for the processor, nothing to judge.
    observed_only: bool,
    bodies: [Vec<SentBody>; 2],
    /// The stream was reset: an OK end lets nothing through.
    reset: bool,
}

fn trace(x: &Exchange, envoy: EnvoyConfig) -> Trace {
    let limit = 16 + u64::from(x.settings.max_body % 4096);
    let modes = match x.protocol_config {
        Some(pc) => [
            BodySendMode::try_from(pc.request_body_mode.raw()).ok(),
            BodySendMode::try_from(pc.response_body_mode.raw()).ok(),
        ],
        // What the producer assumes when Envoy does not say.
        None => [Some(BodySendMode::Buffered); 2],
    };
    let wide = envoy == EnvoyConfig::Wide;
    let mut state = [Sent::default(), Sent::default()];
    let mut bodies: [Vec<SentBody>; 2] = [Vec::new(), Vec::new()];
    let mut plausible = true;
    let headers_open = |s: &Sent| s.headers == Some(false) || (wide && s.headers.is_none());
    let mut reset = false;
    for step in x.steps.iter().take(MAX_MESSAGES) {
        if let Step::Failed { code, .. } = step
            && !code.message_lost()
        {
            // Envoy reset the stream and decides alone from here (500, or nothing when the
            // client went away), whatever the processor answers.
            reset = true;
            break;
        }
        let (dir, body, ok) = match step {
            Step::Headers {
                dir, end_of_stream, ..
            }
            | Step::Failed {
                lost: Lost::Headers { dir, end_of_stream },
                ..
            } => {
                let lost = matches!(step, Step::Failed { .. });
                let s = &mut state[dir.index()];
                let ok =
                    s.headers.is_none() && s.body_messages == 0 && !s.trailers && (!lost || wide);
                s.headers = Some(*end_of_stream);
                (*dir, None, ok)
            }
            Step::Body {
                dir,
                end_of_stream,
                data,
            }
            | Step::Failed {
                lost:
                    Lost::Body {
                        dir,
                        end_of_stream,
                        data,
                    },
                ..
            } => {
                let mode = modes[dir.index()];
                let s = &mut state[dir.index()];
                let sends_body = !matches!(mode, None | Some(BodySendMode::None));
                let one_message = mode == Some(BodySendMode::Buffered);
                let ok = sends_body
                    && headers_open(s)
                    && !s.body_ended
                    && !s.trailers
                    && !(one_message && s.body_messages > 0);
                s.body_messages += 1;
                s.body_ended |= *end_of_stream || one_message;
                (*dir, Some(body_bytes(data, limit)), ok)
            }
            Step::Trailers { dir }
            | Step::Failed {
                lost: Lost::Trailers { dir },
                ..
            } => {
                let lost = matches!(step, Step::Failed { .. });
                let s = &mut state[dir.index()];
                let ok = headers_open(s) && !s.trailers && (!lost || wide);
                s.trailers = true;
                (*dir, None, ok)
            }
            Step::Empty => {
                plausible = false;
                continue;
            }
        };
        plausible &= ok;
        if let Some(bytes) = body {
            bodies[dir.index()].push(SentBody { bytes, plausible });
        }
    }
    Trace {
        modes,
        observed_only: x.observability_mode,
        bodies,
        reset,
    }
}

/// What reached the other side of one direction.
#[derive(Default, Debug)]
struct Delivered {
    bytes: Vec<u8>,
    /// BUFFERED: body messages answered so far.
    answered: usize,
    /// FULL_DUPLEX_STREAMED: body bytes released by `streamed_response` so far.
    streamed: usize,
}

fn mutation_bytes(common: &CommonResponse) -> Option<Option<&[u8]>> {
    use body_mutation::Mutation;
    match common.body_mutation.as_ref()?.mutation.as_ref()? {
        Mutation::Body(b) => Some(Some(b.as_slice())),
        Mutation::ClearBody(_) => Some(None),
        Mutation::StreamedResponse(s) => Some(Some(&s.body)),
    }
}

/// The body bytes that reach the other side per direction (request, response), by the
/// model of Envoy; `None` in observability mode, where Envoy does not wait for answers.
pub fn delivered(x: &Exchange, run: &Run, envoy: EnvoyConfig) -> Option<[Vec<u8>; 2]> {
    let trace = trace(x, envoy);
    if trace.observed_only {
        return None;
    }
    let [request, response] = deliver(&trace, run);
    Some([request.bytes, response.bytes])
}

/// Replays the answers through the model of Envoy; an error names a direction whose
/// delivered bytes hold the marker although the bytes sent for it did.
pub fn check(x: &Exchange, run: &Run, envoy: EnvoyConfig) -> Result<(), String> {
    if run.end == End::Hung {
        return Err("the answer stream never ended".into());
    }
    let trace = trace(x, envoy);
    if trace.observed_only {
        return Ok(());
    }
    let delivered = deliver(&trace, run);
    for (d, out) in delivered.iter().enumerate() {
        let sent: Vec<u8> = trace.bodies[d]
            .iter()
            .flat_map(|s| s.bytes.iter().copied())
            .collect();
        if contains_marker(&sent) && contains_marker(&out.bytes) {
            let dir = ["request", "response"][d];
            return Err(format!(
                "the {dir} body with the marker was delivered ({} bytes: {:?}); stream end {:?}",
                out.bytes.len(),
                String::from_utf8_lossy(&out.bytes),
                run.end
            ));
        }
    }
    Ok(())
}

fn deliver(trace: &Trace, run: &Run) -> [Delivered; 2] {
    let full_duplex = |d: usize| trace.modes[d] == Some(BodySendMode::FullDuplexStreamed);
    let mut delivered = [Delivered::default(), Delivered::default()];
    let mut ended = false;
    for answer in &run.answers {
        use processing_response::Response as P;
        let (d, body): (usize, &BodyResponse) = match &answer.response {
            Some(P::ImmediateResponse(_)) => {
                ended = true;
                break;
            }
            Some(P::RequestBody(b)) => (0, b),
            Some(P::ResponseBody(b)) => (1, b),
            Some(P::RequestHeaders(h)) | Some(P::ResponseHeaders(h)) => {
                // A headers answer may replace the body too (CONTINUE_AND_REPLACE).
                let d = usize::from(matches!(answer.response, Some(P::ResponseHeaders(_))));
                if let Some(Some(bytes)) = h.response.as_ref().and_then(mutation_bytes) {
                    delivered[d].bytes.extend_from_slice(bytes);
                }
                continue;
            }
            _ => continue,
        };
        let mutation = body.response.as_ref().and_then(mutation_bytes);
        let out = &mut delivered[d];
        if full_duplex(d) {
            match mutation {
                Some(Some(bytes)) => {
                    out.bytes.extend_from_slice(bytes);
                    out.streamed += bytes.len();
                }
                Some(None) => {}
                // A plain continue: taken as letting the rest of the body through.
                None => release_streamed(&trace.bodies[d], out, false),
            }
        } else {
            let sent = trace.bodies[d].get(out.answered);
            out.answered += 1;
            match mutation {
                Some(Some(bytes)) => out.bytes.extend_from_slice(bytes),
                Some(None) => {}
                None => {
                    if let Some(sent) = sent {
                        out.bytes.extend_from_slice(&sent.bytes);
                    }
                }
            }
        }
    }
    if !ended && !trace.reset && run.end == End::Ok {
        // Envoy goes on without the processor: what it still holds, and what it sends
        // after, passes.
        for (d, out) in delivered.iter_mut().enumerate() {
            if full_duplex(d) {
                release_streamed(&trace.bodies[d], out, true);
            } else {
                for sent in trace.bodies[d].iter().skip(out.answered) {
                    if sent.plausible {
                        out.bytes.extend_from_slice(&sent.bytes);
                    }
                }
            }
        }
    }
    delivered
}

/// FULL_DUPLEX_STREAMED: lets through the sent bytes past those already streamed back
/// (only those of messages Envoy could have sent, when `plausible_only`).
fn release_streamed(sent: &[SentBody], out: &mut Delivered, plausible_only: bool) {
    let mut offset = 0;
    let mut released = Vec::new();
    for s in sent {
        let start = out.streamed.saturating_sub(offset).min(s.bytes.len());
        if s.plausible || !plausible_only {
            released.extend_from_slice(&s.bytes[start..]);
        }
        offset += s.bytes.len();
    }
    out.streamed = out.streamed.max(offset);
    out.bytes.extend_from_slice(&released);
}

/// The fuzz target's body: run, check, and fail loudly.
pub fn exercise(x: &Exchange) {
    static ENVOY: LazyLock<EnvoyConfig> = LazyLock::new(EnvoyConfig::from_env);
    let run = run(x);
    if let Err(e) = check(x, &run, *ENVOY) {
        panic!("{e}\nanswers: {:#?}", run.answers);
    }
}

#[cfg(test)]
mod tests;
