//! FULL_DUPLEX_STREAMED: a body held until its verdict is released to Envoy in order, or
//! replaced by the block answer.

use tonic::Status;

use super::super::respond;
use super::{ExtProcStream, Flow, HttpDirection};
use crate::body::{Body, BodyData, BodyError};
use crate::scan::{BodyScan, Decision};

/// Size of the body chunks released back to Envoy.
const RELEASE_CHUNK: usize = 256 * 1024;

impl<S: BodyScan> ExtProcStream<S> {
    /// FULL_DUPLEX_STREAMED: the body is complete; decide, then answer the held headers and
    /// release the body, or reject it.
    pub(super) async fn release_or_block(
        &mut self,
        d: HttpDirection,
        trailers: bool,
    ) -> Result<Flow, Status> {
        let message = self.message(d);
        let too_large = message.too_large;
        let remove = message.remove;
        let Some(buffer) = message.buffer.take() else {
            return Err(Status::internal("body end without a buffered body"));
        };
        message.awaiting_body = false;
        if too_large {
            let e = BodyError::TooLarge(self.scan.limits().max);
            return self.reject_unscannable(d, &e).await;
        }
        let body = buffer
            .finish()
            .map_err(|e| Status::internal(format!("buffering the body: {e}")))?;
        super::check_length(d, self.message(d).declared_length, body.len)?;
        let outcome = self.scan_body(d, &body, "full_duplex").await;
        if let Decision::Block { status } = outcome.decision {
            return self.block(d, &outcome, status).await;
        }
        self.send(respond::headers_continue(d, remove)).await?;
        self.release(d, &body, !trailers).await?;
        if trailers {
            self.send(respond::trailers_continue(d)).await?;
        }
        Ok(Flow::Continue)
    }

    /// Sends the body back to Envoy in order; the last chunk carries `end_of_stream` unless
    /// trailers follow.
    async fn release(
        &mut self,
        d: HttpDirection,
        body: &Body,
        end_of_stream: bool,
    ) -> Result<(), Status> {
        let io = |e: std::io::Error| Status::internal(format!("reading the held body: {e}"));
        match &body.data {
            BodyData::Memory(bytes) => {
                let mut chunks = bytes.chunks(RELEASE_CHUNK).peekable();
                if chunks.peek().is_none() {
                    return self
                        .send(respond::streamed_body(d, Vec::new(), end_of_stream))
                        .await;
                }
                while let Some(chunk) = chunks.next() {
                    let last = chunks.peek().is_none();
                    self.send(respond::streamed_body(
                        d,
                        chunk.to_vec(),
                        last && end_of_stream,
                    ))
                    .await?;
                }
            }
            BodyData::Spilled(_) => {
                // From the descriptor the body was written (and hashed) through, never the
                // path: a file put in its place since the scan is not the one scanned. Plain
                // reads: the file was just written and sits in the page cache, and tokio::fs
                // would add a thread hop and a copy per chunk.
                use std::io::Read;
                let mut file = body.reader().map_err(io)?;
                let mut left = body.len;
                loop {
                    let want = (left as usize).min(RELEASE_CHUNK);
                    let mut chunk = vec![0u8; want];
                    file.read_exact(&mut chunk).map_err(io)?;
                    left -= want as u64;
                    self.send(respond::streamed_body(d, chunk, left == 0 && end_of_stream))
                        .await?;
                    if left == 0 {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}
