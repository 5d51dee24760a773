//! An adversarial corpus: EICAR and the hash-only sample in the forms real clients and
//! servers reassemble (content codings, byte ranges, multipart, files embedded in JSON,
//! chunked and HTTP/2 transfers, downloads), each beside a clean twin of the same shape,
//! sent through the real Envoy (BUFFERED and FULL_DUPLEX_STREAMED) and the real Squid (ICAP).
//!
//! The oracle is the project's one promise: an infected body is never delivered. An upload is
//! delivered when the upstream received it; a download when the client got a 2xx or the bytes
//! the upstream sent. The answer must be the block, or the refusal the form gets by design.
//! Every clean twin must arrive intact: a scanner that refuses everything keeps the promise
//! and is useless. One stack per configuration runs its rows in one loop that collects every
//! failure, so one run shows every broken form.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Write;

use support::{Reply, Stack, StackOptions, curl, sha256_hex, temp_file};
use virus_scanner_test_support::{
    BodyMode, EICAR, Squid, SquidOptions, Upstream, clean_bytes, hash_signature_sample,
};

/// A stack configuration; every row names the one it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// Envoy BUFFERED, the producer's defaults (`RANGE_REQUESTS=strip`, `EMBEDDED_FILES`).
    Buffered,
    /// Envoy FULL_DUPLEX_STREAMED, the producer's defaults.
    FullDuplex,
    /// `RANGE_REQUESTS=allow`: a 206 that is not the whole representation is unscannable.
    RangeAllow,
    /// `RANGE_REQUESTS=refuse`: a request with `Range` is answered 416.
    RangeRefuse,
    /// `MAX_BODY_MB=2` behind an Envoy whose buffers take 256 MiB: the producer's own limit
    /// is all that stands between a 4 MiB body and the upstream.
    SmallLimit,
    /// `ALLOW_UNSCANNABLE=true`: unknown or corrupt codings are refused all the same.
    AllowUnscannable,
    /// The real Squid with REQMOD and RESPMOD on the producer's ICAP service.
    Squid,
}

impl Setup {
    fn options(self) -> StackOptions {
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let mode = match self {
            Setup::FullDuplex => BodyMode::FullDuplexStreamed,
            _ => BodyMode::Buffered,
        };
        let mut options = StackOptions::new(mode);
        match self {
            Setup::Buffered | Setup::FullDuplex | Setup::Squid => {}
            Setup::RangeAllow => options.producer_env = env(&[("RANGE_REQUESTS", "allow")]),
            Setup::RangeRefuse => options.producer_env = env(&[("RANGE_REQUESTS", "refuse")]),
            Setup::SmallLimit => {
                options.producer_env =
                    env(&[("MAX_BODY_MB", "2"), ("SCAN_FILE_THRESHOLD_MB", "1")]);
                options.envoy_buffer_limit = Some(256 << 20);
            }
            Setup::AllowUnscannable => {
                options.producer_env = env(&[("ALLOW_UNSCANNABLE", "true")]);
            }
        }
        options
    }
}

/// What a row carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Payload {
    /// EICAR between clean bytes, `len` bytes in all; found by a body signature anywhere.
    Eicar { len: usize },
    /// The 64 KiB file that only a whole-file hash signature finds.
    HashSample,
}

const EICAR_4K: Payload = Payload::Eicar { len: 4096 };

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Infected,
    /// Same shape and length, one byte different: matches no signature.
    Clean,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::Infected => "infected",
            Variant::Clean => "clean",
        }
    }
}

/// The file a row sends, and an offset inside its signature: forms that cut the file in two
/// cut it there, so that neither piece alone matches.
struct Sample {
    bytes: Vec<u8>,
    split: usize,
}

