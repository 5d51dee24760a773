//! The campaign's clients: HTTP/1.1 through Envoy and ICAP straight to the producer, each
//! request on a fresh connection, the body written while the answer is read (a proxy may
//! answer before it has the whole body), and a client that walks away half-way.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Longest answer read; larger ones are cut (and then do not match their body).
const MAX_ANSWER: u64 = 80 << 20;

pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The whole body arrived (its length or its last chunk).
    pub complete: bool,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Writes `head` and `body` on `stream` while `read` reads the answer; the answer decides,
/// whatever became of the writing.
async fn exchange<T>(
    stream: &mut TcpStream,
    head: &[u8],
    body: &[u8],
    chunked: bool,
    read: impl AsyncFnOnce(&mut tokio::net::tcp::ReadHalf<'_>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    let (mut r, mut w) = stream.split();
    let write = async {
        let send = async {
            w.write_all(head).await?;
            for piece in body.chunks(256 * 1024) {
                if chunked {
                    w.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                        .await?;
                    w.write_all(piece).await?;
                    w.write_all(b"\r\n").await?;
                } else {
                    w.write_all(piece).await?;
                }
            }
            if chunked {
                w.write_all(b"0\r\n\r\n").await?;
            }
            Ok::<(), std::io::Error>(())
        };
        let _ = send.await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        answer = read(&mut r) => answer,
        _ = write => unreachable!("the writer never ends"),
    }
}

/// One HTTP/1.1 request with `Connection: close`; `None` when the connection ended without
/// an answer.
pub async fn http(port: u16, head: &str, body: &[u8]) -> std::io::Result<Option<HttpReply>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    exchange(
        &mut stream,
        head.as_bytes(),
        body,
        false,
        async |r: &mut tokio::net::tcp::ReadHalf<'_>| {
            let mut raw = Vec::new();
            // A reset after the answer still leaves the answer in `raw`.
            let _ = r.take(MAX_ANSWER).read_to_end(&mut raw).await;
            Ok(parse_http(&raw))
        },
    )
    .await
}

/// Sends `head` and the first `sent` bytes of `body`, then closes the connection.
pub async fn http_abort(port: u16, head: &str, body: &[u8], sent: usize) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body[..sent.min(body.len())]).await?;
    stream.flush().await?;
    // Give the proxy a moment to take the bytes in before the connection goes.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    Ok(())
}

fn parse_http(raw: &[u8]) -> Option<HttpReply> {
    let end = memchr::memmem::find(raw, b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let mut reply = HttpReply {
        status,
        headers,
        body: Vec::new(),
        complete: true,
    };
    if reply
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        (reply.body, reply.complete) = dechunk(rest);
    } else {
        let len = reply
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(rest.len());
        reply.complete = rest.len() >= len;
        reply.body = rest[..len.min(rest.len())].to_vec();
    }
    Some(reply)
}

