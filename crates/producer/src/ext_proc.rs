//! Envoy's external processor (ext_proc v3).
//!
//! * BUFFERED: Envoy sends each body whole in one message; the answer to it is the verdict.
//! * FULL_DUPLEX_STREAMED: the body arrives in chunks. The answer to the headers is held
//!   until the body verdict, otherwise Envoy would already have sent the headers on and a
//!   large infected response could leak as a truncated 200. The body is then released in
//!   order with `streamed_response` messages, or replaced by an immediate response.
//! * STREAMED and BUFFERED_PARTIAL hand a body on before it is complete: no safe verdict
//!   exists, so such a stream is refused with an error status.
//!
//! Every failure ends the gRPC stream with an error status: a stream closed with OK after a
//! failure makes Envoy forward the body unscanned.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpBody,
    HttpHeaders, ImmediateResponse, ProcessingRequest, ProcessingResponse, StreamedBodyResponse,
    TrailersResponse, body_mutation, processing_request, processing_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use virus_scanner_protocol::task::{Direction, VerdictStatus};

use crate::body::{Body, BodyBuffer, BodyData, BodyError};
use crate::scan::{Decision, Outcome, ScanContext, ScanService, direction_label};
use crate::unpack::BodyHeaders;

/// Size of the body chunks released back to Envoy in FULL_DUPLEX_STREAMED.
const RELEASE_CHUNK: usize = 256 * 1024;

pub struct ExtProcService {
    scan: Arc<ScanService>,
}

impl ExtProcService {
    pub fn new(scan: Arc<ScanService>) -> ExtProcService {
        ExtProcService { scan }
    }
}

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = Answers;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let inbound = request.into_inner();
        // Small: the body release waits for Envoy to take each chunk.
        let (tx, rx) = mpsc::channel(4);
        let mut stream = ExtProcStream::new(self.scan.clone(), tx);
        let work = async move {
            let result = stream.run(inbound).await;
            if let Err(status) = &result {
                stream.scan.metrics.error("ext_proc");
                tracing::warn!(code = ?status.code(), message = status.message(), "ext_proc stream failed");
            }
            result
        };
        Ok(Response::new(Answers {
            work: Some(Box::pin(work)),
            rx,
            failed: None,
        }))
    }
}

type Work = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;

/// The answers of one ext_proc stream. The work that produces them is polled by whoever
/// polls the answers (the server's task for this gRPC stream), not by a task of its own:
/// a message then costs no hand-over between tasks. When the stream goes away (Envoy done,
/// reset), the work is dropped with it, and so are its buffers and spill files.
pub struct Answers {
    work: Option<Work>,
    rx: mpsc::Receiver<Result<ProcessingResponse, Status>>,
    /// The error status that ends the stream, sent after every answer queued before it.
    failed: Option<Status>,
}

impl Stream for Answers {
    type Item = Result<ProcessingResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Poll::Ready(Some(answer)) = this.rx.poll_recv(cx) {
                return Poll::Ready(Some(answer));
            }
            let Some(work) = this.work.as_mut() else {
                return Poll::Ready(this.failed.take().map(Err));
            };
            // A panic must not end the stream quietly: Envoy would take that as done.
            let polled = std::panic::catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx)))
                .unwrap_or_else(|_| {
                    tracing::error!("ext_proc stream processing panicked");
                    Poll::Ready(Err(Status::internal("the processor failed")))
                });
            match polled {
                Poll::Ready(result) => {
                    // Dropping the work drops the sender: the queue drains, then ends.
                    this.work = None;
                    this.failed = result.err();
                }
                // The work may have queued answers before it waited.
                Poll::Pending => {
                    return match this.rx.poll_recv(cx) {
                        Poll::Ready(Some(answer)) => Poll::Ready(Some(answer)),
                        _ => Poll::Pending,
                    };
                }
            }
        }
    }
}

/// One direction (request or response) of one HTTP stream.
#[derive(Default)]
struct Side {
    headers: BodyHeaders,
    /// FULL_DUPLEX_STREAMED: the body so far; the headers answer waits for it.
    buffer: Option<BodyBuffer>,
    /// The body exceeded the size limit while streaming in.
    too_large: bool,
}

struct ExtProcStream {
    scan: Arc<ScanService>,
    tx: mpsc::Sender<Result<ProcessingResponse, Status>>,
    request_mode: BodySendMode,
    response_mode: BodySendMode,
    ctx: ScanContext,
    request: Side,
    response: Side,
}