fn sample(payload: Payload, variant: Variant) -> Sample {
    match payload {
        Payload::Eicar { len } => {
            let mut bytes = clean_bytes(len, len as u64);
            let at = (len - EICAR.len()) / 2;
            bytes[at..at + EICAR.len()].copy_from_slice(EICAR);
            if variant == Variant::Clean {
                // "STANDARD" -> "STAODARD": the signature no longer matches.
                bytes[at + 37] ^= 1;
            }
            Sample {
                bytes,
                split: at + EICAR.len() / 2,
            }
        }
        Payload::HashSample => {
            let mut bytes = hash_signature_sample();
            if variant == Variant::Clean {
                bytes[40_000] ^= 0x55;
            }
            let split = bytes.len() / 2;
            Sample { bytes, split }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    Http1,
    /// HTTP/1.1 with `Transfer-Encoding: chunked`.
    Chunked,
    /// Cleartext HTTP/2 with prior knowledge.
    Http2,
}

/// How a row's bytes travel.
enum Exchange {
    /// POSTed by the client to `/corpus/<row>/<variant>`.
    Upload {
        client: Client,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Served by the upstream under `/files/<row>--<variant>` and fetched by the client.
    Download {
        client: Client,
        served_headers: Vec<(String, String)>,
        served: Vec<u8>,
        request_headers: Vec<(String, String)>,
    },
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn upload(client: Client, headers: &[(&str, &str)], body: Vec<u8>) -> Exchange {
    let mut headers = pairs(headers);
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        headers.push(("Content-Type".into(), "application/octet-stream".into()));
    }
    Exchange::Upload {
        client,
        headers,
        body,
    }
}

fn download(served_headers: &[(&str, &str)], served: Vec<u8>) -> Exchange {
    Exchange::Download {
        client: Client::Http1,
        served_headers: pairs(served_headers),
        served,
        request_headers: Vec::new(),
    }
}

fn ranged(served: Vec<u8>, request_headers: Vec<(String, String)>) -> Exchange {
    Exchange::Download {
        client: Client::Http1,
        served_headers: Vec::new(),
        served,
        request_headers,
    }
}

fn header(name: &str, value: String) -> Vec<(String, String)> {
    vec![(name.to_owned(), value)]
}

fn with_client(exchange: Exchange, new: Client) -> Exchange {
    match exchange {
        Exchange::Upload { headers, body, .. } => Exchange::Upload {
            client: new,
            headers,
            body,
        },
        Exchange::Download {
            served_headers,
            served,
            request_headers,
            ..
        } => Exchange::Download {
            client: new,
            served_headers,
            served,
            request_headers,
        },
    }
}

/// What a row must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// One of these statuses, and the body never delivered.
    Refused(&'static [u16]),
    /// This status, and the bytes delivered intact.
    Delivered(u16),
    /// Either: the form may be refused by design.
    DeliveredOrRefused(u16, &'static [u16]),
}

/// The block: infected (ext_proc).
const BLOCKED: Expect = Expect::Refused(&[406]);
/// The block page Squid relays for an infected body (ICAP_BLOCK_STATUS).
const ICAP_BLOCKED: Expect = Expect::Refused(&[403]);
/// Unscannable, refused by design (413 `x-virus-scan: unscannable`).
const UNSCANNABLE: Expect = Expect::Refused(&[413]);
const BLOCKED_OR_UNSCANNABLE: Expect = Expect::Refused(&[406, 413]);
/// Over the producer's body limit: unscannable, or the gRPC message refused (Envoy's 5xx).
const TOO_LARGE: Expect = Expect::Refused(&[413, 500, 502, 503]);
/// `RANGE_REQUESTS=refuse`.
const RANGE_REFUSED: Expect = Expect::Refused(&[416]);
const CLEAN: Expect = Expect::Delivered(200);

struct Case {
    name: &'static str,
    setup: Setup,
    payload: Payload,
    form: fn(&Sample) -> Exchange,
    infected: Expect,
    clean: Expect,
}

fn case(
    name: &'static str,
    setup: Setup,
    payload: Payload,
    infected: Expect,
    form: fn(&Sample) -> Exchange,
) -> Case {
    Case {
        name,
        setup,
        payload,
        form,
        infected,
        clean: CLEAN,
    }
}

impl Case {
    fn clean(mut self, expect: Expect) -> Case {
        self.clean = expect;
        self
    }
}

// ---- encoders: each produces what a real client or server sends ----

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Two gzip members, cut at `split` (RFC 1952 2.2: a gzip file is a series of members).
fn gzip_members(s: &Sample) -> Vec<u8> {
    [gzip(&s.bytes[..s.split]), gzip(&s.bytes[s.split..])].concat()
}

/// `deflate` as RFC 9110 8.4.1.2 defines it: a zlib stream.
fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `deflate` as some servers send it: raw deflate without the zlib wrapper.
fn raw_deflate(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

/// A zstd skippable frame (RFC 8878 3.1.2): decoders pass over it.
fn zstd_skippable(user_data: &[u8]) -> Vec<u8> {
    let mut frame = 0x184D_2A5Au32.to_le_bytes().to_vec();
    frame.extend_from_slice(&(user_data.len() as u32).to_le_bytes());
    frame.extend_from_slice(user_data);
    frame
}

/// Two zstd frames cut at `split` (RFC 8878 3.1: a stream is a series of frames).
fn zstd_frames(s: &Sample) -> Vec<u8> {
    [zstd(&s.bytes[..s.split]), zstd(&s.bytes[s.split..])].concat()
}

/// Brotli (RFC 7932) in uncompressed meta-blocks of at most 64 KiB.
fn brotli(data: &[u8]) -> Vec<u8> {
    #[derive(Default)]
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        n: u32,
    }
    impl Bits {
        fn put(&mut self, value: u64, bits: u32) {
            self.acc |= value << self.n;
            self.n += bits;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        fn align(&mut self) {
            if self.n > 0 {
                self.out.push(self.acc as u8);
                self.acc = 0;
                self.n = 0;
            }
        }
    }
    let mut w = Bits::default();
    w.put(0, 1); // WBITS = 16
    for chunk in data.chunks(1 << 16) {
        w.put(0, 1); // ISLAST
        w.put(0, 2); // MNIBBLES = 4
        w.put((chunk.len() - 1) as u64, 16); // MLEN - 1
        w.put(1, 1); // ISUNCOMPRESSED
        w.align();
        w.out.extend_from_slice(chunk);
    }
    w.put(1, 1); // ISLAST
    w.put(1, 1); // ISLASTEMPTY
    w.align();
    w.out
}

const BASE64_STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const BASE64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64_with(data: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::with_capacity(data.len() * 4 / 3 + 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(alphabet[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

fn base64(data: &[u8]) -> String {
    base64_with(data, BASE64_STD, true)
}

/// Base64 in lines of 76 characters, as MIME writes it (RFC 2045 6.8).
fn base64_lines(data: &[u8]) -> Vec<u8> {
    let text = base64(data);
    let mut out = Vec::new();
    for line in text.as_bytes().chunks(76) {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Quoted-printable (RFC 2045 6.7) with a soft line break forced at `split`.
fn quoted_printable(data: &[u8], split: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut line = 0;
    for (i, &b) in data.iter().enumerate() {
        let token = if (33..=126).contains(&b) && b != b'=' {
            vec![b]
        } else {
            format!("={b:02X}").into_bytes()
        };
        if i == split || line + token.len() > 75 {
            out.extend_from_slice(b"=\r\n");
            line = 0;
        }
        line += token.len();
        out.extend_from_slice(&token);
    }
    out
}

/// A multipart body (RFC 2046 5.1.1): `preamble`, the parts with their header lines, the
/// close delimiter and `epilogue`. `padding` goes after the boundary on every delimiter line
/// (transport padding, which receivers must ignore).
fn multipart_with(
    boundary: &str,
    padding: &str,
    preamble: &[u8],
    parts: &[(&str, &[u8])],
    epilogue: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    if !preamble.is_empty() {
        out.extend_from_slice(preamble);
        out.extend_from_slice(b"\r\n");
    }
    for (headers, body) in parts {
        out.extend_from_slice(format!("--{boundary}{padding}\r\n{headers}\r\n\r\n").as_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--{padding}\r\n").as_bytes());
    out.extend_from_slice(epilogue);
    out
}

fn multipart(boundary: &str, parts: &[(&str, &[u8])]) -> Vec<u8> {
    multipart_with(boundary, "", b"", parts, b"")
}

const NOTE_PART: &str = "Content-Disposition: form-data; name=\"note\"";
const FILE_PART: &str = concat!(
    "Content-Disposition: form-data; name=\"file\"; filename=\"sample.bin\"\r\n",
    "Content-Type: application/octet-stream",
);
const BASE64_PART: &str = concat!(
    "Content-Disposition: form-data; name=\"file\"; filename=\"sample.bin\"\r\n",
    "Content-Type: application/octet-stream\r\n",
    "Content-Transfer-Encoding: base64",
);

/// A form with a note and the sample as its file part.
fn form_with_file(boundary: &str, s: &Sample) -> Vec<u8> {
    multipart(
        boundary,
        &[(NOTE_PART, b"hello"), (FILE_PART, s.bytes.as_slice())],
    )
}

fn json_file(value: &str) -> Vec<u8> {
    format!("{{\"name\":\"sample.bin\",\"size\":1,\"content\":\"{value}\"}}").into_bytes()
}

// ---- the corpus ----

fn corpus() -> Vec<Case> {
    use Client::{Chunked, Http1, Http2};
    use Payload::HashSample;
    use Setup::{
        AllowUnscannable, Buffered, FullDuplex, RangeAllow, RangeRefuse, SmallLimit, Squid,
    };
    vec![
        // Content-Encoding on uploads.
        case("upload-gzip", Buffered, EICAR_4K, BLOCKED, |s| {
            upload(Http1, &[("Content-Encoding", "gzip")], gzip(&s.bytes))
        }),
        case(
            "upload-gzip-two-members",
            Buffered,
            EICAR_4K,
            BLOCKED,
            |s| upload(Http1, &[("Content-Encoding", "gzip")], gzip_members(s)),
        ),
        case(
            "upload-gzip-two-members-hash",
            Buffered,
            HashSample,
            BLOCKED,
            |s| upload(Http1, &[("Content-Encoding", "gzip")], gzip_members(s)),
        ),
        case(
            "upload-gzip-file-in-first-member",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                // Readers that stop after one member (curl, Chromium) see exactly the file.
                let body = [gzip(&s.bytes), gzip(b"trailer")].concat();
                upload(Http1, &[("Content-Encoding", "gzip")], body)
            },
        ),
        case("upload-x-gzip", Buffered, HashSample, BLOCKED, |s| {
            upload(Http1, &[("Content-Encoding", "x-gzip")], gzip(&s.bytes))
        }),
        case("upload-deflate-zlib", Buffered, HashSample, BLOCKED, |s| {
            upload(Http1, &[("Content-Encoding", "deflate")], zlib(&s.bytes))
        }),
        case("upload-deflate-raw", Buffered, HashSample, BLOCKED, |s| {
            upload(
                Http1,
                &[("Content-Encoding", "deflate")],
                raw_deflate(&s.bytes),
            )
        }),
        case("upload-br", Buffered, HashSample, BLOCKED, |s| {
            upload(Http1, &[("Content-Encoding", "br")], brotli(&s.bytes))
        }),
        case("upload-br-eicar", Buffered, EICAR_4K, BLOCKED, |s| {
            upload(Http1, &[("Content-Encoding", "br")], brotli(&s.bytes))
        }),
        case("upload-zstd", Buffered, HashSample, BLOCKED, |s| {
            upload(Http1, &[("Content-Encoding", "zstd")], zstd(&s.bytes))
        }),
        case("upload-zstd-two-frames", Buffered, EICAR_4K, BLOCKED, |s| {
            upload(Http1, &[("Content-Encoding", "zstd")], zstd_frames(s))
        }),
        case(
            "upload-zstd-two-frames-hash",
            Buffered,
            HashSample,
            BLOCKED,
            |s| upload(Http1, &[("Content-Encoding", "zstd")], zstd_frames(s)),
        ),
        case(
            "upload-zstd-skippable-first",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                let body = [zstd_skippable(b"metadata"), zstd(&s.bytes)].concat();
                upload(Http1, &[("Content-Encoding", "zstd")], body)
            },
        ),
        case(
            "upload-zstd-skippable-between",
            Buffered,
            EICAR_4K,
            BLOCKED,
            |s| {
                let body = [
                    zstd(&s.bytes[..s.split]),
                    zstd_skippable(&[0u8; 16]),
                    zstd(&s.bytes[s.split..]),
                ]
                .concat();
                upload(Http1, &[("Content-Encoding", "zstd")], body)
            },
        ),
        case(
            "upload-coding-name-uppercase",
            Buffered,
            HashSample,
            BLOCKED,
            |s| upload(Http1, &[("Content-Encoding", "ZSTD")], zstd(&s.bytes)),
        ),
        case(
            "upload-stacked-gzip-br",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                upload(
                    Http1,
                    &[("Content-Encoding", "gzip, br")],
                    brotli(&gzip(&s.bytes)),
                )
            },
        ),
        case(
            "upload-stacked-two-header-lines",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                upload(
                    Http1,
                    &[
                        ("Content-Encoding", "deflate"),
                        ("Content-Encoding", "zstd"),
                    ],
                    zstd(&zlib(&s.bytes)),
                )
            },
        ),
        case(
            "upload-stacked-mixed-case",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                upload(
                    Http1,
                    &[("Content-Encoding", "Deflate ,  BR")],
                    brotli(&raw_deflate(&s.bytes)),
                )
            },
        ),
        case(
            "upload-unknown-coding",
            Buffered,
            EICAR_4K,
            UNSCANNABLE,
            |s| {
                upload(
                    Http1,
                    &[("Content-Encoding", "x-vs-unknown")],
                    s.bytes.clone(),
                )
            },
        )
        .clean(UNSCANNABLE),
        case(
            "upload-corrupt-zstd",
            Buffered,
            HashSample,
            UNSCANNABLE,
            |s| {
                // A frame header, then the file raw.
                let body = [&zstd(b"")[..6], &s.bytes[..]].concat();
                upload(Http1, &[("Content-Encoding", "zstd")], body)
            },
        )
        .clean(UNSCANNABLE),
        case(
            "upload-truncated-gzip",
            Buffered,
            EICAR_4K,
            BLOCKED_OR_UNSCANNABLE,
            |s| {
                // No trailer: a lenient decoder yields the file, a strict one refuses.
                let whole = gzip(&s.bytes);
                upload(
                    Http1,
                    &[("Content-Encoding", "gzip")],
                    whole[..whole.len() - 8].to_vec(),
                )
            },
        )
        .clean(UNSCANNABLE),
        // multipart/* uploads.
        case(
            "multipart-file-part-hash",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                let body = form_with_file("vs-corpus-Boundary", s);
                upload(
                    Http1,
                    &[(
                        "Content-Type",
                        "multipart/form-data; boundary=vs-corpus-Boundary",
                    )],
                    body,
                )
            },
        ),
        case(
            "multipart-quoted-boundary",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                let body = form_with_file("vs corpus:=?b", s);
                upload(
                    Http1,
                    &[(
                        "Content-Type",
                        "multipart/form-data; boundary=\"vs corpus:=?b\"",
                    )],
                    body,
                )
            },
        ),
        case(
            "multipart-boundary-inside-quoted-param",
            Buffered,
            HashSample,
            BLOCKED_OR_UNSCANNABLE,
            |s| {
                // RFC 2045 5.1: `boundary=A;` is inside x's quoted string; the boundary is B.
                // A parser that splits on ';' first takes A, finds no part and scans the body
                // whole, where the hash-only file does not match. Refusing the shape is as
                // safe as using B.
                let body = form_with_file("B", s);
                upload(
                    Http1,
                    &[(
                        "Content-Type",
                        "multipart/form-data; x=\"; boundary=A;\"; boundary=B",
                    )],
                    body,
                )
            },
        )
        .clean(Expect::DeliveredOrRefused(200, &[413])),
        case(
            "multipart-duplicate-boundary-first-used",
            Buffered,
            HashSample,
            BLOCKED_OR_UNSCANNABLE,
            |s| {
                let body = form_with_file("first", s);
                upload(
                    Http1,
                    &[(
                        "Content-Type",
                        "multipart/form-data; boundary=first; boundary=second",
                    )],
                    body,
                )
            },
        )
        .clean(Expect::DeliveredOrRefused(200, &[413])),
        case(
            "multipart-duplicate-boundary-last-used",
            Buffered,
            HashSample,
            BLOCKED_OR_UNSCANNABLE,
            |s| {
                let body = form_with_file("second", s);
                upload(
                    Http1,
                    &[(
                        "Content-Type",
                        "multipart/form-data; boundary=first; boundary=second",
                    )],
                    body,
                )
            },
        )
        .clean(Expect::DeliveredOrRefused(200, &[413])),
        // No client sends text around the parts of a form, and Django reads a preamble shaped
        // like a part as a file of its own: form-data with a preamble or an epilogue is
        // refused, clean or not (multipart/mixed ones are scanned, below).
        case("multipart-preamble", Buffered, EICAR_4K, UNSCANNABLE, |s| {
            let body = multipart_with("pre", "", &s.bytes, &[(NOTE_PART, b"hello")], b"");
            upload(
                Http1,
                &[("Content-Type", "multipart/form-data; boundary=pre")],
                body,
            )
        })
        .clean(UNSCANNABLE),
        case(
            "multipart-mixed-preamble-hash",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                // The preamble is exactly the file: scanned as a file of its own, the hash matches.
                let body = multipart_with(
                    "pre",
                    "",
                    &s.bytes,
                    &[("Content-Type: text/plain", b"hi")],
                    b"",
                );
                upload(
                    Http1,
                    &[("Content-Type", "multipart/mixed; boundary=pre")],
                    body,
                )
            },
        ),
        case("multipart-epilogue", Buffered, EICAR_4K, UNSCANNABLE, |s| {
            let body = multipart_with("epi", "", b"", &[(NOTE_PART, b"hello")], &s.bytes);
            upload(
                Http1,
                &[("Content-Type", "multipart/form-data; boundary=epi")],
                body,
            )
        })
        .clean(UNSCANNABLE),
        case(
            "multipart-base64-part-hash",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                let body = multipart(
                    "b64",
                    &[
                        (NOTE_PART, b"hello"),
                        (BASE64_PART, &base64_lines(&s.bytes)),
                    ],
                );
                upload(
                    Http1,
                    &[("Content-Type", "multipart/form-data; boundary=b64")],
                    body,
                )
            },
        ),
        case(
            "multipart-base64-part-eicar",
            Buffered,
            EICAR_4K,
            BLOCKED,
            |s| {
                let body = multipart("b64", &[(BASE64_PART, &base64_lines(&s.bytes))]);
                upload(
                    Http1,
                    &[("Content-Type", "multipart/mixed; boundary=b64")],
                    body,
                )
            },
        ),
        case(
            "multipart-quoted-printable-part",
            Buffered,
            EICAR_4K,
            BLOCKED,
            |s| {
                let headers =
                    "Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable";
                let body = multipart("qp", &[(headers, &quoted_printable(&s.bytes, s.split))]);
                upload(
                    Http1,
                    &[("Content-Type", "multipart/mixed; boundary=qp")],
                    body,
                )
            },
        ),
        case("multipart-nested", Buffered, HashSample, BLOCKED, |s| {
            let inner = multipart("inner", &[(FILE_PART, s.bytes.as_slice())]);
            let body = multipart(
                "outer",
                &[
                    (NOTE_PART, b"hello"),
                    (
                        "Content-Disposition: form-data; name=\"files\"\r\nContent-Type: multipart/mixed; boundary=inner",
                        &inner,
                    ),
                ],
            );
            upload(
                Http1,
                &[("Content-Type", "multipart/form-data; boundary=outer")],
                body,
            )
        }),
        case(
            "multipart-nested-base64",
            Buffered,
            EICAR_4K,
            BLOCKED,
            |s| {
                let inner = multipart("inner", &[(BASE64_PART, &base64_lines(&s.bytes))]);
                let body = multipart(
                    "outer",
                    &[("Content-Type: multipart/mixed; boundary=\"inner\"", &inner)],
                );
                upload(
                    Http1,
                    &[("Content-Type", "multipart/mixed; boundary=outer")],
                    body,
                )
            },
        ),
        case(
            "multipart-gzip-encoded",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                let body = gzip(&form_with_file("gz", s));
                upload(
                    Http1,
                    &[
                        ("Content-Type", "multipart/form-data; boundary=gz"),
                        ("Content-Encoding", "gzip"),
                    ],
                    body,
                )
            },
        ),
        case(
            "multipart-uppercase-params",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                let body = form_with_file("UP", s);
                upload(
                    Http1,
                    &[("Content-Type", "Multipart/Form-Data; BOUNDARY=\"UP\"")],
                    body,
                )
            },
        ),
        case(
            "multipart-transport-padding",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                let body = multipart_with(
                    "pad",
                    " \t ",
                    b"",
                    &[(NOTE_PART, b"hello"), (FILE_PART, &s.bytes)],
                    b"",
                );
                upload(
                    Http1,
                    &[("Content-Type", "multipart/form-data; boundary=pad")],
                    body,
                )
            },
        ),
        // Files embedded in JSON.
        case("json-base64", Buffered, HashSample, BLOCKED, |s| {
            upload(
                Http1,
                &[("Content-Type", "application/json")],
                json_file(&base64(&s.bytes)),
            )
        }),
        case(
            "json-base64url-unpadded",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                let value = base64_with(&s.bytes, BASE64_URL, false);
                upload(
                    Http1,
                    &[("Content-Type", "application/json")],
                    json_file(&value),
                )
            },
        ),
        case("json-data-url", Buffered, HashSample, BLOCKED, |s| {
            let value = format!("data:application/octet-stream;base64,{}", base64(&s.bytes));
            upload(
                Http1,
                &[("Content-Type", "application/json")],
                json_file(&value),
            )
        }),
        case(
            "json-plus-json-nested-eicar",
            Buffered,
            EICAR_4K,
            BLOCKED,
            |s| {
                let body = format!(
                    "{{\"data\":{{\"attributes\":{{\"files\":[{{\"b\":\"{}\"}}]}}}}}}",
                    base64(&s.bytes)
                );
                upload(
                    Http1,
                    &[("Content-Type", "application/vnd.api+json; charset=utf-8")],
                    body.into_bytes(),
                )
            },
        ),
        case("json-escaped-slashes", Buffered, HashSample, BLOCKED, |s| {
            // PHP's json_encode writes "/" as "\/"; every JSON parser reads it back.
            let value = base64(&s.bytes).replace('/', "\\/");
            upload(
                Http1,
                &[("Content-Type", "application/json")],
                json_file(&value),
            )
        }),
        case("json-unicode-escapes", Buffered, HashSample, BLOCKED, |s| {
            let value = base64(&s.bytes).replace('A', "\\u0041");
            upload(
                Http1,
                &[("Content-Type", "application/json")],
                json_file(&value),
            )
        }),
        case("json-gzip-encoded", Buffered, HashSample, BLOCKED, |s| {
            let body = gzip(&json_file(&base64(&s.bytes)));
            upload(
                Http1,
                &[
                    ("Content-Type", "application/json"),
                    ("Content-Encoding", "gzip"),
                ],
                body,
            )
        }),
        // Transfers.
        case(
            "chunked-upload-zstd-two-frames",
            Buffered,
            EICAR_4K,
            BLOCKED,
            |s| upload(Chunked, &[("Content-Encoding", "zstd")], zstd_frames(s)),
        ),
        case(
            "chunked-upload-multipart-base64",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                let body = multipart("b64", &[(BASE64_PART, &base64_lines(&s.bytes))]);
                upload(
                    Chunked,
                    &[("Content-Type", "multipart/form-data; boundary=b64")],
                    body,
                )
            },
        ),
        case(
            "h2-upload-gzip-two-members",
            Buffered,
            HashSample,
            BLOCKED,
            |s| upload(Http2, &[("Content-Encoding", "gzip")], gzip_members(s)),
        ),
        case(
            "h2-upload-two-coding-fields",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                upload(
                    Http2,
                    &[("Content-Encoding", "gzip"), ("Content-Encoding", "br")],
                    brotli(&gzip(&s.bytes)),
                )
            },
        ),
        case(
            "h2-upload-json-base64",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                upload(
                    Http2,
                    &[("Content-Type", "application/json")],
                    json_file(&base64(&s.bytes)),
                )
            },
        ),
        // Downloads.
        case(
            "download-gzip-two-members",
            Buffered,
            HashSample,
            BLOCKED,
            |s| download(&[("Content-Encoding", "gzip")], gzip_members(s)),
        ),
        case(
            "download-gzip-file-in-first-member",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                download(
                    &[("Content-Encoding", "gzip")],
                    [gzip(&s.bytes), gzip(b"trailer")].concat(),
                )
            },
        ),
        case(
            "download-zstd-two-frames",
            Buffered,
            EICAR_4K,
            BLOCKED,
            |s| download(&[("Content-Encoding", "zstd")], zstd_frames(s)),
        ),
        case(
            "download-zstd-skippable-first",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                let body = [zstd_skippable(b"metadata"), zstd(&s.bytes)].concat();
                download(&[("Content-Encoding", "zstd")], body)
            },
        ),
        case("download-br", Buffered, HashSample, BLOCKED, |s| {
            download(&[("Content-Encoding", "br")], brotli(&s.bytes))
        }),
        case("download-deflate-raw", Buffered, HashSample, BLOCKED, |s| {
            download(&[("Content-Encoding", "deflate")], raw_deflate(&s.bytes))
        }),
        case(
            "download-two-coding-lines",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                download(
                    &[("Content-Encoding", "gzip"), ("Content-Encoding", "br")],
                    brotli(&gzip(&s.bytes)),
                )
            },
        ),
        case(
            "download-x-gzip-uppercase",
            Buffered,
            HashSample,
            BLOCKED,
            |s| download(&[("Content-Encoding", "X-GZIP")], gzip(&s.bytes)),
        ),
        case(
            "download-unknown-coding",
            Buffered,
            EICAR_4K,
            UNSCANNABLE,
            |s| download(&[("Content-Encoding", "x-vs-unknown")], s.bytes.clone()),
        )
        .clean(UNSCANNABLE),
        case("download-json-base64", Buffered, HashSample, BLOCKED, |s| {
            download(
                &[("Content-Type", "application/json")],
                json_file(&base64(&s.bytes)),
            )
        }),
        case(
            "download-h2-zstd-two-frames",
            Buffered,
            HashSample,
            BLOCKED,
            |s| {
                with_client(
                    download(&[("Content-Encoding", "zstd")], zstd_frames(s)),
                    Http2,
                )
            },
        ),
        // Byte ranges, RANGE_REQUESTS=strip: the whole file is fetched and scanned.
        case("range-first-half", Buffered, EICAR_4K, BLOCKED, |s| {
            ranged(
                s.bytes.clone(),
                header("Range", format!("bytes=0-{}", s.split - 1)),
            )
        }),
        case("range-second-half", Buffered, EICAR_4K, BLOCKED, |s| {
            ranged(
                s.bytes.clone(),
                header("Range", format!("bytes={}-", s.split)),
            )
        }),
        case("range-if-range-etag", Buffered, EICAR_4K, BLOCKED, |s| {
            let etag = Upstream::etag(&s.bytes);
            let range = format!("bytes=0-{}", s.split - 1);
            let mut headers = header("Range", range);
            headers.extend(header("If-Range", etag));
            ranged(s.bytes.clone(), headers)
        }),
        case("range-suffix-hash", Buffered, HashSample, BLOCKED, |s| {
            let range = format!("bytes=-{}", s.bytes.len() - s.split);
            ranged(s.bytes.clone(), header("Range", range))
        }),
        case(
            "range-two-ranges-byteranges",
            Buffered,
            EICAR_4K,
            BLOCKED,
            |s| {
                let range = format!("bytes=0-{},{}-", s.split - 1, s.split);
                ranged(s.bytes.clone(), header("Range", range))
            },
        ),
        // RANGE_REQUESTS=allow: a partial 206 is unscannable.
        case(
            "allow-range-first-half",
            RangeAllow,
            EICAR_4K,
            UNSCANNABLE,
            |s| {
                ranged(
                    s.bytes.clone(),
                    header("Range", format!("bytes=0-{}", s.split - 1)),
                )
            },
        )
        .clean(UNSCANNABLE),
        case(
            "allow-range-second-half",
            RangeAllow,
            EICAR_4K,
            UNSCANNABLE,
            |s| {
                ranged(
                    s.bytes.clone(),
                    header("Range", format!("bytes={}-", s.split)),
                )
            },
        )
        .clean(UNSCANNABLE),
        case(
            "allow-range-byteranges-covering-all",
            RangeAllow,
            EICAR_4K,
            BLOCKED_OR_UNSCANNABLE,
            |s| {
                // Two parts of multipart/byteranges, EICAR cut between them.
                let range = format!("bytes=0-{},{}-", s.split - 1, s.split);
                ranged(s.bytes.clone(), header("Range", range))
            },
        )
        .clean(Expect::DeliveredOrRefused(206, &[413])),
        case(
            "allow-range-whole-file",
            RangeAllow,
            EICAR_4K,
            BLOCKED,
            |s| ranged(s.bytes.clone(), header("Range", "bytes=0-".into())),
        )
        .clean(Expect::Delivered(206)),
        // RANGE_REQUESTS=refuse.
        case(
            "refuse-range-first-half",
            RangeRefuse,
            EICAR_4K,
            RANGE_REFUSED,
            |s| {
                ranged(
                    s.bytes.clone(),
                    header("Range", format!("bytes=0-{}", s.split - 1)),
                )
            },
        )
        .clean(RANGE_REFUSED),
        case(
            "refuse-range-no-range-header",
            RangeRefuse,
            EICAR_4K,
            BLOCKED,
            |s| ranged(s.bytes.clone(), Vec::new()),
        ),
        // Over MAX_BODY_MB behind a 256 MiB Envoy buffer.
        case(
            "oversized-upload",
            SmallLimit,
            Payload::Eicar { len: 4 << 20 },
            TOO_LARGE,
            |s| upload(Http1, &[], s.bytes.clone()),
        )
        .clean(TOO_LARGE),
        case(
            "oversized-upload-h2",
            SmallLimit,
            Payload::Eicar { len: 4 << 20 },
            TOO_LARGE,
            |s| upload(Http2, &[], s.bytes.clone()),
        )
        .clean(TOO_LARGE),
        case(
            "oversized-download",
            SmallLimit,
            Payload::Eicar { len: 4 << 20 },
            TOO_LARGE,
            |s| download(&[], s.bytes.clone()),
        )
        .clean(TOO_LARGE),
        case(
            "under-limit-upload",
            SmallLimit,
            Payload::Eicar { len: 1 << 20 },
            BLOCKED,
            |s| upload(Http1, &[], s.bytes.clone()),
        ),
        // ALLOW_UNSCANNABLE=true does not pass what cannot be decoded.
        case(
            "allow-unscannable-unknown-coding",
            AllowUnscannable,
            EICAR_4K,
            UNSCANNABLE,
            |s| {
                upload(
                    Http1,
                    &[("Content-Encoding", "x-vs-unknown")],
                    s.bytes.clone(),
                )
            },
        )
        .clean(UNSCANNABLE),
        case(
            "allow-unscannable-corrupt-zstd",
            AllowUnscannable,
            HashSample,
            UNSCANNABLE,
            |s| {
                let body = [&zstd(b"")[..6], &s.bytes[..]].concat();
                upload(Http1, &[("Content-Encoding", "zstd")], body)
            },
        )
        .clean(UNSCANNABLE),
        case(
            "allow-unscannable-unknown-coding-download",
            AllowUnscannable,
            EICAR_4K,
            UNSCANNABLE,
            |s| download(&[("Content-Encoding", "compress")], s.bytes.clone()),
        )
        .clean(UNSCANNABLE),
        case(
            "allow-unscannable-valid-zstd",
            AllowUnscannable,
            HashSample,
            BLOCKED,
            |s| upload(Http1, &[("Content-Encoding", "zstd")], zstd_frames(s)),
        ),
        // FULL_DUPLEX_STREAMED.
        case(
            "fd-upload-gzip-two-members",
            FullDuplex,
            EICAR_4K,
            BLOCKED,
            |s| upload(Http1, &[("Content-Encoding", "gzip")], gzip_members(s)),
        ),
        case(
            "fd-upload-zstd-skippable-first",
            FullDuplex,
            HashSample,
            BLOCKED,
            |s| {
                let body = [zstd_skippable(b"metadata"), zstd(&s.bytes)].concat();
                upload(Http1, &[("Content-Encoding", "zstd")], body)
            },
        ),
        case(
            "fd-upload-multipart-base64",
            FullDuplex,
            HashSample,
            BLOCKED,
            |s| {
                let body = multipart(
                    "b64",
                    &[
                        (NOTE_PART, b"hello"),
                        (BASE64_PART, &base64_lines(&s.bytes)),
                    ],
                );
                upload(
                    Http1,
                    &[("Content-Type", "multipart/form-data; boundary=b64")],
                    body,
                )
            },
        ),
        case(
            "fd-upload-json-base64",
            FullDuplex,
            HashSample,
            BLOCKED,
            |s| {
                upload(
                    Http1,
                    &[("Content-Type", "application/json")],
                    json_file(&base64(&s.bytes)),
                )
            },
        ),
        case(
            "fd-chunked-upload-br",
            FullDuplex,
            HashSample,
            BLOCKED,
            |s| upload(Chunked, &[("Content-Encoding", "br")], brotli(&s.bytes)),
        ),
        case(
            "fd-h2-upload-two-coding-fields",
            FullDuplex,
            HashSample,
            BLOCKED,
            |s| {
                upload(
                    Http2,
                    &[
                        ("Content-Encoding", "deflate"),
                        ("Content-Encoding", "zstd"),
                    ],
                    zstd(&zlib(&s.bytes)),
                )
            },
        ),
        case(
            "fd-download-zstd-two-frames",
            FullDuplex,
            EICAR_4K,
            BLOCKED,
            |s| download(&[("Content-Encoding", "zstd")], zstd_frames(s)),
        ),
        case(
            "fd-download-two-coding-lines",
            FullDuplex,
            HashSample,
            BLOCKED,
            |s| {
                download(
                    &[("Content-Encoding", "gzip"), ("Content-Encoding", "br")],
                    brotli(&gzip(&s.bytes)),
                )
            },
        ),
        case("fd-range-first-half", FullDuplex, EICAR_4K, BLOCKED, |s| {
            ranged(
                s.bytes.clone(),
                header("Range", format!("bytes=0-{}", s.split - 1)),
            )
        }),
        // ICAP through the real Squid (RESPMOD bodies under 64 KiB: Squid bug 5352).
        case(
            "icap-reqmod-gzip-two-members",
            Squid,
            EICAR_4K,
            ICAP_BLOCKED,
            |s| upload(Http1, &[("Content-Encoding", "gzip")], gzip_members(s)),
        ),
        case(
            "icap-reqmod-gzip-hash",
            Squid,
            HashSample,
            ICAP_BLOCKED,
            |s| upload(Http1, &[("Content-Encoding", "gzip")], gzip(&s.bytes)),
        ),
        case(
            "icap-reqmod-two-coding-lines",
            Squid,
            HashSample,
            ICAP_BLOCKED,
            |s| {
                upload(
                    Http1,
                    &[("Content-Encoding", "gzip"), ("Content-Encoding", "br")],
                    brotli(&gzip(&s.bytes)),
                )
            },
        ),
        case(
            "icap-reqmod-multipart-base64",
            Squid,
            HashSample,
            ICAP_BLOCKED,
            |s| {
                let body = multipart(
                    "b64",
                    &[
                        (NOTE_PART, b"hello"),
                        (BASE64_PART, &base64_lines(&s.bytes)),
                    ],
                );
                upload(
                    Http1,
                    &[("Content-Type", "multipart/form-data; boundary=b64")],
                    body,
                )
            },
        ),
        case(
            "icap-reqmod-json-base64",
            Squid,
            HashSample,
            ICAP_BLOCKED,
            |s| {
                upload(
                    Http1,
                    &[("Content-Type", "application/json")],
                    json_file(&base64(&s.bytes)),
                )
            },
        ),
        case(
            "icap-reqmod-chunked-zstd-skippable",
            Squid,
            HashSample,
            ICAP_BLOCKED,
            |s| {
                let body = [zstd_skippable(b"metadata"), zstd(&s.bytes)].concat();
                upload(Chunked, &[("Content-Encoding", "zstd")], body)
            },
        ),
        case(
            "icap-respmod-zstd-two-frames",
            Squid,
            EICAR_4K,
            ICAP_BLOCKED,
            |s| download(&[("Content-Encoding", "zstd")], zstd_frames(s)),
        ),
        case(
            "icap-respmod-zstd-two-frames-hash",
            Squid,
            HashSample,
            ICAP_BLOCKED,
            |s| download(&[("Content-Encoding", "zstd")], zstd_frames(s)),
        ),
        case(
            "icap-respmod-two-coding-lines",
            Squid,
            HashSample,
            ICAP_BLOCKED,
            |s| {
                download(
                    &[("Content-Encoding", "gzip"), ("Content-Encoding", "br")],
                    brotli(&gzip(&s.bytes)),
                )
            },
        ),
        case(
            "icap-respmod-deflate-raw",
            Squid,
            HashSample,
            ICAP_BLOCKED,
            |s| {
                download(
                    &[
                        ("Content-Encoding", "deflate"),
                        ("Content-Type", "application/octet-stream"),
                    ],
                    raw_deflate(&s.bytes),
                )
            },
        ),
    ]
}

