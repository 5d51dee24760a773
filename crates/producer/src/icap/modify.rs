//! REQMOD and RESPMOD: read the encapsulated heads and the body (asking for the rest after
//! a preview), scan, answer.

use std::borrow::Cow;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use virus_scanner_protocol::icap::{
    self, Blocked, HttpHead, IcapError, Method, RequestHead, Section,
};
use virus_scanner_protocol::task::Direction;

use super::IcapServer;
use super::answer::{Exchange, answer_unmodified, answer_without_range};
use super::read::{ConnError, body_error, read_chunks, split_sections, timed};
use crate::body::{Body, BodyBuffer};
use crate::config::RangeRequests;
use crate::headers::HeaderFields;
use crate::scan::{BodyScan, ScanContext};

impl<S: BodyScan> IcapServer<S> {
    /// REQMOD or RESPMOD; returns whether the request was read to its end (so the
    /// connection can carry another).
    pub(super) async fn modify<R, W>(
        &self,
        head: &RequestHead,
        istag: &str,
        reader: &mut BufReader<R>,
        write: &mut W,
    ) -> Result<bool, ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let value = head
            .headers
            .get("Encapsulated")
            .ok_or_else(|| IcapError::Encapsulated("missing".into()))?;
        let encapsulated = icap::parse_encapsulated(value, head.method)?;
        let preview = head.preview()?;
        let mut area = vec![0u8; encapsulated.body.1];
        timed(self.config.read_timeout, reader.read_exact(&mut area)).await?;
        let sections = split_sections(&encapsulated, &area)?;
        let direction = match head.method {
            Method::Respmod => Direction::Response,
            _ => Direction::Request,
        };
        let section = |wanted: Section| sections.iter().find(|(s, _)| *s == wanted).map(|(_, h)| h);
        let request = section(Section::ReqHdr);
        let http = section(match direction {
            Direction::Response => Section::ResHdr,
            _ => Section::ReqHdr,
        });
        let fields = |h: &HttpHead, status: bool| {
            let mut f = HeaderFields::read(
                h.headers
                    .0
                    .iter()
                    .map(|(k, v)| (k.as_str(), Cow::Borrowed(v.as_str()))),
                self.scan.priority_header(),
            );
            if status {
                f.status = h.start_line.split(' ').nth(1).map(str::to_owned);
            }
            f
        };
        let request_fields = request.map(|h| fields(h, false));
        let ctx = ScanContext {
            direction,
            // The gateway's priority header, in the encapsulated HTTP request (or on the
            // ICAP request itself, for clients that promote it).
            priority: self.scan.priority(
                request_fields
                    .as_ref()
                    .and_then(|f| f.priority.as_deref())
                    .or_else(|| head.headers.get(self.scan.priority_header())),
            ),
            route: request
                .and_then(|h| h.target())
                .map(|t| t.split('?').next().unwrap_or(t).to_owned())
                .unwrap_or_default(),
            client_address: head
                .headers
                .get("X-Client-IP")
                .unwrap_or_default()
                .to_owned(),
            request_id: String::new(),
            mode: "icap",
        };
        let method = head.method.as_str();
        let x = Exchange {
            head,
            istag,
            encapsulated: &encapsulated,
            area: &area,
        };

        let asks_for_range =
            direction == Direction::Request && request_fields.as_ref().is_some_and(|f| f.range);
        if asks_for_range {
            match self.scan.range_requests() {
                RangeRequests::Allow => {}
                RangeRequests::Refuse => {
                    let page = icap::block_page(
                        istag,
                        416,
                        Blocked::NotScanned {
                            detail: "parts of a file cannot be scanned; request the whole file",
                        },
                        "",
                        "-",
                    );
                    write.write_all(&page).await?;
                    write.flush().await?;
                    self.scan.count_icap(method, "range_refused");
                    // A body that was not read ends the connection.
                    return Ok(!encapsulated.has_body());
                }
                // Only a bodiless request asks for a range (RFC 9110 14.2: GET); its head is
                // answered without Range and If-Range, so the origin sends the whole file.
                RangeRequests::Strip if !encapsulated.has_body() => {
                    answer_without_range(&x, write).await?;
                    self.scan.count_icap(method, "clean");
                    return Ok(true);
                }
                RangeRequests::Strip => {}
            }
        }

        if !encapsulated.has_body() {
            // Nothing to scan: a bodiless message is clean.
            answer_unmodified(&x, None, write).await?;
            self.scan.count_icap(method, "clean");
            return Ok(true);
        }

        let mut buffer = BodyBuffer::new(self.scan.limits().clone());
        let mut too_large = false;
        let ended_early = read_chunks(
            reader,
            &mut buffer,
            &mut too_large,
            self.config.read_timeout,
        )
        .await?;
        let complete = match (preview, ended_early) {
            // The preview held the whole body.
            (Some(_), true) => true,
            (Some(_), false) if !too_large => {
                write.write_all(b"ICAP/1.0 100 Continue\r\n\r\n").await?;
                write.flush().await?;
                read_chunks(
                    reader,
                    &mut buffer,
                    &mut too_large,
                    self.config.read_timeout,
                )
                .await?;
                true
            }
            // Over the limit during the preview: the rest was never asked for.
            (Some(_), false) => false,
            (None, _) => true,
        };
        let headers = http
            .map(|h| fields(h, direction == Direction::Response).body_headers())
            .unwrap_or_default();
        let outcome = if too_large {
            self.scan.refuse_unscanned(
                format!("body larger than {} bytes", self.scan.limits().max),
                &ctx,
            )
        } else {
            match buffer.finish() {
                Ok(body) => {
                    let outcome = self.scan.scan(&body, &headers, &ctx).await;
                    return self.answer(&x, &body, outcome, complete, write).await;
                }
                Err(e) => self.scan.scan_failed(e.to_string(), &ctx),
            }
        };
        let empty = Body::from_vec(Vec::new(), self.scan.limits()).map_err(body_error)?;
        self.answer(&x, &empty, outcome, complete, write).await
    }
}