enum Flow {
    Continue,
    /// An immediate response was sent; Envoy ignores the rest of the stream.
    Done,
}

impl ExtProcStream {
    fn new(scan: Arc<ScanService>, tx: mpsc::Sender<Result<ProcessingResponse, Status>>) -> Self {
        ExtProcStream {
            scan,
            tx,
            // The seed's default until Envoy's protocol_config says otherwise.
            request_mode: BodySendMode::Buffered,
            response_mode: BodySendMode::Buffered,
            ctx: ScanContext::default(),
            request: Side::default(),
            response: Side::default(),
        }
    }

    async fn run(&mut self, mut inbound: Streaming<ProcessingRequest>) -> Result<(), Status> {
        let mut first = true;
        loop {
            let message = match inbound.message().await {
                Ok(Some(m)) => m,
                // Envoy closed the stream (request done, client gone): buffered bodies and
                // their spilled files are dropped with `self`.
                Ok(None) => return Ok(()),
                Err(status) => {
                    tracing::debug!(message = status.message(), "ext_proc stream ended by Envoy");
                    return Ok(());
                }
            };
            if first {
                first = false;
                if let Some(pc) = &message.protocol_config {
                    self.request_mode = mode(pc.request_body_mode)?;
                    self.response_mode = mode(pc.response_body_mode)?;
                }
                if message.observability_mode {
                    return Err(Status::failed_precondition(
                        "observability_mode cannot block infected bodies; turn it off",
                    ));
                }
            }
            let Some(request) = message.request else {
                return Err(Status::invalid_argument(
                    "ProcessingRequest without a request",
                ));
            };
            use processing_request::Request as R;
            let flow = match request {
                R::RequestHeaders(h) => self.on_headers(Direction::Request, h).await?,
                R::ResponseHeaders(h) => self.on_headers(Direction::Response, h).await?,
                R::RequestBody(b) => self.on_body(Direction::Request, b).await?,
                R::ResponseBody(b) => self.on_body(Direction::Response, b).await?,
                R::RequestTrailers(_) => self.on_trailers(Direction::Request).await?,
                R::ResponseTrailers(_) => self.on_trailers(Direction::Response).await?,
            };
            if let Flow::Done = flow {
                return Ok(());
            }
        }
    }

    fn side(&mut self, d: Direction) -> &mut Side {
        match d {
            Direction::Response => &mut self.response,
            _ => &mut self.request,
        }
    }

    fn body_mode(&self, d: Direction) -> BodySendMode {
        match d {
            Direction::Response => self.response_mode,
            _ => self.request_mode,
        }
    }

    async fn on_headers(&mut self, d: Direction, h: HttpHeaders) -> Result<Flow, Status> {
        let fields = HeaderFields::read(&h, &self.scan.config.priority_header);
        if d == Direction::Request {
            self.ctx.route = fields
                .path
                .as_deref()
                .map(|p| p.split('?').next().unwrap_or_default().to_owned())
                .unwrap_or_default();
            self.ctx.client_address = fields
                .forwarded_for
                .as_deref()
                .and_then(|v| v.split(',').next())
                .map(|v| v.trim().to_owned())
                .or(fields.external_address)
                .unwrap_or_default();
            self.ctx.request_id = fields.request_id.unwrap_or_default();
            self.ctx.priority = self.scan.config.priority(fields.priority.as_deref());
        }
        let limits = self.scan.limits.clone();
        let mode = self.body_mode(d);
        let side = self.side(d);
        side.headers = BodyHeaders {
            content_encoding: fields.content_encoding,
            content_type: fields.content_type,
        };
        if h.end_of_stream {
            self.send(headers_continue(d)).await?;
            return Ok(Flow::Continue);
        }
        match mode {
            BodySendMode::None | BodySendMode::Buffered => {
                self.send(headers_continue(d)).await?;
            }
            BodySendMode::FullDuplexStreamed => side.buffer = Some(BodyBuffer::new(limits)),
            BodySendMode::Streamed | BodySendMode::BufferedPartial | BodySendMode::Grpc => {
                return Err(refused_mode(mode));
            }
        }
        Ok(Flow::Continue)
    }