// ---- the driver ----

/// Where the client sends its requests.
enum Target {
    Envoy(String),
    /// Through Squid, to the upstream as the origin.
    Proxy {
        proxy: String,
        origin: String,
    },
}

impl Target {
    fn url(&self, path: &str) -> String {
        match self {
            Target::Envoy(base) => format!("{base}{path}"),
            Target::Proxy { origin, .. } => format!("{origin}{path}"),
        }
    }
}

struct Verdict {
    passed: bool,
    line: String,
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(160)]);
    text.replace(['\r', '\n'], " ")
}

fn run_exchange(
    stack: &Stack,
    target: &Target,
    files: &tempfile::TempDir,
    case: &Case,
    variant: Variant,
) -> Verdict {
    let sample = sample(case.payload, variant);
    let expect = match variant {
        Variant::Infected => case.infected,
        Variant::Clean => case.clean,
    };
    let exchange = (case.form)(&sample);
    let id = format!("{}--{}", case.name, variant.label());
    let mut args: Vec<String> = vec!["--max-time".into(), "60".into()];
    if let Target::Proxy { proxy, .. } = target {
        args.extend(["-x".into(), proxy.clone()]);
    }
    let client = match &exchange {
        Exchange::Upload { client, .. } | Exchange::Download { client, .. } => *client,
    };
    match client {
        Client::Http1 => {}
        Client::Chunked => args.extend(["-H".into(), "Transfer-Encoding: chunked".into()]),
        Client::Http2 => args.push("--http2-prior-knowledge".into()),
    }
    let path = match &exchange {
        Exchange::Upload { headers, body, .. } => {
            let file = temp_file(files, &id, body);
            for (k, v) in headers {
                args.extend(["-H".into(), format!("{k}: {v}")]);
            }
            args.extend([
                "-X".into(),
                "POST".into(),
                "--data-binary".into(),
                format!("@{}", file.display()),
            ]);
            format!("/corpus/{}/{}", case.name, variant.label())
        }
        Exchange::Download {
            served_headers,
            served,
            request_headers,
            ..
        } => {
            let headers: Vec<(&str, &str)> = served_headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            stack.upstream.serve(&id, served.clone(), &headers);
            for (k, v) in request_headers {
                args.extend(["-H".into(), format!("{k}: {v}")]);
            }
            format!("/files/{id}")
        }
    };
    args.push(target.url(&path));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let reply = curl(&argv);
    judge(stack, case, variant, expect, &exchange, &path, &reply)
}

