//! `virus-scanner-bench icap`: our ICAP service against c-icap's virus_scan service
//! (Debian `c-icap` + `libc-icap-mod-virus-scan`, clamd_mod) on the same clamd, driven by
//! the same keep-alive RESPMOD client: requests per second and p99 per body size; for
//! distinct bodies also raw clamd INSTREAM of the same bytes: about the most that any
//! service can reach when this clamd has to scan every body.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use virus_scanner_clamd::{ClamdClient, ClamdConfig, ScanInput};
use virus_scanner_test_support::{Clamd, Redis, clean_bytes, free_port, wait_for};

use crate::{Args, measure, median, parse_size, start_consumer};

pub(crate) struct Result {
    pub(crate) rps: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) requests: usize,
}

/// c-icap with virus_scan over clamd_mod, configured to hold every body until the verdict
/// (the Debian defaults skip bodies over 5 MiB and send headers early over 2 MiB).
fn start_c_icap(dir: &Path, clamd_port: u16) -> anyhow::Result<(Child, u16)> {
    let port = free_port();
    let tmp = dir.join("c-icap-tmp");
    std::fs::create_dir_all(&tmp)?;
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("a+rwX")
        .arg(dir)
        .status();
    let modules = "/usr/lib/x86_64-linux-gnu/c_icap";
    let config = format!(
        "PidFile {d}/c-icap.pid\nCommandsSocket {d}/c-icap.ctl\nTimeout 300\n\
         MaxKeepAliveRequests 0\nKeepAliveTimeout 600\nStartServers 3\nMaxServers 10\n\
         MinSpareThreads 10\nMaxSpareThreads 20\nThreadsPerChild 10\nMaxRequestsPerChild 0\n\
         Port 127.0.0.1:{port}\nTmpDir {tmp}\nMaxMemObject 131072\nDebugLevel 0\n\
         ModulesDir {modules}\nServicesDir {modules}\nTemplateDir /usr/share/c_icap/templates/\n\
         TemplateDefaultLanguage en\nLoadMagicFile /etc/c-icap/c-icap.magic\n\
         ServerLog {d}/server.log\nAccessLog {d}/access.log\n\
         Service antivirus_module virus_scan.so\n\
         ServiceAlias avscan virus_scan?allow204=on&sizelimit=off&mode=simple\n\
         virus_scan.ScanFileTypes TEXT DATA EXECUTABLE ARCHIVE GRAPHICS STREAM DOCUMENT\n\
         virus_scan.SendPercentData 0\nvirus_scan.StartSendPercentDataAfter 300M\n\
         virus_scan.Allow204Responces on\nvirus_scan.PassOnError off\n\
         virus_scan.MaxObjectSize 200M\nvirus_scan.DefaultEngine clamd\n\
         Module common clamd_mod.so\nclamd_mod.ClamdHost 127.0.0.1\nclamd_mod.ClamdPort {clamd_port}\n",
        d = dir.display(),
        tmp = tmp.display(),
    );
    let conf = dir.join("c-icap.conf");
    std::fs::write(&conf, config)?;
    let child = Command::new("c-icap")
        .args(["-N", "-f"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("c-icap (Debian package c-icap) is missing: {e}"))?;
    anyhow::ensure!(
        wait_for(Duration::from_secs(15), || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "c-icap did not start; see {}",
        dir.join("server.log").display()
    );
    Ok((child, port))
}

/// One keep-alive connection sending RESPMOD (no preview, `Allow: 204`).
struct Client {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    port: u16,
    service: String,
}

impl Client {
    async fn connect(port: u16, service: &str) -> anyhow::Result<Client> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Ok(Client {
            reader: BufReader::with_capacity(64 * 1024, r),
            writer: w,
            port,
            service: service.to_owned(),
        })
    }

    async fn respmod(&mut self, body: &[u8]) -> anyhow::Result<()> {
        let req = "GET http://origin.test/file.bin HTTP/1.1\r\nHost: origin.test\r\n\r\n";
        let res = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let head = format!(
            "RESPMOD icap://127.0.0.1:{}/{} ICAP/1.0\r\nHost: 127.0.0.1\r\nAllow: 204\r\nEncapsulated: req-hdr=0, res-hdr={}, res-body={}\r\n\r\n{req}{res}",
            self.port,
            self.service,
            req.len(),
            req.len() + res.len()
        );
        self.writer.write_all(head.as_bytes()).await?;
        for piece in body.chunks(64 * 1024) {
            self.writer
                .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                .await?;
            self.writer.write_all(piece).await?;
            self.writer.write_all(b"\r\n").await?;
        }
        self.writer.write_all(b"0\r\n\r\n").await?;
        // The answer: a head, and for anything but 204 an encapsulated message to drain.
        let mut status = String::new();
        self.reader.read_line(&mut status).await?;
        anyhow::ensure!(status.starts_with("ICAP/1.0 "), "bad answer {status:?}");
        let mut encapsulated = String::new();
        loop {
            let mut line = String::new();
            anyhow::ensure!(self.reader.read_line(&mut line).await? > 0, "closed");
            if line == "\r\n" {
                break;
            }
            if line.to_ascii_lowercase().starts_with("encapsulated:") {
                encapsulated = line;
            }
        }
        anyhow::ensure!(
            status.starts_with("ICAP/1.0 204") || status.starts_with("ICAP/1.0 200"),
            "not clean: {status:?}"
        );
        if status.starts_with("ICAP/1.0 200") {
            let offset: usize = encapsulated
                .rsplit('=')
                .next()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let mut heads = vec![0u8; offset];
            self.reader.read_exact(&mut heads).await?;
            if !encapsulated.contains("null-body") {
                loop {
                    let mut size = String::new();
                    self.reader.read_line(&mut size).await?;
                    let n =
                        usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)?;
                    let mut skip = vec![0u8; n + 2];
                    self.reader.read_exact(&mut skip).await?;
                    if n == 0 {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

/// RESPMOD loops for `args.seconds`; `unique` makes every body distinct (no cache can help),
/// otherwise the same bytes are sent every time (a popular download).
pub(crate) async fn drive(
    port: u16,
    service: &str,
    body: &[u8],
    unique: bool,
    args: &Args,
) -> anyhow::Result<Result> {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let end = Instant::now() + Duration::from_secs_f64(args.seconds);
    let body = Arc::new(body.to_vec());
    let start = Instant::now();
    let mut loops = Vec::new();
    for _ in 0..args.concurrency {
        let (latencies, body) = (latencies.clone(), body.clone());
        let service = service.to_owned();
        loops.push(tokio::spawn(async move {
            let mut client = Client::connect(port, &service).await?;
            let mut mine = Vec::new();
            while Instant::now() < end {
                let bytes = if unique {
                    crate::unique(&body)
                } else {
                    body.to_vec()
                };
                let t = Instant::now();
                client.respmod(&bytes).await?;
                mine.push(t.elapsed());
            }
            latencies.lock().await.extend(mine);
            Ok::<(), anyhow::Error>(())
        }));
    }
    for l in loops {
        l.await??;
    }
    let elapsed = start.elapsed();
    let mut all = latencies.lock().await.clone();
    all.sort();
    anyhow::ensure!(!all.is_empty(), "no request finished");
    let at = |q: f64| all[((all.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
    Ok(Result {
        rps: all.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        requests: all.len(),
    })
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let redis = Redis::start();
    let clamd = Clamd::start();
    let dir = crate::envoy::tempfile_dir("vs-bench-icap")?;
    let scan_dir = dir.join("scan");
    std::fs::create_dir_all(&scan_dir)?;
    let (stop_tx, consumer) = start_consumer(
        &redis,
        &clamd,
        &scan_dir,
        args.concurrency,
        true,
        !args.stream_to_clamd,
    )?;
    let virus_scanner_test_support::ProducerProcess {
        process: producer,
        icap: icap_port,
        ..
    } = {
        let flags = crate::producer_flags(args);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        crate::start_producer(&redis, &scan_dir, &flags)?
    };
    let c_icap_dir = dir.join("c-icap");
    std::fs::create_dir_all(&c_icap_dir)?;
    let (mut c_icap, c_icap_port) = start_c_icap(&c_icap_dir, clamd.port())?;

    // The ceiling for distinct bodies: every one of them has to be scanned by this clamd.
    let mut raw_config = ClamdConfig::new(clamd.address().parse().map_err(anyhow::Error::msg)?);
    raw_config.max_idle_sessions = args.concurrency;
    let raw = Arc::new(ClamdClient::new(raw_config));

    println!(
        "| body | c-icap virus_scan req/s | p99 ms | ours req/s | p99 ms | throughput ratio | raw clamd INSTREAM scans/s |\n|---|---|---|---|---|---|---|"
    );
    let outcome = async {
        for (size_text, unique) in args.sizes.iter().flat_map(|s| [(s, true), (s, false)]) {
            let size = parse_size(size_text)?;
            let body = clean_bytes(size, 3);
            // A warm-up for each, then alternating rounds; the median round is reported.
            drive(c_icap_port, "avscan", &body, unique, args).await?;
            drive(icap_port, "avscan", &body, unique, args).await?;
            let (mut theirs, mut ours, mut direct) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..args.rounds.max(1) {
                theirs.push(drive(c_icap_port, "avscan", &body, unique, args).await?);
                ours.push(drive(icap_port, "avscan", &body, unique, args).await?);
                if unique {
                    let (raw, body) = (raw.clone(), Arc::new(body.clone()));
                    direct.push(
                        measure(args.concurrency, args.seconds, move |_| {
                            let (raw, bytes) = (raw.clone(), crate::unique(&body));
                            async move {
                                raw.scan(ScanInput::Bytes(&bytes)).await?;
                                Ok(())
                            }
                        })
                        .await?,
                    );
                }
            }
            let direct = if direct.is_empty() {
                String::new()
            } else {
                format!("{:.0}", median(direct).per_second())
            };
            let median = |mut v: Vec<Result>| {
                v.sort_by(|a, b| a.rps.total_cmp(&b.rps));
                v.swap_remove(v.len() / 2)
            };
            let (t, o) = (median(theirs), median(ours));
            let what = if unique {
                "distinct bodies"
            } else {
                "same body repeated"
            };
            println!(
                "| {size_text}, {what} | {:.0} | {:.1} | {:.0} | {:.1} | {:.2} | {direct} |",
                t.rps,
                t.p99_ms,
                o.rps,
                o.p99_ms,
                o.rps / t.rps
            );
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    let _ = Command::new("kill").arg(c_icap.id().to_string()).status();
    let _ = c_icap.wait();
    drop(producer);
    let _ = stop_tx.send(());
    consumer.await??;
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}
