//! One ext_proc stream: the messages of one HTTP exchange, in order, and the answer to
//! each. The answer that lets a body through is sent only after that body's verdict.

use std::borrow::Cow;

use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, processing_request,
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

mod release;

use super::respond::{self, RANGE_HEADERS};
use super::{BodyScan, HttpDirection};
use crate::body::{Body, BodyBuffer, BodyError};
use crate::config::RangeRequests;
use crate::headers::HeaderFields;
use crate::scan::{Decision, Outcome, ScanContext};
use crate::unpack::BodyHeaders;

/// One direction (request or response) of the HTTP exchange.
#[derive(Default)]
struct Message {
    headers_seen: bool,
    headers: BodyHeaders,
    /// Headers came without the end of the stream, and the body has no verdict yet: the
    /// stream must not end quietly now.
    awaiting_body: bool,
    /// BUFFERED: the one body message was answered.
    body_answered: bool,
    /// FULL_DUPLEX_STREAMED: the body so far; the headers answer waits for it.
    buffer: Option<BodyBuffer>,
    /// The body exceeded the size limit while streaming in.
    too_large: bool,
    /// Headers to take out when the held headers answer goes.
    remove: &'static [&'static str],
    /// The body's length as its headers declare it (`Content-Length`).
    declared_length: Option<u64>,
}

pub(super) struct ExtProcStream<S: BodyScan> {
    pub(super) scan: std::sync::Arc<S>,
    tx: mpsc::Sender<Result<ProcessingResponse, Status>>,
    request_mode: BodySendMode,
    response_mode: BodySendMode,
    ctx: ScanContext,
    request: Message,
    response: Message,
    /// Envoy said which body modes it uses (`protocol_config`, sent by Envoy 1.30 and
    /// later); without it BUFFERED is assumed, and only what BUFFERED can send is taken.
    modes_known: bool,
}

enum Flow {
    Continue,
    /// An immediate response was sent; Envoy ignores the rest of the stream.
    Done,
}

impl<S: BodyScan> ExtProcStream<S> {
    pub(super) fn new(
        scan: std::sync::Arc<S>,
        tx: mpsc::Sender<Result<ProcessingResponse, Status>>,
    ) -> Self {
        ExtProcStream {
            scan,
            tx,
            // The seed's default until Envoy's protocol_config says otherwise.
            request_mode: BodySendMode::Buffered,
            response_mode: BodySendMode::Buffered,
            ctx: ScanContext::default(),
            request: Message::default(),
            response: Message::default(),
            modes_known: false,
        }
    }