/// Whether the bytes got through, whether they arrived intact, and what the upstream saw.
fn judge(
    stack: &Stack,
    case: &Case,
    variant: Variant,
    expect: Expect,
    exchange: &Exchange,
    path: &str,
    reply: &Reply,
) -> Verdict {
    let success = (200..300).contains(&reply.status);
    let (delivered, intact, upstream) = match exchange {
        Exchange::Upload { body, .. } => {
            let got: Vec<_> = stack
                .upstream
                .received()
                .into_iter()
                .filter(|r| r.path == path)
                .collect();
            let intact = got.len() == 1
                && got[0].len == body.len() as u64
                && got[0].sha256 == sha256_hex(body);
            let seen = format!("upstream received it {} time(s)", got.len());
            (!got.is_empty(), intact, seen)
        }
        Exchange::Download { served, .. } => {
            let sent: Vec<_> = stack
                .upstream
                .served()
                .into_iter()
                .filter(|s| s.path == path)
                .collect();
            let body_sha = sha256_hex(&reply.body);
            let got_sent_bytes =
                !reply.body.is_empty() && sent.iter().any(|s| s.sha256 == body_sha);
            let delivered = success
                || got_sent_bytes
                || contains(&reply.body, served)
                || (variant == Variant::Infected && contains(&reply.body, EICAR));
            let intact = success && sent.last().is_some_and(|s| s.sha256 == body_sha);
            let seen = sent
                .iter()
                .map(|s| format!("{} (range {:?}, {} bytes)", s.status, s.range, s.len))
                .collect::<Vec<_>>()
                .join(", ");
            (delivered, intact, format!("upstream answered [{seen}]"))
        }
    };
    let refused_ok = |allowed: &[u16]| !delivered && allowed.contains(&reply.status);
    let delivered_ok = |status: u16| reply.status == status && intact;
    let passed = match expect {
        Expect::Refused(allowed) => refused_ok(allowed),
        Expect::Delivered(status) => delivered_ok(status),
        Expect::DeliveredOrRefused(status, allowed) => delivered_ok(status) || refused_ok(allowed),
    };
    let class = if passed {
        "ok"
    } else if variant == Variant::Infected && delivered {
        "INFECTED DELIVERED"
    } else if variant == Variant::Clean && !delivered {
        "FALSE POSITIVE"
    } else if delivered && !intact {
        "ALTERED"
    } else {
        "WRONG ANSWER"
    };
    let line = format!(
        "{class}: {:?} {} [{}]: expected {expect:?}, got {} (x-virus-scan {:?}, x-virus-name {:?}){}; {upstream}; body: {}",
        case.setup,
        case.name,
        variant.label(),
        reply.status,
        reply.header("x-virus-scan").unwrap_or("-"),
        reply.header("x-virus-name").unwrap_or("-"),
        if reply.error.is_empty() {
            String::new()
        } else {
            format!(", curl: {}", reply.error.trim())
        },
        snippet(&reply.body),
    );
    Verdict { passed, line }
}

