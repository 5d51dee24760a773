use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use sha2::{Digest, Sha256};

/// A body the upstream received in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub path: String,
    pub len: u64,
    pub sha256: String,
}

/// Bytes and extra response headers of a served file.
type ServedFile = (Vec<u8>, Vec<(String, String)>);

#[derive(Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    files: Mutex<HashMap<String, ServedFile>>,
}

/// The origin behind Envoy: records what uploads reach it (hashed as they stream in, so
/// gigabyte uploads need no memory) and serves files registered by the test under
/// `/files/<name>` and `/safe/files/<name>`.
pub struct Upstream {
    port: u16,
    shared: Arc<Shared>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Upstream {
    pub fn start() -> Upstream {
        let shared = Arc::new(Shared::default());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let state = shared.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let app = Router::new()
                    .route("/files/{name}", get(serve_file))
                    .route("/safe/files/{name}", get(serve_file))
                    .fallback(any(receive))
                    .with_state(state);
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
        });
        Upstream {
            port,
            shared,
            _stop: stop_tx,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves `bytes` at `/files/<name>` with extra response headers.
    pub fn serve(&self, name: &str, bytes: Vec<u8>, headers: &[(&str, &str)]) {
        let headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.shared
            .files
            .lock()
            .expect("files")
            .insert(name.to_owned(), (bytes, headers));
    }

    /// Uploads received in full, in order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().expect("received").clone()
    }
}

async fn serve_file(State(state): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    let file = state.files.lock().expect("files").get(&name).cloned();
    match file {
        None => (StatusCode::NOT_FOUND, "no such file\n").into_response(),
        Some((bytes, headers)) => {
            let mut map = HeaderMap::new();
            for (k, v) in headers {
                if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
                    map.insert(k, v);
                }
            }
            (StatusCode::OK, map, bytes).into_response()
        }
    }
}

async fn receive(State(state): State<Arc<Shared>>, uri: axum::http::Uri, body: Body) -> Response {
    use futures_util::StreamExt;
    let mut body = body.into_data_stream();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(bytes) => {
                hasher.update(&bytes);
                len += bytes.len() as u64;
            }
            // The client or Envoy aborted: the body never arrived in full.
            Err(_) => return (StatusCode::BAD_REQUEST, "incomplete body\n").into_response(),
        }
    }
    state.received.lock().expect("received").push(Received {
        path: uri.path().to_owned(),
        len,
        sha256: hex::encode(hasher.finalize()),
    });
    (StatusCode::OK, format!("received {len} bytes\n")).into_response()
}
