//! The whole stack of the campaign on loopback: Redis with AOF, a fault proxy between the
//! producer and Redis, clamd, three consumer processes, the producer (ext_proc on a Unix
//! socket that survives its restarts, ICAP on a port), a BUFFERED and a FULL_DUPLEX_STREAMED
//! Envoy in front of the origin, and the spool on a small tmpfs of its own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};

use virus_scanner_test_support::{
    BodyMode, Clamd, Envoy, EnvoyOptions, Processor, ProducerProcess, Redis, RedisOptions,
    ServiceProcess,
};

use super::origin::Origin;
use super::proxy::FaultProxy;

/// Set in the environment of the campaign once it runs in a mount namespace of its own.
pub const NAMESPACE_ENV: &str = "VIRUS_SCANNER_CHAOS_NAMESPACE";

/// Producer's `--scan-timeout-seconds` in the campaign.
pub const SCAN_TIMEOUT_SECONDS: u64 = 12;
/// Consumers' `--visibility-timeout-seconds` in the campaign.
pub const VISIBILITY_TIMEOUT_SECONDS: u64 = 4;
pub const CONSUMERS: usize = 3;
/// The names of the files that fill the spool start with this.
pub const FILLER: &str = ".chaos-filler";

/// What the load and the samplers read without taking the stack's lock.
#[derive(Default)]
pub struct Live {
    pub icap_port: AtomicU16,
    pub producer_pid: AtomicU32,
}

pub struct Stack {
    pub base: PathBuf,
    pub spool: PathBuf,
    /// The spool is a tmpfs of this many MiB in our own mount namespace (else None: no
    /// ENOSPC fault).
    pub tmpfs_mib: Option<u64>,
    pub redis: Redis,
    pub proxy: FaultProxy,
    pub clamd: Clamd,
    consumer_binary: PathBuf,
    consumer_args: Vec<String>,
    pub consumers: Vec<ServiceProcess>,
    /// A consumer under SIGSTOP: the kill schedule leaves it alone.
    pub paused: Option<usize>,
    producer_binary: PathBuf,
    producer_extra: Vec<String>,
    pub producer: Option<ServiceProcess>,
    /// The logs of the producers that ran, for `--records`.
    pub producer_logs: String,
    pub buffered: Envoy,
    pub duplex: Envoy,
    pub origin: Origin,
    pub live: Arc<Live>,
}