    pub(super) async fn run(
        &mut self,
        mut inbound: impl Stream<Item = Result<ProcessingRequest, Status>> + Unpin,
    ) -> Result<(), Status> {
        let mut first = true;
        loop {
            let message = match inbound.next().await {
                Some(Ok(m)) => m,
                // Buffered bodies and their spilled files are dropped with `self`.
                None => return self.ended(),
                Some(Err(status)) => return self.inbound_failed(status).await,
            };
            if first {
                first = false;
                if let Some(pc) = &message.protocol_config {
                    self.request_mode = mode(pc.request_body_mode)?;
                    self.response_mode = mode(pc.response_body_mode)?;
                    self.modes_known = true;
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
            use HttpDirection::{Request, Response};
            use processing_request::Request as R;
            let flow = match request {
                R::RequestHeaders(h) => self.on_headers(Request, h).await?,
                R::ResponseHeaders(h) => self.on_headers(Response, h).await?,
                R::RequestBody(b) => self.on_body(Request, b).await?,
                R::ResponseBody(b) => self.on_body(Response, b).await?,
                R::RequestTrailers(_) => self.on_trailers(Request).await?,
                R::ResponseTrailers(_) => self.on_trailers(Response).await?,
            };
            if let Flow::Done = flow {
                return Ok(());
            }
        }
    }

    /// Envoy closed its side. With a body still waiting for its verdict that is no verdict
    /// at all, so the stream ends with an error status: an OK end would let Envoy pass on
    /// what it holds.
    ///
    /// Likewise before the response came at all, when Envoy said it sends response bodies:
    /// a stream that ends OK tells Envoy that processing is done, and the response would
    /// then pass unscanned. Where Envoy itself gave up on the exchange (the client went), the
    /// status reaches no one.
    fn ended(&self) -> Result<(), Status> {
        if self.request.awaiting_body || self.response.awaiting_body {
            return Err(Status::aborted(
                "the stream ended before the body was complete",
            ));
        }
        let response_bodies = matches!(
            self.response_mode,
            BodySendMode::Buffered | BodySendMode::FullDuplexStreamed
        );
        if self.modes_known && response_bodies && !self.response.headers_seen {
            return Err(Status::aborted(
                "the stream ended before the response was processed",
            ));
        }
        Ok(())
    }

    /// A message could not be read. The usual cause is a body message over the gRPC
    /// message limit (a gateway whose buffers are larger than MAX_BODY_MB): that body gets
    /// the too-large answer, whatever Envoy would have allowed. Anything else ends the
    /// stream with an error status, never with OK.
    async fn inbound_failed(&mut self, status: Status) -> Result<(), Status> {
        tracing::debug!(code = ?status.code(), message = status.message(), "ext_proc inbound failed");
        let waiting = if self.response.awaiting_body {
            Some(HttpDirection::Response)
        } else if self.request.awaiting_body {
            Some(HttpDirection::Request)
        } else {
            None
        };
        match (status.code(), waiting) {
            (tonic::Code::OutOfRange | tonic::Code::ResourceExhausted, Some(d)) => {
                let e = BodyError::TooLarge(self.scan.limits().max);
                self.reject_unscannable(d, &e).await.map(|_| ())
            }
            // Even with no body waiting, an OK end would tell Envoy that processing is done,
            // and a response still to come would pass unscanned.
            _ => Err(status),
        }
    }

    fn message(&mut self, d: HttpDirection) -> &mut Message {
        match d {
            HttpDirection::Request => &mut self.request,
            HttpDirection::Response => &mut self.response,
        }
    }

    fn body_mode(&self, d: HttpDirection) -> BodySendMode {
        match d {
            HttpDirection::Request => self.request_mode,
            HttpDirection::Response => self.response_mode,
        }
    }

    async fn on_headers(&mut self, d: HttpDirection, h: HttpHeaders) -> Result<Flow, Status> {
        let fields = HeaderFields::read(
            h.headers.iter().flat_map(|m| m.headers.iter()).map(|hv| {
                let value = if hv.raw_value.is_empty() {
                    Cow::Borrowed(hv.value.as_str())
                } else {
                    String::from_utf8_lossy(&hv.raw_value)
                };
                (hv.key.as_str(), value)
            }),
            self.scan.priority_header(),
        );
        let mut remove: &'static [&'static str] = &[];
        if d == HttpDirection::Request {
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
                .or(fields.external_address.clone())
                .unwrap_or_default();
            self.ctx.request_id = fields.request_id.clone().unwrap_or_default();
            self.ctx.priority = self.scan.priority(fields.priority.as_deref());
            if fields.range {
                match self.scan.range_requests() {
                    RangeRequests::Strip => remove = &RANGE_HEADERS,
                    RangeRequests::Refuse => {
                        tracing::info!(route = %self.ctx.route, "request for part of a file refused");
                        self.send(respond::range_refused()).await?;
                        return Ok(Flow::Done);
                    }
                    RangeRequests::Allow => {}
                }
            }
        }
        let limits = self.scan.limits().clone();
        let mode = self.body_mode(d);
        let message = self.message(d);
        if message.headers_seen {
            return Err(Status::invalid_argument("a second headers message"));
        }
        message.headers_seen = true;
        message.headers = fields.body_headers();
        message.remove = remove;
        message.declared_length = fields.content_length;
        if h.end_of_stream {
            self.send(respond::headers_continue(d, remove)).await?;
            return Ok(Flow::Continue);
        }
        message.awaiting_body = matches!(
            mode,
            BodySendMode::Buffered | BodySendMode::FullDuplexStreamed
        );
        match mode {
            BodySendMode::None | BodySendMode::Buffered => {
                self.send(respond::headers_continue(d, remove)).await?;
            }
            BodySendMode::FullDuplexStreamed => message.buffer = Some(BodyBuffer::new(limits)),
            BodySendMode::Streamed | BodySendMode::BufferedPartial | BodySendMode::Grpc => {
                return Err(refused_mode(mode));
            }
        }
        Ok(Flow::Continue)
    }

    async fn on_body(&mut self, d: HttpDirection, b: HttpBody) -> Result<Flow, Status> {
        // Without its headers a body would be scanned without its coding, media type or
        // status (a route that skips the headers): undecoded, unsplit, a 206 unnoticed.
        if !self.message(d).headers_seen {
            return Err(Status::failed_precondition(
                "a body without its headers cannot be scanned as sent; send the headers (SEND)",
            ));
        }
        // An Envoy that does not say its mode may be streaming: a first chunk is not the body.
        if !self.modes_known && !b.end_of_stream {
            return Err(Status::failed_precondition(
                "without protocol_config a body in pieces cannot be told from a whole one",
            ));
        }
        match self.body_mode(d) {
            BodySendMode::Buffered => {
                // One message holds the whole body (even when trailers follow and
                // end_of_stream is false); a second one means the body came in pieces,
                // and a piece is not the file.
                let message = self.message(d);
                if message.body_answered {
                    return Err(Status::invalid_argument(
                        "a second body message in BUFFERED mode",
                    ));
                }
                message.body_answered = true;
                message.awaiting_body = false;
                let declared = message.declared_length;
                let received = b.body.len() as u64;
                tracing::debug!(
                    direction = d.label(),
                    bytes = received,
                    declared = ?declared,
                    end_of_stream = b.end_of_stream,
                    request_id = %self.ctx.request_id,
                    route = %self.ctx.route,
                    "buffered body message"
                );
                // Envoy lets its own copy of the body through on CONTINUE: the verdict must be
                // about all of it, so a message that is not the body the headers declared is
                // refused (the body's messages, not the sender, broke the framing).
                check_length(d, declared, received)?;
                let body = match Body::from_message(b.body, self.scan.limits()) {
                    Ok(body) => body,
                    Err(e) => return self.reject_unscannable(d, &e).await,
                };
                let outcome = self.scan_body(d, &body, "buffered").await;
                match outcome.decision {
                    Decision::Allow => {
                        self.send(respond::body_continue(d)).await?;
                        Ok(Flow::Continue)
                    }
                    Decision::Block { status } => self.block(d, &outcome, status).await,
                }
            }
            BodySendMode::FullDuplexStreamed => {
                let message = self.message(d);
                let Some(buffer) = message.buffer.as_mut() else {
                    return Err(Status::invalid_argument(
                        "body chunk without headers waiting for it",
                    ));
                };
                if !message.too_large {
                    match buffer.push(&b.body) {
                        Ok(()) => {}
                        Err(BodyError::TooLarge(_)) => message.too_large = true,
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

    async fn on_trailers(&mut self, d: HttpDirection) -> Result<Flow, Status> {
        if !self.message(d).headers_seen {
            return Err(Status::failed_precondition(
                "trailers without their headers",
            ));
        }
        if self.body_mode(d) == BodySendMode::FullDuplexStreamed && self.message(d).buffer.is_some()
        {
            return self.release_or_block(d, true).await;
        }
        // Trailers end the message: a BUFFERED body that never came was empty, and no byte
        // of it can pass unseen (unless its headers declared one).
        let buffered = self.body_mode(d) == BodySendMode::Buffered;
        let message = self.message(d);
        if buffered && !message.body_answered {
            check_length(d, message.declared_length, 0)?;
        }
        self.message(d).awaiting_body = false;
        self.send(respond::trailers_continue(d)).await?;
        Ok(Flow::Continue)
    }

    async fn scan_body(&self, d: HttpDirection, body: &Body, mode: &'static str) -> Outcome {
        let ctx = ScanContext {
            direction: d.proto(),
            mode,
            ..self.ctx.clone()
        };
        let headers = match d {
            HttpDirection::Request => &self.request.headers,
            HttpDirection::Response => &self.response.headers,
        };
        self.scan.scan(body, headers, &ctx).await
    }

    async fn reject_unscannable(
        &mut self,
        d: HttpDirection,
        e: &BodyError,
    ) -> Result<Flow, Status> {
        if let BodyError::Spill(io) = e {
            return Err(Status::internal(format!("buffering the body: {io}")));
        }
        let ctx = ScanContext {
            direction: d.proto(),
            mode: "unscanned",
            ..self.ctx.clone()
        };
        let outcome = self.scan.refuse_unscanned(e.to_string(), &ctx);
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
        d: HttpDirection,
        outcome: &Outcome,
        status: u16,
    ) -> Result<Flow, Status> {
        self.send(respond::block(d, outcome, status)).await?;
        Ok(Flow::Done)
    }

    async fn send(&self, response: ProcessingResponse) -> Result<(), Status> {
        self.tx
            .send(Ok(response))
            .await
            .map_err(|_| Status::cancelled("Envoy closed the stream"))
    }
}

/// A body that is not as long as its `Content-Length` is not the body its message carries
/// on: Envoy's codecs enforce the length, so a difference means the processor was handed
/// another body than the one that would pass, and no verdict on it may let anything through.
fn check_length(d: HttpDirection, declared: Option<u64>, received: u64) -> Result<(), Status> {
    match declared {
        Some(declared) if declared != received => {
            tracing::warn!(
                direction = d.label(),
                declared,
                received,
                "body message is not the body its headers declared; refused"
            );
            Err(Status::data_loss(format!(
                "the {} body holds {received} bytes, its Content-Length says {declared}",
                d.label()
            )))
        }
        _ => Ok(()),
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

#[cfg(test)]
mod tests;
