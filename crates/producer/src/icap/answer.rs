//! Writing the answer to a REQMOD or RESPMOD: the message unmodified (204, or echoed), the
//! request without its range, the block page, or an ICAP error.

use tokio::io::{AsyncWrite, AsyncWriteExt};
use virus_scanner_protocol::icap::{self, Blocked, Encapsulated, Method, RequestHead, Section};
use virus_scanner_protocol::task::VerdictStatus;

use super::read::ConnError;
use super::{IcapServer, RANGE_HEADERS};
use crate::body::{Body, BodyData};
use crate::scan::{BodyScan, Decision, Outcome};

/// One REQMOD or RESPMOD as read: what every answer to it is built from.
pub(super) struct Exchange<'a> {
    pub head: &'a RequestHead,
    pub istag: &'a str,
    pub encapsulated: &'a Encapsulated,
    /// The encapsulated header sections, as sent.
    pub area: &'a [u8],
}

impl Exchange<'_> {
    /// The request URL's last path segment, for `X-Violations-Found`.
    fn file_name(&self) -> String {
        self.encapsulated
            .header_ranges()
            .into_iter()
            .find(|(s, _)| *s == Section::ReqHdr)
            .and_then(|(_, r)| icap::parse_http_head(&self.area[r]).ok())
            .and_then(|h| h.target().map(str::to_owned))
            .map(|t| {
                let path = t.split('?').next().unwrap_or(&t).to_owned();
                path.rsplit('/').next().unwrap_or(&path).to_owned()
            })
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "-".to_owned())
    }
}

/// ICAP 500: a proxy with `bypass=off` refuses the message.
pub(super) fn error(istag: &str) -> Vec<u8> {
    icap::bare_answer(500, "Server Error", istag, false)
}

impl<S: BodyScan> IcapServer<S> {
    /// The answer that follows from the outcome; `complete` is whether the whole body was
    /// read (the connection can carry another request only then).
    pub(super) async fn answer<W: AsyncWrite + Unpin>(
        &self,
        x: &Exchange<'_>,
        body: &Body,
        outcome: Outcome,
        complete: bool,
        write: &mut W,
    ) -> Result<bool, ConnError> {
        let method = x.head.method.as_str();
        let status = outcome.verdict.status();
        match outcome.decision {
            Decision::Allow if complete => answer_unmodified(x, Some(body), write).await?,
            Decision::Allow => {
                // Allowed unscannable, but we hold only part of it: the client must not
                // get a truncated body back. Error out; a proxy with bypass=off refuses.
                write.write_all(&error(x.istag)).await?;
            }
            Decision::Block { .. }
                if matches!(status, VerdictStatus::Error | VerdictStatus::Unspecified) =>
            {
                // Scanner error or timeout: ICAP 500, which a proxy with bypass=off turns
                // into a refusal.
                write.write_all(&error(x.istag)).await?;
            }
            Decision::Block {
                status: http_status,
            } => {
                let v = &outcome.verdict;
                let (code, why) = if status == VerdictStatus::Infected {
                    (
                        self.config.block_status,
                        Blocked::Infected {
                            threat: &v.signature,
                        },
                    )
                } else {
                    (http_status, Blocked::NotScanned { detail: &v.detail })
                };
                let page = icap::block_page(x.istag, code, why, &outcome.task_id, &x.file_name());
                write.write_all(&page).await?;
            }
        }
        write.flush().await?;
        self.scan.count_icap(method, status.label());
        Ok(complete)
    }
}

/// 204 when the client allows it, else the original message echoed.
pub(super) async fn answer_unmodified<W: AsyncWrite + Unpin>(
    x: &Exchange<'_>,
    body: Option<&Body>,
    write: &mut W,
) -> Result<(), ConnError> {
    if x.head.allows_204() {
        write
            .write_all(&icap::response_head(
                204,
                "No Content",
                &[("ISTag", x.istag)],
            ))
            .await?;
        write.flush().await?;
        return Ok(());
    }
    // A RESPMOD answer carries the response only (RFC 3507 4.4.1): the req-hdr the client
    // sent for context is not echoed.
    let keep = if x.head.method == Method::Respmod {
        Section::ResHdr
    } else {
        Section::ReqHdr
    };
    let body = body.filter(|_| x.encapsulated.has_body());
    echo(
        x,
        keep,
        x.encapsulated.body.0,
        |head| head.to_vec(),
        body,
        write,
    )
    .await
}

/// REQMOD of a request for part of a file: the request head is sent back without `Range`
/// and `If-Range`, so the origin answers with the whole file, which is scanned.
pub(super) async fn answer_without_range<W: AsyncWrite + Unpin>(
    x: &Exchange<'_>,
    write: &mut W,
) -> Result<(), ConnError> {
    let strip = |head: &[u8]| icap::remove_header_fields(head, &RANGE_HEADERS);
    echo(x, Section::ReqHdr, Section::NullBody, strip, None, write).await
}

/// ICAP 200 with the `keep` header section of the request, as `edit` makes it, then the
/// body (chunked) if there is one.
async fn echo<W: AsyncWrite + Unpin>(
    x: &Exchange<'_>,
    keep: Section,
    body_section: Section,
    edit: impl Fn(&[u8]) -> Vec<u8>,
    body: Option<&Body>,
    write: &mut W,
) -> Result<(), ConnError> {
    let mut echoed = Vec::new();
    let mut sections = Vec::new();
    for (section, range) in x.encapsulated.header_ranges() {
        if section == keep {
            sections.push((section, echoed.len()));
            echoed.extend(edit(&x.area[range]));
        }
    }
    let echo = Encapsulated {
        headers: sections,
        body: (body_section, echoed.len()),
    };
    let value = icap::encapsulated_value(&echo);
    write
        .write_all(&icap::response_head(
            200,
            "OK",
            &[("ISTag", x.istag), ("Encapsulated", &value)],
        ))
        .await?;
    write.write_all(&echoed).await?;
    if let Some(body) = body {
        write_chunked(body, write).await?;
    }
    write.flush().await?;
    Ok(())
}

async fn write_chunked<W: AsyncWrite + Unpin>(body: &Body, write: &mut W) -> Result<(), ConnError> {
    let mut out = Vec::with_capacity(64 * 1024 + 32);
    match &body.data {
        BodyData::Memory(bytes) => {
            for piece in bytes.chunks(64 * 1024) {
                out.clear();
                icap::chunk(piece, &mut out);
                write.write_all(&out).await?;
            }
        }
        BodyData::Spilled(_) => {
            // From the descriptor the body was written (and hashed) through, never the path:
            // a file put in its place since is not the one that was scanned. Plain reads:
            // the file was just written and sits in the page cache.
            let mut file = body.reader()?;
            let mut piece = vec![0u8; 256 * 1024];
            loop {
                let n = std::io::Read::read(&mut file, &mut piece)?;
                if n == 0 {
                    break;
                }
                out.clear();
                icap::chunk(&piece[..n], &mut out);
                write.write_all(&out).await?;
            }
        }
    }
    write.write_all(icap::LAST_CHUNK).await?;
    Ok(())
}