    async fn on_body(&mut self, d: Direction, b: HttpBody) -> Result<Flow, Status> {
        match self.body_mode(d) {
            BodySendMode::Buffered => {
                // The whole body, even when trailers follow (end_of_stream is then false).
                let body = match Body::from_message(b.body, &self.scan.limits) {
                    Ok(body) => body,
                    Err(e) => return self.reject_unscannable(d, &e).await,
                };
                let outcome = self.scan_body(d, &body, "buffered").await;
                match outcome.decision {
                    Decision::Allow => {
                        self.send(body_continue(d)).await?;
                        Ok(Flow::Continue)
                    }
                    Decision::Block { status } => self.block(d, &outcome, status).await,
                }
            }
            BodySendMode::FullDuplexStreamed => {
                let side = self.side(d);
                let Some(buffer) = side.buffer.as_mut() else {
                    return Err(Status::internal("body chunk before its headers"));
                };
                if !side.too_large {
                    match buffer.push(&b.body) {
                        Ok(()) => {}
                        Err(BodyError::TooLarge(_)) => side.too_large = true,
                        Err(e) => return Err(Status::internal(format!("buffering the body: {e}"))),
                    }
                }
                if b.end_of_stream {
                    return self.release_or_block(d, false).await;
                }
                Ok(Flow::Continue)
            }
            other => Err(refused_mode(other)),
        }
    }

    async fn on_trailers(&mut self, d: Direction) -> Result<Flow, Status> {
        if self.body_mode(d) == BodySendMode::FullDuplexStreamed && self.side(d).buffer.is_some() {
            return self.release_or_block(d, true).await;
        }
        self.send(trailers_continue(d)).await?;
        Ok(Flow::Continue)
    }

    /// FULL_DUPLEX_STREAMED: the body is complete; decide, then answer the held headers and
    /// release the body, or reject it.
    async fn release_or_block(&mut self, d: Direction, trailers: bool) -> Result<Flow, Status> {
        let side = self.side(d);
        let too_large = side.too_large;
        let Some(buffer) = side.buffer.take() else {
            return Err(Status::internal("body end without a buffered body"));
        };
        if too_large {
            let e = BodyError::TooLarge(self.scan.limits.max);
            return self.reject_unscannable(d, &e).await;
        }
        let body = buffer
            .finish()
            .map_err(|e| Status::internal(format!("buffering the body: {e}")))?;
        let outcome = self.scan_body(d, &body, "full_duplex").await;
        if let Decision::Block { status } = outcome.decision {
            return self.block(d, &outcome, status).await;
        }
        self.send(headers_continue(d)).await?;
        self.release(d, &body, !trailers).await?;
        if trailers {
            self.send(trailers_continue(d)).await?;
        }
        Ok(Flow::Continue)
    }