/// Runs every row of `setup` on one stack and fails with all the failures at once.
fn run(setup: Setup) {
    let cases: Vec<Case> = corpus().into_iter().filter(|c| c.setup == setup).collect();
    assert!(!cases.is_empty(), "no rows for {setup:?}");
    let stack = Stack::start(setup.options());
    let squid = (setup == Setup::Squid).then(|| {
        Squid::start(&SquidOptions {
            icap_port: stack.icap_port,
            icap_service: "/avscan".to_owned(),
            bump_ca: None,
            origin_ca: None,
        })
    });
    let target = match &squid {
        Some(squid) => Target::Proxy {
            proxy: squid.proxy_url(),
            origin: format!("http://127.0.0.1:{}", stack.upstream.port()),
        },
        None => Target::Envoy(stack.url("")),
    };
    let files = tempfile::tempdir().unwrap();
    let mut verdicts = Vec::new();
    let mut blocked_uploads = Vec::new();
    for case in &cases {
        for variant in [Variant::Infected, Variant::Clean] {
            let verdict = run_exchange(&stack, &target, &files, case, variant);
            if variant == Variant::Infected && verdict.passed {
                blocked_uploads.push(format!("/corpus/{}/{}", case.name, variant.label()));
            }
            verdicts.push(verdict);
        }
    }
    // An infected upload that arrived after its answer is delivered all the same.
    let received = stack.upstream.received();
    for path in blocked_uploads {
        if received.iter().any(|r| r.path == path) {
            verdicts.push(Verdict {
                passed: false,
                line: format!(
                    "INFECTED DELIVERED: {setup:?} {path} reached the upstream after its answer"
                ),
            });
        }
    }
    let failed: Vec<&str> = verdicts
        .iter()
        .filter(|v| !v.passed)
        .map(|v| v.line.as_str())
        .collect();
    eprintln!(
        "corpus {setup:?}: {} of {} exchanges passed\n{}",
        verdicts.len() - failed.len(),
        verdicts.len(),
        verdicts
            .iter()
            .map(|v| v.line.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    if let Some(squid) = &squid
        && !failed.is_empty()
    {
        eprintln!("{}", squid.log_tail());
    }
    assert!(
        failed.is_empty(),
        "{} of {} exchanges failed on {setup:?}:\n{}",
        failed.len(),
        verdicts.len(),
        failed.join("\n")
    );
}

#[test]
fn corpus_through_buffered_envoy() {
    run(Setup::Buffered);
}

#[test]
fn corpus_through_full_duplex_envoy() {
    run(Setup::FullDuplex);
}

#[test]
fn corpus_with_range_requests_allowed() {
    run(Setup::RangeAllow);
}

#[test]
fn corpus_with_range_requests_refused() {
    run(Setup::RangeRefuse);
}

#[test]
fn corpus_over_the_body_limit_behind_large_envoy_buffers() {
    run(Setup::SmallLimit);
}

#[test]
fn corpus_with_unscannable_bodies_allowed() {
    run(Setup::AllowUnscannable);
}

#[test]
fn corpus_through_squid_icap() {
    run(Setup::Squid);
}

#[test]
fn corpus_has_forty_forms_with_unique_names() {
    let cases = corpus();
    assert!(cases.len() >= 40, "{} rows", cases.len());
    let mut names: Vec<&str> = cases.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "row names repeat");
}

/// The corpus is only as good as its encodings: what its encoders write, real decoders
/// (curl's zlib, brotli and zstd; Python's gzip, base64 and quopri) turn back into the file.
#[test]
fn corpus_encodings_are_what_real_decoders_read() {
    let upstream = Upstream::start();
    let s = sample(Payload::HashSample, Variant::Infected);
    let encoded = vec![
        ("br", vec![("content-encoding", "br")], brotli(&s.bytes)),
        (
            "zstd-frames",
            vec![("content-encoding", "zstd")],
            zstd_frames(&s),
        ),
        (
            "zstd-skippable",
            vec![("content-encoding", "zstd")],
            [
                zstd_skippable(b"m"),
                zstd(&s.bytes[..s.split]),
                zstd_skippable(&[0; 16]),
                zstd(&s.bytes[s.split..]),
            ]
            .concat(),
        ),
        (
            "deflate-raw",
            vec![("content-encoding", "deflate")],
            raw_deflate(&s.bytes),
        ),
        (
            "deflate-zlib",
            vec![("content-encoding", "deflate")],
            zlib(&s.bytes),
        ),
        (
            "two-lines",
            vec![
                ("content-encoding", "deflate"),
                ("content-encoding", "zstd"),
            ],
            zstd(&zlib(&s.bytes)),
        ),
        (
            "mixed-case",
            vec![("content-encoding", "Deflate ,  BR")],
            brotli(&raw_deflate(&s.bytes)),
        ),
    ];
    for (name, headers, bytes) in encoded {
        upstream.serve(name, bytes, &headers);
        let r = curl(&[
            "--compressed",
            &format!("http://127.0.0.1:{}/files/{name}", upstream.port()),
        ]);
        assert_eq!(r.status, 200, "{name}: {}", r.error);
        assert!(
            r.body == s.bytes,
            "{name}: curl decoded {} bytes",
            r.body.len()
        );
    }
    let python = |script: &str, input: &[u8]| -> Vec<u8> {
        let mut child = std::process::Command::new("python3")
            .args(["-c", &format!("import sys; {script}")])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "python3 {script}");
        out.stdout
    };
    let out = "sys.stdout.buffer.write";
    let gz = python(
        &format!("import gzip; {out}(gzip.decompress(sys.stdin.buffer.read()))"),
        &gzip_members(&s),
    );
    assert!(gz == s.bytes, "gzip members");
    let b64 = python(
        &format!("import base64; {out}(base64.b64decode(sys.stdin.buffer.read()))"),
        base64(&s.bytes).as_bytes(),
    );
    assert!(b64 == s.bytes, "base64");
    let url = python(
        &format!(
            "import base64; d = sys.stdin.buffer.read(); {out}(base64.urlsafe_b64decode(d + b'=' * (-len(d) % 4)))"
        ),
        base64_with(&s.bytes, BASE64_URL, false).as_bytes(),
    );
    assert!(url == s.bytes, "base64url");
    let lines = python(
        &format!("import base64; {out}(base64.decodebytes(sys.stdin.buffer.read()))"),
        &base64_lines(&s.bytes),
    );
    assert!(lines == s.bytes, "base64 lines");
    let e = sample(EICAR_4K, Variant::Infected);
    let qp = quoted_printable(&e.bytes, e.split);
    assert!(!contains(&qp, EICAR), "the soft break cuts EICAR");
    let decoded = python(
        &format!("import quopri; {out}(quopri.decodestring(sys.stdin.buffer.read()))"),
        &qp,
    );
    assert!(decoded == e.bytes, "quoted-printable");
    // A multipart body as Python's email parser reads it: the base64 part is the file.
    let form = multipart(
        "b64",
        &[
            (NOTE_PART, b"hello"),
            (BASE64_PART, &base64_lines(&s.bytes)),
        ],
    );
    let mime = [
        b"Content-Type: multipart/form-data; boundary=b64\r\n\r\n".as_slice(),
        &form,
    ]
    .concat();
    let part = python(
        &format!(
            "import email; m = email.message_from_bytes(sys.stdin.buffer.read()); {out}(m.get_payload()[1].get_payload(decode=True))"
        ),
        &mime,
    );
    assert!(part == s.bytes, "multipart base64 part");
}
