use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
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

/// A response the upstream sent for a registered file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub path: String,
    /// The request's `Range` header, if it had one: whether the proxy let it through.
    pub range: Option<String>,
    pub status: u16,
    pub len: u64,
    pub sha256: String,
}

/// Bytes and extra response headers of a served file.
type ServedFile = (Vec<u8>, Vec<(String, String)>);

#[derive(Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    served: Mutex<Vec<Served>>,
    files: Mutex<HashMap<String, ServedFile>>,
}

/// The origin behind Envoy: records what uploads reach it (hashed as they stream in, so
/// gigabyte uploads need no memory) and serves files registered by the test under
/// `/files/<name>` and `/safe/files/<name>`, as a real server does: with an `ETag`,
/// `Accept-Ranges: bytes`, and `Range` requests (RFC 9110 14) answered 206 with one range or
/// `multipart/byteranges` with several, honouring `If-Range`.
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

    /// Serves `bytes` at `/files/<name>` with extra response headers; a header named more
    /// than once is sent on several lines.
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

    /// Responses sent for registered files, in order.
    pub fn served(&self) -> Vec<Served> {
        self.shared.served.lock().expect("served").clone()
    }

    /// The strong `ETag` under which `bytes` are served.
    pub fn etag(bytes: &[u8]) -> String {
        format!("\"{}\"", &hex::encode(Sha256::digest(bytes))[..16])
    }
}

/// The boundary of `multipart/byteranges` answers.
const BYTERANGES_BOUNDARY: &str = "vs-upstream-byteranges";

/// The ranges of a `Range` header that `len` bytes satisfy, inclusive (RFC 9110 14.1.2).
/// `None`: not a byte-range request the server understands, so it is ignored and the whole
/// file is sent. An empty list: none is satisfiable (416).
fn byte_ranges(header: &str, len: u64) -> Option<Vec<(u64, u64)>> {
    let specs = header.trim().strip_prefix("bytes=")?;
    let mut ranges = Vec::new();
    for spec in specs.split(',') {
        let (first, last) = spec.trim().split_once('-')?;
        let range = match (first.trim(), last.trim()) {
            ("", suffix) => {
                let n: u64 = suffix.parse().ok()?;
                (n > 0 && len > 0).then(|| (len.saturating_sub(n), len - 1))
            }
            (first, "") => {
                let a: u64 = first.parse().ok()?;
                (a < len).then(|| (a, len - 1))
            }
            (first, last) => {
                let (a, b): (u64, u64) = (first.parse().ok()?, last.parse().ok()?);
                if b < a {
                    return None;
                }
                (a < len).then(|| (a, b.min(len - 1)))
            }
        };
        ranges.extend(range);
    }
    Some(ranges)
}

async fn serve_file(
    State(state): State<Arc<Shared>>,
    uri: axum::http::Uri,
    request: HeaderMap,
) -> Response {
    let name = uri.path().rsplit('/').next().unwrap_or_default().to_owned();
    let file = state.files.lock().expect("files").get(&name).cloned();
    let range = request
        .get(axum::http::header::RANGE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let response = match file {
        None => (
            StatusCode::NOT_FOUND,
            Vec::new(),
            b"no such file\n".to_vec(),
        ),
        Some((bytes, headers)) => {
            let etag = Upstream::etag(&bytes);
            let mut map: Vec<(String, String)> = vec![
                ("etag".into(), etag.clone()),
                ("accept-ranges".into(), "bytes".into()),
            ];
            let content_type = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| "application/octet-stream".into());
            // If-Range with another validator: the file changed, so send all of it.
            let if_range_holds = request
                .get(axum::http::header::IF_RANGE)
                .is_none_or(|v| v.as_bytes() == etag.as_bytes());
            let len = bytes.len() as u64;
            let ranges = range
                .as_deref()
                .filter(|_| if_range_holds)
                .and_then(|r| byte_ranges(r, len));
            match ranges.as_deref() {
                None => {
                    map.extend(headers);
                    (StatusCode::OK, map, bytes)
                }
                Some([]) => {
                    map.push(("content-range".into(), format!("bytes */{len}")));
                    (StatusCode::RANGE_NOT_SATISFIABLE, map, Vec::new())
                }
                Some(&[(a, b)]) => {
                    map.extend(headers);
                    map.push(("content-range".into(), format!("bytes {a}-{b}/{len}")));
                    let part = bytes[a as usize..=b as usize].to_vec();
                    (StatusCode::PARTIAL_CONTENT, map, part)
                }
                Some(several) => {
                    map.extend(
                        headers
                            .into_iter()
                            .filter(|(k, _)| !k.eq_ignore_ascii_case("content-type")),
                    );
                    map.push((
                        "content-type".into(),
                        format!("multipart/byteranges; boundary={BYTERANGES_BOUNDARY}"),
                    ));
                    let mut body = Vec::new();
                    for &(a, b) in several {
                        body.extend_from_slice(
                            format!(
                                "--{BYTERANGES_BOUNDARY}\r\ncontent-type: {content_type}\r\n\
                                 content-range: bytes {a}-{b}/{len}\r\n\r\n"
                            )
                            .as_bytes(),
                        );
                        body.extend_from_slice(&bytes[a as usize..=b as usize]);
                        body.extend_from_slice(b"\r\n");
                    }
                    body.extend_from_slice(format!("--{BYTERANGES_BOUNDARY}--\r\n").as_bytes());
                    (StatusCode::PARTIAL_CONTENT, map, body)
                }
            }
        }
    };
    let (status, headers, body) = response;
    state.served.lock().expect("served").push(Served {
        path: uri.path().to_owned(),
        range,
        status: status.as_u16(),
        len: body.len() as u64,
        sha256: hex::encode(Sha256::digest(&body)),
    });
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
            map.append(k, v);
        }
    }
    (status, map, body).into_response()
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