impl Stack {
    /// Starts everything (blocking); `origin` and `proxy` already run on the runtime.
    pub fn start(
        origin: Origin,
        make_proxy: impl FnOnce(u16) -> anyhow::Result<FaultProxy>,
        tmpfs_mib: u64,
    ) -> anyhow::Result<Stack> {
        let base = crate::envoy::tempfile_dir("vs-chaos")?;
        let spool = base.join("spool");
        std::fs::create_dir_all(&spool)?;
        let tmpfs_mib = (std::env::var_os(NAMESPACE_ENV).is_some()
            && Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={tmpfs_mib}m,mode=0700")])
                .arg("tmpfs")
                .arg(&spool)
                .status()
                .is_ok_and(|s| s.success()))
        .then_some(tmpfs_mib);
        let redis = Redis::start_with(RedisOptions {
            persistent: true,
            ..RedisOptions::default()
        });
        let proxy = make_proxy(redis.port())?;
        let clamd = Clamd::start();
        let consumer_binary = crate::envoy::release_binary("virus-scanner-handler")?;
        let consumer_args: Vec<String> = [
            "--redis-host",
            "127.0.0.1",
            "--redis-port",
            &redis.port().to_string(),
            "--clamd-address",
            &clamd.address(),
            "--scan-tmp-dir",
            &spool.display().to_string(),
            "--metrics-addr",
            "127.0.0.1:0",
            "--concurrency",
            "2",
            "--visibility-timeout-seconds",
            &VISIBILITY_TIMEOUT_SECONDS.to_string(),
            "--max-scan-size-mb",
            "64",
            "--cache-ttl-seconds",
            "3600",
            "--legacy-queue=",
            "--log-format",
            "text",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let socket = base.join("ext_proc.sock");
        let producer_binary = crate::envoy::release_binary("virus-scanner-producer")?;
        let producer_extra: Vec<String> = [
            "--grpc-socket",
            &socket.display().to_string(),
            "--scan-timeout-seconds",
            &SCAN_TIMEOUT_SECONDS.to_string(),
            "--scan-file-threshold-mb",
            "1",
            "--max-body-mb",
            "64",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let buffered_options = EnvoyOptions::new(
            Processor::Unix(socket.clone()),
            origin.port(),
            BodyMode::Buffered,
        );
        let duplex_options = EnvoyOptions::new(
            Processor::Unix(socket),
            origin.port(),
            BodyMode::FullDuplexStreamed,
        );
        let mut stack = Stack {
            base,
            spool,
            tmpfs_mib,
            redis,
            proxy,
            clamd,
            consumer_binary,
            consumer_args,
            consumers: Vec::new(),
            paused: None,
            producer_binary,
            producer_extra,
            producer: None,
            producer_logs: String::new(),
            buffered: Envoy::start(&buffered_options),
            duplex: Envoy::start(&duplex_options),
            origin,
            live: Arc::new(Live::default()),
        };
        for _ in 0..CONSUMERS {
            let consumer = stack.spawn_consumer();
            stack.consumers.push(consumer);
        }
        stack.start_producer();
        Ok(stack)
    }

    pub fn spawn_consumer(&self) -> ServiceProcess {
        ServiceProcess::spawn(
            &self.consumer_binary,
            &self.consumer_args,
            &[("RUST_LOG", "warn".into())],
        )
    }

    /// Starts the producer against the proxy and waits until it is ready.
    pub fn start_producer(&mut self) {
        if let Some(old) = self.producer.take() {
            self.producer_logs.push_str(&old.log());
        }
        let started = ProducerProcess::start(
            &self.producer_binary,
            self.proxy.port(),
            &self.spool,
            &self.producer_extra,
            // Debug: each decision with its source, to trace a delivered body's verdict.
            &[("RUST_LOG", "warn,virus_scanner_producer=debug".into())],
        );
        self.live.icap_port.store(started.icap, Ordering::Relaxed);
        self.live
            .producer_pid
            .store(started.process.pid(), Ordering::Relaxed);
        self.producer = Some(started.process);
    }

    /// Files in the spool and its tenants' directories (the filler of the ENOSPC fault is
    /// not one of them).
    pub fn spool_files(&self) -> Vec<String> {
        fn walk(dir: &Path, found: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                match entry.file_type() {
                    Ok(t) if t.is_dir() => walk(&path, found),
                    Ok(_) if entry.file_name() != FILLER => found.push(path.display().to_string()),
                    _ => {}
                }
            }
        }
        let mut found = Vec::new();
        walk(&self.spool, &mut found);
        found
    }

    /// Fills the spool's tmpfs until less than 64 KiB are free (spilled bodies are larger
    /// than 1 MiB); false without a tmpfs of our own or when spills keep taking the room.
    pub fn fill_spool(&self) -> bool {
        if self.tmpfs_mib.is_none() {
            return false;
        }
        // Bodies spilled meanwhile take room between measuring and allocating: a size that
        // does not fit is halved, and what is left is filled by the next file.
        let mut size = u64::MAX;
        for n in 0..24 {
            let Some(free) = free_bytes(&self.spool) else {
                return false;
            };
            if free < 64 << 10 {
                return true;
            }
            size = size.min(free);
            let ok = Command::new("fallocate")
                .arg("-l")
                .arg(size.to_string())
                .arg(self.spool.join(format!("{FILLER}-{n}")))
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                size /= 2;
            }
        }
        false
    }

    pub fn empty_spool_filler(&self) {
        for entry in std::fs::read_dir(&self.spool)
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with(FILLER) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Stops everything that holds the spool, then unmounts and removes the directories.
    pub fn shutdown(self) {
        let Stack {
            base,
            spool,
            tmpfs_mib,
            buffered,
            duplex,
            producer,
            consumers,
            ..
        } = self;
        drop(buffered);
        drop(duplex);
        drop(producer);
        drop(consumers);
        if tmpfs_mib.is_some() {
            let _ = Command::new("umount").arg(&spool).status();
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}

fn free_bytes(dir: &Path) -> Option<u64> {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(dir)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

/// `kill -<signal> <pid>` of a process this campaign started.
pub fn signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success())
}
