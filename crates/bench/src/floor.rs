//! The floor of any ext_proc processor on this stack: served by the producer's own serving
//! code on one thread (`virus_scanner_producer::serve_ext_proc`), a processor that answers every
//! message with "continue" straight from the inbound stream and does nothing else. The Envoy
//! benchmark runs it as a child process (`virus-scanner-bench ext-proc-floor`) under the same
//! load as the producer; its CPU per request is what the gRPC exchanges themselves cost,
//! and the producer's excess over it is what scanning costs.

use std::pin::Pin;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeadersResponse, ProcessingRequest, ProcessingResponse,
    TrailersResponse, processing_request, processing_response,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

struct Floor;

type Answers = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for Floor {
    type ProcessStream = Answers;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Answers>, Status> {
        let answers = request.into_inner().map(|message| {
            use processing_request::Request as In;
            use processing_response::Response as Out;
            let headers = || HeadersResponse {
                response: Some(CommonResponse::default()),
            };
            let body = || BodyResponse {
                response: Some(CommonResponse::default()),
            };
            let response = match message?.request {
                Some(In::RequestHeaders(_)) => Out::RequestHeaders(headers()),
                Some(In::ResponseHeaders(_)) => Out::ResponseHeaders(headers()),
                Some(In::RequestBody(_)) => Out::RequestBody(body()),
                Some(In::ResponseBody(_)) => Out::ResponseBody(body()),
                Some(In::RequestTrailers(_)) => Out::RequestTrailers(TrailersResponse::default()),
                Some(In::ResponseTrailers(_)) => Out::ResponseTrailers(TrailersResponse::default()),
                None => {
                    return Err(Status::invalid_argument(
                        "ProcessingRequest without a request",
                    ));
                }
            };
            Ok(ProcessingResponse {
                response: Some(response),
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(answers)))
    }
}

/// Serves on a loopback port, or on `socket` when given, and logs the address it bound
/// (`floor processor listening address=...`).
pub fn serve(socket: Option<&str>) -> anyhow::Result<()> {
    use virus_scanner_producer::{GrpcListener, runtime, serve_ext_proc};
    runtime(1)?.block_on(async {
        let listener = match socket {
            Some(path) => {
                let _ = std::fs::remove_file(path);
                let unix = tokio::net::UnixListener::bind(path)?;
                tracing::info!(address = path, "floor processor listening");
                GrpcListener::Unix(unix)
            }
            None => {
                let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                tracing::info!(address = %tcp.local_addr()?, "floor processor listening");
                GrpcListener::Tcp(tcp)
            }
        };
        serve_ext_proc(Floor, 64 << 20, listener, std::future::pending()).await?;
        Ok(())
    })
}
