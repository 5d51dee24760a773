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

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use virus_scanner_protocol::task::Direction;

pub use crate::scan::BodyScan;
use crate::scan::ScanService;

mod respond;
mod stream;

use stream::ExtProcStream;

/// The direction of an HTTP message: ext_proc handles exactly these two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpDirection {
    Request,
    Response,
}

impl HttpDirection {
    pub fn proto(self) -> Direction {
        match self {
            HttpDirection::Request => Direction::Request,
            HttpDirection::Response => Direction::Response,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            HttpDirection::Request => "request",
            HttpDirection::Response => "response",
        }
    }
}

pub struct ExtProcService<S: BodyScan = ScanService> {
    scan: Arc<S>,
}

impl<S: BodyScan> ExtProcService<S> {
    pub fn new(scan: Arc<S>) -> ExtProcService<S> {
        ExtProcService { scan }
    }

    /// Processes one stream of messages; the answers come out of the returned stream, and
    /// the stream ends with an error status whenever no verdict let the body through.
    pub fn process_messages(
        &self,
        inbound: impl Stream<Item = Result<ProcessingRequest, Status>> + Unpin + Send + 'static,
    ) -> Answers {
        // Small: the body release waits for Envoy to take each chunk.
        let (tx, rx) = mpsc::channel(4);
        let mut stream = ExtProcStream::new(self.scan.clone(), tx);
        let work = async move {
            let result = stream.run(inbound).await;
            if let Err(status) = &result {
                stream.scan.front_end_error("ext_proc");
                tracing::warn!(code = ?status.code(), message = status.message(), "ext_proc stream failed");
            }
            result
        };
        Answers {
            work: Some(Box::pin(work)),
            rx,
            failed: None,
        }
    }
}

#[tonic::async_trait]
impl<S: BodyScan> ExternalProcessor for ExtProcService<S> {
    type ProcessStream = Answers;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        Ok(Response::new(self.process_messages(request.into_inner())))
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
            let Some(work) = this.work.as_mut() else {
                // The work is over: every answer it will give is queued. They go out first,
                // then the stream ends. `try_recv`, not `poll_recv`: under tokio's
                // cooperative budget `poll_recv` answers `Pending` with answers still queued
                // once the task has used up its share, and ending the stream on that would
                // drop a queued block and close with OK: Envoy would pass the body on.
                return Poll::Ready(match this.rx.try_recv() {
                    Ok(answer) => Some(answer),
                    Err(_) => this.failed.take().map(Err),
                });
            };
            if let Poll::Ready(Some(answer)) = this.rx.poll_recv(cx) {
                return Poll::Ready(Some(answer));
            }
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
                tx.send(Ok(respond::headers_continue(HttpDirection::Request, &[])))
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
            tx.send(Ok(respond::body_continue(HttpDirection::Response)))
                .await
                .map_err(|_| Status::internal("closed"))?;
            Ok(())
        };
        let mut stream = answers(work, rx);
        assert!(stream.next().await.unwrap().is_ok());
        assert!(stream.next().await.is_none());
    }

    /// Spends `n` units of tokio's cooperative budget of the current poll (all of it when
    /// `n` is `None`); returns how many were spent.
    fn spend_budget(cx: &mut Context<'_>, n: Option<usize>) -> usize {
        use tokio::task::coop::{has_budget_remaining, poll_proceed};
        let mut spent = 0;
        while n.is_none_or(|n| spent < n) && has_budget_remaining() {
            match poll_proceed(cx) {
                Poll::Ready(unit) => unit.made_progress(),
                Poll::Pending => break,
            }
            spent += 1;
            assert!(spent < 100_000, "the test runs without a budget");
        }
        spent
    }

    #[tokio::test]
    async fn a_block_queued_with_the_budget_spent_still_goes_out_before_the_stream_ends() {
        // The work queues an answer (a block) and ends at once, as on a memo hit for an
        // infected body. Polled with one unit of budget left, the send takes it, and the
        // receiver cannot see the answer in that poll: the stream must wait, not end OK.
        let (tx, rx) = mpsc::channel(4);
        let work = async move {
            tx.send(Ok(respond::body_continue(HttpDirection::Response)))
                .await
                .map_err(|_| Status::internal("closed"))?;
            Ok(())
        };
        let mut stream = answers(work, rx);
        // A first poll measures the budget a poll gets; the second spends all but one unit
        // of it, then polls the answers once: whatever that says is what tonic acts on.
        let mut budget = None;
        let first = std::future::poll_fn(|cx| match budget {
            None => {
                budget = Some(spend_budget(cx, None));
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(n) => {
                assert!(n > 1, "a poll's budget is {n}");
                spend_budget(cx, Some(n - 1));
                Poll::Ready(Pin::new(&mut stream).poll_next(cx))
            }
        })
        .await;
        assert!(
            !matches!(first, Poll::Ready(None)),
            "the stream ended with the answer still queued"
        );
        let mut got = match first {
            Poll::Ready(Some(a)) => vec![a],
            _ => Vec::new(),
        };
        while let Some(a) = stream.next().await {
            got.push(a);
        }
        assert_eq!(got.len(), 1, "the queued answer went out");
        assert!(got[0].is_ok());
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
