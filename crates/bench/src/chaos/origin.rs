//! The origin behind both Envoys: serves downloads by body name (`/files/<name>`) and records
//! every byte of every upload that reaches it, complete or not, with whether EICAR or the
//! hash-signature sample was among them. Whatever it saw of an infected body is a leak.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use sha2::{Digest, Sha256};

use super::bodies::{BodySpec, MarkerScan};

/// What reached the origin of one upload.
#[derive(Debug, Clone, Default)]
pub struct Arrival {
    pub bytes: u64,
    pub complete: bool,
    pub eicar: bool,
    pub hash_sample: bool,
}

#[derive(Default)]
struct Seen {
    /// By the request's `x-chaos-id`.
    uploads: HashMap<u64, Arrival>,
    /// Uploads without an id that carried EICAR or the sample.
    anonymous_leaks: u64,
}

pub struct Origin {
    port: u16,
    seen: Arc<Mutex<Seen>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Origin {
    pub async fn start() -> anyhow::Result<Origin> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let state = seen.clone();
        let app = Router::new()
            .route("/files/{name}", get(download))
            .fallback(any(move |headers: HeaderMap, body: Body| {
                upload(state, headers, body)
            }));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Origin {
            port,
            seen,
            _stop: stop,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn arrival(&self, id: u64) -> Option<Arrival> {
        self.seen.lock().ok()?.uploads.get(&id).cloned()
    }

    /// Bytes seen and whether the body was complete, of every upload, by id.
    pub fn arrivals(&self) -> HashMap<u64, (u64, bool)> {
        self.seen
            .lock()
            .map(|s| {
                s.uploads
                    .iter()
                    .map(|(id, a)| (*id, (a.bytes, a.complete)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Uploads with EICAR or the sample whose request carried no id.
    pub fn anonymous_leaks(&self) -> u64 {
        self.seen.lock().map(|s| s.anonymous_leaks).unwrap_or(0)
    }

    /// Every upload that carried EICAR or the hash sample, by id.
    pub fn infected_arrivals(&self) -> Vec<u64> {
        self.seen
            .lock()
            .map(|s| {
                s.uploads
                    .iter()
                    .filter(|(_, a)| a.eicar || a.hash_sample)
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default()
    }
}

async fn download(Path(name): Path<String>) -> Response {
    match BodySpec::parse(&name) {
        Some(spec) => (
            StatusCode::OK,
            [("content-type", "application/octet-stream")],
            spec.bytes(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such file\n").into_response(),
    }
}

async fn upload(seen: Arc<Mutex<Seen>>, headers: HeaderMap, body: Body) -> Response {
    use futures_util::StreamExt;
    let id = headers
        .get("x-chaos-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let sample = hex::encode(Sha256::digest(
        virus_scanner_test_support::hash_signature_sample(),
    ));
    let mut stream = body.into_data_stream();
    let mut scan = MarkerScan::default();
    let mut hasher = Sha256::new();
    let mut arrival = Arrival::default();
    let record = |arrival: &Arrival| {
        if let Ok(mut s) = seen.lock() {
            match id {
                Some(id) => {
                    s.uploads.insert(id, arrival.clone());
                }
                None if arrival.eicar || arrival.hash_sample => s.anonymous_leaks += 1,
                None => {}
            }
        }
    };
    while let Some(piece) = stream.next().await {
        match piece {
            Ok(bytes) => {
                scan.feed(&bytes);
                hasher.update(&bytes);
                arrival.bytes += bytes.len() as u64;
                arrival.eicar = scan.found;
                // Recorded as it arrives: a body cut off half-way still counts.
                record(&arrival);
            }
            Err(_) => {
                record(&arrival);
                return (StatusCode::BAD_REQUEST, "incomplete body\n").into_response();
            }
        }
    }
    arrival.complete = true;
    arrival.hash_sample = hex::encode(hasher.finalize()) == sample;
    record(&arrival);
    (
        StatusCode::OK,
        format!("received {} bytes\n", arrival.bytes),
    )
        .into_response()
}