    /// Sends the body back to Envoy in order; the last chunk carries `end_of_stream` unless
    /// trailers follow.
    async fn release(
        &mut self,
        d: Direction,
        body: &Body,
        end_of_stream: bool,
    ) -> Result<(), Status> {
        let io = |e: std::io::Error| Status::internal(format!("reading the held body: {e}"));
        match &body.data {
            BodyData::Memory(bytes) => {
                let mut chunks = bytes.chunks(RELEASE_CHUNK).peekable();
                if chunks.peek().is_none() {
                    return self.send(streamed_body(d, Vec::new(), end_of_stream)).await;
                }
                while let Some(chunk) = chunks.next() {
                    let last = chunks.peek().is_none();
                    self.send(streamed_body(d, chunk.to_vec(), last && end_of_stream))
                        .await?;
                }
            }
            BodyData::Spilled(spill) => {
                // Plain reads: the file was just written and sits in the page cache, and
                // tokio::fs would add a thread hop and a copy per chunk.
                use std::io::Read;
                let mut file = std::fs::File::open(spill.path()).map_err(io)?;
                let mut left = body.len;
                loop {
                    let want = (left as usize).min(RELEASE_CHUNK);
                    let mut chunk = vec![0u8; want];
                    file.read_exact(&mut chunk).map_err(io)?;
                    left -= want as u64;
                    self.send(streamed_body(d, chunk, left == 0 && end_of_stream))
                        .await?;
                    if left == 0 {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    async fn scan_body(&self, d: Direction, body: &Body, mode: &'static str) -> Outcome {
        let ctx = ScanContext {
            direction: d,
            mode,
            ..self.ctx.clone()
        };
        let headers = match d {
            Direction::Response => &self.response.headers,
            _ => &self.request.headers,
        };
        self.scan.scan(body, headers, &ctx).await
    }

    async fn reject_unscannable(&mut self, d: Direction, e: &BodyError) -> Result<Flow, Status> {
        if let BodyError::Spill(io) = e {
            return Err(Status::internal(format!("buffering the body: {io}")));
        }
        let verdict = virus_scanner_protocol::task::Verdict {
            status: VerdictStatus::Unscannable as i32,
            detail: e.to_string(),
            ..Default::default()
        };
        let outcome = self.scan.decide(verdict, None, String::new());
        match outcome.decision {
            Decision::Block { status } => self.block(d, &outcome, status).await,
            // ALLOW_UNSCANNABLE: the body is past our limit and cannot be held; Envoy must
            // not forward what we did not see, so the stream still fails closed.
            Decision::Allow => Err(Status::resource_exhausted(format!(
                "body too large to hold for scanning: {e}"
            ))),
        }
    }

    async fn block(
        &mut self,
        d: Direction,
        outcome: &Outcome,
        status: u16,
    ) -> Result<Flow, Status> {
        self.send(immediate_response(d, outcome, status)).await?;
        Ok(Flow::Done)
    }

    async fn send(&self, response: ProcessingResponse) -> Result<(), Status> {
        self.tx
            .send(Ok(response))
            .await
            .map_err(|_| Status::cancelled("Envoy closed the stream"))
    }
}

fn mode(raw: i32) -> Result<BodySendMode, Status> {
    BodySendMode::try_from(raw)
        .map_err(|_| Status::invalid_argument(format!("unknown body send mode {raw}")))
}

fn refused_mode(mode: BodySendMode) -> Status {
    Status::failed_precondition(format!(
        "body mode {} hands the body on before it is complete and cannot be scanned safely; \
         use BUFFERED or FULL_DUPLEX_STREAMED",
        mode.as_str_name()
    ))
}

/// The header fields the scan uses, read in one pass; the others are not copied.
#[derive(Debug, Default, PartialEq)]
struct HeaderFields {
    path: Option<String>,
    forwarded_for: Option<String>,
    external_address: Option<String>,
    request_id: Option<String>,
    priority: Option<String>,
    content_encoding: Option<String>,
    content_type: Option<String>,
}

impl HeaderFields {
    /// Names match in any case; values come from `raw_value` (Envoy leaves `value` empty).
    /// The list fields (content codings, forwarding hops) sent on several lines are joined
    /// with ", " as HTTP defines, so that no coding is left undone; of the others the first
    /// line counts.
    fn read(h: &HttpHeaders, priority_header: &str) -> HeaderFields {
        let mut f = HeaderFields::default();
        for hv in h.headers.iter().flat_map(|m| m.headers.iter()) {
            let key = hv.key.as_str();
            let (slot, list) = if key.eq_ignore_ascii_case(":path") {
                (&mut f.path, false)
            } else if key.eq_ignore_ascii_case("x-forwarded-for") {
                (&mut f.forwarded_for, true)
            } else if key.eq_ignore_ascii_case("x-envoy-external-address") {
                (&mut f.external_address, false)
            } else if key.eq_ignore_ascii_case("x-request-id") {
                (&mut f.request_id, false)
            } else if key.eq_ignore_ascii_case(priority_header) {
                (&mut f.priority, false)
            } else if key.eq_ignore_ascii_case("content-encoding") {
                (&mut f.content_encoding, true)
            } else if key.eq_ignore_ascii_case("content-type") {
                (&mut f.content_type, false)
            } else {
                continue;
            };
            let value = if hv.raw_value.is_empty() {
                std::borrow::Cow::Borrowed(hv.value.as_str())
            } else {
                String::from_utf8_lossy(&hv.raw_value)
            };
            match slot {
                Some(joined) if list => {
                    joined.push_str(", ");
                    joined.push_str(&value);
                }
                Some(_) => {}
                None => *slot = Some(value.into_owned()),
            }
        }
        f
    }
}

fn continue_response() -> CommonResponse {
    CommonResponse::default()
}

fn headers_continue(d: Direction) -> ProcessingResponse {
    use processing_response::Response as P;
    let r = HeadersResponse {
        response: Some(continue_response()),
    };
    ProcessingResponse {
        response: Some(match d {
            Direction::Response => P::ResponseHeaders(r),
            _ => P::RequestHeaders(r),
        }),
        ..Default::default()
    }
}

fn body_response(d: Direction, common: CommonResponse) -> ProcessingResponse {
    use processing_response::Response as P;
    let r = BodyResponse {
        response: Some(common),
    };
    ProcessingResponse {
        response: Some(match d {
            Direction::Response => P::ResponseBody(r),
            _ => P::RequestBody(r),
        }),
        ..Default::default()
    }
}

fn body_continue(d: Direction) -> ProcessingResponse {
    body_response(d, continue_response())
}

fn streamed_body(d: Direction, chunk: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
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

fn trailers_continue(d: Direction) -> ProcessingResponse {
    use processing_response::Response as P;
    let r = TrailersResponse::default();
    ProcessingResponse {
        response: Some(match d {
            Direction::Response => P::ResponseTrailers(r),
            _ => P::RequestTrailers(r),
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

fn immediate_response(d: Direction, outcome: &Outcome, status: u16) -> ProcessingResponse {
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
                "direction": direction_label(d),
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
                "direction": direction_label(d),
                "task_id": outcome.task_id,
            })
        }
        _ => {
            headers.push(header("x-virus-scan", "error"));
            serde_json::json!({
                "error": "scan_failed",
                "verdict": "error",
                "detail": v.detail,
                "direction": direction_label(d),
                "task_id": outcome.task_id,
            })
        }
    };
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
                details: format!("virus_scanner_{}", v.status().label()),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    fn answers(
        work: impl Future<Output = Result<(), Status>> + Send + 'static,
        rx: mpsc::Receiver<Result<ProcessingResponse, Status>>,
    ) -> Answers {
        Answers {
            work: Some(Box::pin(work)),
            rx,
            failed: None,
        }
    }

    #[tokio::test]
    async fn queued_answers_go_out_before_the_error_that_ends_the_stream() {
        let (tx, rx) = mpsc::channel(4);
        let work = async move {
            for _ in 0..3 {
                tx.send(Ok(headers_continue(Direction::Request)))
                    .await
                    .map_err(|_| Status::internal("closed"))?;
            }
            Err(Status::invalid_argument("refused"))
        };
        let mut stream = answers(work, rx);
        for _ in 0..3 {
            assert!(stream.next().await.unwrap().is_ok());
        }
        let end = stream.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), tonic::Code::InvalidArgument);
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn work_that_finishes_ends_the_stream_cleanly_after_its_answers() {
        let (tx, rx) = mpsc::channel(4);
        let work = async move {
            tx.send(Ok(body_continue(Direction::Response)))
                .await
                .map_err(|_| Status::internal("closed"))?;
            Ok(())
        };
        let mut stream = answers(work, rx);
        assert!(stream.next().await.unwrap().is_ok());
        assert!(stream.next().await.is_none());
    }

    #[test]
    fn header_fields_are_read_in_any_case_and_list_fields_are_joined() {
        use envoy_types::pb::envoy::config::core::v3::HeaderMap;
        let hv = |k: &str, v: &str| HeaderValue {
            key: k.to_owned(),
            raw_value: v.as_bytes().to_vec(),
            ..Default::default()
        };
        let h = HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![
                    hv(":path", "/upload?x=1"),
                    hv("Content-Encoding", "gzip"),
                    hv("content-encoding", "br"),
                    hv("content-type", "multipart/form-data; boundary=a"),
                    hv("content-type", "text/plain"),
                    hv("X-Forwarded-For", "203.0.113.7"),
                    hv("x-forwarded-for", "10.0.0.1"),
                    hv("x-scan-priority", "high"),
                    hv("x-priority", "normal"),
                    // `value` is read when `raw_value` is empty.
                    HeaderValue {
                        key: "x-request-id".into(),
                        value: "abc".into(),
                        ..Default::default()
                    },
                ],
            }),
            ..Default::default()
        };
        let f = HeaderFields::read(&h, "X-Scan-Priority");
        assert_eq!(
            f,
            HeaderFields {
                path: Some("/upload?x=1".into()),
                forwarded_for: Some("203.0.113.7, 10.0.0.1".into()),
                external_address: None,
                request_id: Some("abc".into()),
                priority: Some("high".into()),
                content_encoding: Some("gzip, br".into()),
                content_type: Some("multipart/form-data; boundary=a".into()),
            }
        );
    }

    #[tokio::test]
    async fn a_panic_in_the_work_ends_the_stream_with_an_error_status() {
        let (_tx, rx) = mpsc::channel(4);
        let mut stream = answers(async { panic!("a processing bug") }, rx);
        let end = stream.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), tonic::Code::Internal);
        assert!(stream.next().await.is_none());
    }
}