/// The data of a chunked body, as far as it is well formed, and whether its last chunk came.
fn dechunk(mut rest: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    while let Some(eol) = memchr::memmem::find(rest, b"\r\n") {
        let size = std::str::from_utf8(&rest[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok());
        let Some(size) = size else { break };
        if size == 0 {
            return (out, true);
        }
        let start = eol + 2;
        let end = (start + size).min(rest.len());
        out.extend_from_slice(&rest[start..end]);
        if start + size + 2 > rest.len() {
            break;
        }
        rest = &rest[start + size + 2..];
    }
    (out, false)
}

pub struct IcapReply {
    pub status: u16,
    /// The status of the encapsulated HTTP response, when there is one.
    pub http_status: Option<u16>,
    pub infection_found: bool,
    /// The encapsulated body.
    pub body: Vec<u8>,
}

/// One REQMOD or RESPMOD (no preview, `Allow: 204`) of `body` on a fresh connection.
pub async fn icap(
    port: u16,
    reqmod: bool,
    body: &[u8],
    high_priority: bool,
) -> std::io::Result<IcapReply> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let priority = if high_priority {
        "X-Priority: high\r\n"
    } else {
        ""
    };
    let req_method = if reqmod { "POST" } else { "GET" };
    let req = format!(
        "{req_method} http://origin.test/file.bin HTTP/1.1\r\nHost: origin.test\r\n{priority}{}\r\n",
        if reqmod {
            format!(
                "Content-Type: application/octet-stream\r\nContent-Length: {}\r\n",
                body.len()
            )
        } else {
            String::new()
        }
    );
    let head = if reqmod {
        format!(
            "REQMOD icap://127.0.0.1:{port}/avscan ICAP/1.0\r\nHost: 127.0.0.1\r\nAllow: 204\r\n\
             Encapsulated: req-hdr=0, req-body={}\r\n\r\n{req}",
            req.len()
        )
    } else {
        let res = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        format!(
            "RESPMOD icap://127.0.0.1:{port}/avscan ICAP/1.0\r\nHost: 127.0.0.1\r\nAllow: 204\r\n\
             Encapsulated: req-hdr=0, res-hdr={}, res-body={}\r\n\r\n{req}{res}",
            req.len(),
            req.len() + res.len()
        )
    };
    exchange(
        &mut stream,
        head.as_bytes(),
        body,
        true,
        async |r: &mut tokio::net::tcp::ReadHalf<'_>| read_icap(r).await,
    )
    .await
}

async fn read_icap(r: &mut tokio::net::tcp::ReadHalf<'_>) -> std::io::Result<IcapReply> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut reader = BufReader::new(r.take(MAX_ANSWER));
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let status: u16 = line
        .strip_prefix("ICAP/1.0 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no ICAP status line"))?;
    let mut encapsulated = String::new();
    let mut infection_found = false;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).await? == 0 {
            return Err(bad("closed inside the ICAP head"));
        }
        if header == "\r\n" {
            break;
        }
        let lower = header.to_ascii_lowercase();
        if let Some(value) = lower.strip_prefix("encapsulated:") {
            encapsulated = value.trim().to_owned();
        }
        if lower.starts_with("x-infection-found:") {
            infection_found = true;
        }
    }
    let mut reply = IcapReply {
        status,
        http_status: None,
        infection_found,
        body: Vec::new(),
    };
    if status != 200 {
        return Ok(reply);
    }
    // `res-hdr=0, res-body=123`: the last entry is the body (or null-body) at the offset
    // where the header blocks end.
    let (last_name, last_offset) = encapsulated
        .rsplit(',')
        .next()
        .and_then(|e| e.trim().split_once('='))
        .and_then(|(n, o)| Some((n.to_owned(), o.trim().parse::<usize>().ok()?)))
        .ok_or_else(|| bad("no Encapsulated header"))?;
    let mut heads = vec![0u8; last_offset];
    reader.read_exact(&mut heads).await?;
    reply.http_status = String::from_utf8_lossy(&heads)
        .split("\r\n")
        .find(|l| l.starts_with("HTTP/1."))
        .and_then(|l| l.split(' ').nth(1)?.parse().ok());
    if last_name != "null-body" {
        loop {
            let mut size = String::new();
            if reader.read_line(&mut size).await? == 0 {
                return Err(bad("closed inside the encapsulated body"));
            }
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad("bad chunk size"))?;
            let mut piece = vec![0u8; n + 2];
            reader.read_exact(&mut piece).await?;
            if n == 0 {
                break;
            }
            reply.body.extend_from_slice(&piece[..n]);
        }
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_answers_are_parsed_with_either_framing() {
        let r = parse_http(b"HTTP/1.1 406 Not Acceptable\r\ncontent-length: 3\r\nX-Virus-Infected: true\r\n\r\nabcdef")
            .expect("parsed");
        assert_eq!((r.status, r.body.as_slice()), (406, &b"abc"[..]));
        assert_eq!(r.header("x-virus-infected"), Some("true"));
        let r = parse_http(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
            .expect("parsed");
        assert_eq!(r.body, b"abcde");
        assert!(r.complete);
        let r = parse_http(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc").expect("parsed");
        assert!(!r.complete);
        assert!(parse_http(b"HTTP/1.1 200 OK\r\n").is_none());
    }
}
