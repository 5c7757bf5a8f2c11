//! The access log (`--access-log PATH|-`): one line per finished TCP
//! connection or UDP flow, with client, frontend, endpoint, bytes each way,
//! duration and how it ended, as text or JSON lines (`--log-format`).
//!
//! Written off the data-plane threads, which never wait for it: a finished
//! connection pushes a [`Record`] (plain `Copy` fields and a reference count
//! on its frontend, no allocation) into a bounded channel whose slots are
//! allocated once, with `try_send`. When the channel is full the record is
//! dropped and counted in `ringvip_access_log_dropped_total`. One writer
//! thread formats and writes; it flushes whenever the channel runs empty, so a
//! line is on disk as soon as the writer is idle.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crate::config::LogFormat;
use crate::state::Frontend;
use crate::telemetry::Counter;

/// Records the channel holds before new ones are dropped.
pub const CAPACITY: usize = 16_384;

/// How a connection or flow ended: the `ended` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed with FIN (TCP).
    Fin,
    /// A reset or an error on either side (TCP), or the backend refused
    /// datagrams (UDP, ICMP unreachable).
    Reset,
    /// No byte either way for the idle timeout (TCP `--tcp-idle-timeout-secs`,
    /// UDP `--udp-idle-timeout-secs`).
    IdleTimeout,
    /// Refused by `--max-connections` or `--max-connections-per-frontend`.
    Limit,
    /// Still open when the process stopped (after the drain timeout, or the
    /// listener closed).
    Drain,
    /// No backend accepted the connection (every connect try failed).
    NoBackend,
    /// The UDP flow's endpoint stopped being usable, so the flow was dropped.
    EndpointGone,
}

impl End {
    /// The value written in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Fin => "fin",
            End::Reset => "reset",
            End::IdleTimeout => "idle_timeout",
            End::Limit => "limit",
            End::Drain => "drain",
            End::NoBackend => "no_backend",
            End::EndpointGone => "endpoint_gone",
        }
    }
}

/// One finished connection or flow, as the data plane hands it over.
#[derive(Debug, Clone)]
pub struct Record {
    /// The frontend it came through (Service, port name, protocol).
    pub fe: Arc<Frontend>,
    /// Client address.
    pub client: SocketAddr,
    /// Frontend address (VIP or node address) and port.
    pub frontend: SocketAddr,
    /// The backend, when one was connected.
    pub endpoint: Option<SocketAddr>,
    /// Payload bytes client → backend.
    pub to_backend: u64,
    /// Payload bytes backend → client.
    pub to_client: u64,
    /// From accept (or first datagram) to the end.
    pub duration: Duration,
    /// How it ended.
    pub ended: End,
    /// When it ended.
    pub at: SystemTime,
}

enum Msg {
    Record(Record),
    Stop,
}

/// The data plane's side of the access log: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: SyncSender<Msg>,
    dropped: Counter,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl AccessLog {
    /// Hands a record to the writer, or drops and counts it when the
    /// channel is full (or the writer has stopped).
    #[inline]
    pub fn push(&self, r: Record) {
        if self.tx.try_send(Msg::Record(r)).is_err() {
            self.dropped.inc();
        }
    }

    /// Records dropped so far (`ringvip_access_log_dropped_total`).
    pub fn dropped(&self) -> &Counter {
        &self.dropped
    }
}

/// The writer thread; [`Writer::finish`] writes what is queued and stops it.
#[derive(Debug)]
pub struct Writer {
    tx: SyncSender<Msg>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Writes every record pushed before this call, then stops the thread.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // Blocking is fine here: this runs on the control thread at exit.
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Opens the access log at `dest` (a file, appended to, or `-` for stdout)
/// and starts its writer with room for `capacity` records.
pub fn open(
    dest: &Path,
    format: LogFormat,
    capacity: usize,
) -> std::io::Result<(AccessLog, Writer)> {
    let out: Box<dyn std::io::Write + Send> = if dest == Path::new("-") {
        Box::new(std::io::stdout())
    } else {
        Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dest)?,
        )
    };
    Ok(start(out, format, capacity))
}

/// Starts a writer of `format` lines into `out`.
pub fn start(
    out: Box<dyn std::io::Write + Send>,
    format: LogFormat,
    capacity: usize,
) -> (AccessLog, Writer) {
    let (tx, rx) = sync_channel(capacity);
    let thread = std::thread::Builder::new()
        .name("ringvip-access-log".into())
        .spawn(move || write_loop(rx, out, format))
        .ok();
    if thread.is_none() {
        tracing::error!("cannot start the access-log writer thread: records are dropped");
    }
    let log = AccessLog {
        tx: tx.clone(),
        dropped: Counter::default(),
    };
    (log, Writer { tx, thread })
}

fn write_loop(rx: Receiver<Msg>, out: Box<dyn std::io::Write + Send>, format: LogFormat) {
    let mut out = std::io::BufWriter::new(out);
    let mut line = String::with_capacity(256);
    let mut failed = false;
    loop {
        let msg = match rx.try_recv() {
            Ok(m) => m,
            Err(TryRecvError::Empty) => {
                // Idle: what was written so far goes out now.
                let _ = out.flush();
                match rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        let Msg::Record(r) = msg else { break };
        line.clear();
        format_record(&r, format, &mut line);
        if let Err(e) = out.write_all(line.as_bytes()) {
            if !failed {
                tracing::warn!(error = %e, "writing the access log failed");
                failed = true;
            }
        }
    }
    let _ = out.flush();
}

/// Appends `r` as one line (with its newline) in `format` to `out`.
pub fn format_record(r: &Record, format: LogFormat, out: &mut String) {
    let time = jiff::Timestamp::try_from(r.at)
        .map(|t| t.to_string())
        .unwrap_or_default();
    let duration_ms = r.duration.as_secs_f64() * 1000.0;
    match format {
        LogFormat::Json => {
            let v = serde_json::json!({
                "time": time,
                "client": r.client.to_string(),
                "frontend": r.frontend.to_string(),
                "protocol": r.fe.proto.as_str(),
                "namespace": r.fe.service.namespace,
                "service": r.fe.service.name,
                "port": r.fe.port_name,
                "endpoint": r.endpoint.map(|e| e.to_string()),
                "bytes_to_backend": r.to_backend,
                "bytes_to_client": r.to_client,
                "duration_ms": (duration_ms * 1000.0).round() / 1000.0,
                "ended": r.ended.as_str(),
            });
            let _ = writeln!(out, "{v}");
        }
        LogFormat::Text => {
            let endpoint = r
                .endpoint
                .map_or_else(|| "-".to_string(), |e| e.to_string());
            let port = if r.fe.port_name.is_empty() {
                "-"
            } else {
                r.fe.port_name.as_str()
            };
            let _ = writeln!(
                out,
                "{time} client={} frontend={} protocol={} service={}/{} port={port} endpoint={endpoint} bytes_to_backend={} bytes_to_client={} duration_ms={duration_ms:.3} ended={}",
                r.client,
                r.frontend,
                r.fe.proto.as_str(),
                r.fe.service.namespace,
                r.fe.service.name,
                r.to_backend,
                r.to_client,
                r.ended.as_str(),
            );
        }
    }
}

/// A `Write` into a shared buffer, to read what a writer wrote (tests).
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct Buffer(pub(crate) Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl Buffer {
    /// Everything written so far, as text.
    pub(crate) fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
impl std::io::Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An access log writing `format` lines into a buffer the caller reads
/// (after [`Writer::finish`]).
#[cfg(test)]
pub(crate) fn to_buffer(format: LogFormat) -> (AccessLog, Writer, Buffer) {
    let buf = Buffer::default();
    let (log, writer) = start(Box::new(buf.clone()), format, 64);
    (log, writer, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The TCP frontend of default/web at 10.96.0.10:80.
    fn frontend() -> Arc<Frontend> {
        let snap = crate::testing::tun::sample_snapshot(true);
        let Some((_, fe)) = snap
            .frontends()
            .find(|(k, _)| k.proto == crate::model::Protocol::Tcp && k.addr.is_ipv4())
        else {
            panic!("no frontend")
        };
        fe.clone()
    }

    fn record(fe: Arc<Frontend>, ended: End) -> Record {
        Record {
            fe,
            client: "192.0.2.9:40000".parse().unwrap(),
            frontend: "10.96.0.10:80".parse().unwrap(),
            endpoint: Some("10.1.0.1:8080".parse().unwrap()),
            to_backend: 6,
            to_client: 1234,
            duration: Duration::from_micros(12_345),
            ended,
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        }
    }

    #[test]
    fn json_lines_carry_every_field() {
        let fe = frontend();
        let mut line = String::new();
        format_record(
            &record(fe.clone(), End::IdleTimeout),
            LogFormat::Json,
            &mut line,
        );
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20Z");
        assert_eq!(v["client"], "192.0.2.9:40000");
        assert_eq!(v["frontend"], "10.96.0.10:80");
        assert_eq!(v["endpoint"], "10.1.0.1:8080");
        assert_eq!(v["namespace"], fe.service.namespace.as_str());
        assert_eq!(v["service"], fe.service.name.as_str());
        assert_eq!(v["bytes_to_backend"], 6);
        assert_eq!(v["bytes_to_client"], 1234);
        assert_eq!(v["duration_ms"], 12.345);
        assert_eq!(v["ended"], "idle_timeout");
    }

    #[test]
    fn text_lines_are_key_value() {
        let mut r = record(frontend(), End::Limit);
        r.endpoint = None;
        let mut line = String::new();
        format_record(&r, LogFormat::Text, &mut line);
        assert!(
            line.starts_with(
                "2023-11-14T22:13:20Z client=192.0.2.9:40000 frontend=10.96.0.10:80 protocol=TCP "
            ),
            "{line}"
        );
        assert!(line.contains(" endpoint=- bytes_to_backend=6 bytes_to_client=1234 duration_ms=12.345 ended=limit\n"), "{line}");
    }

    #[test]
    fn a_full_channel_drops_and_counts_never_blocks() {
        let fe = frontend();
        // No writer reads: the channel fills and stays full.
        let (tx, _rx) = sync_channel(2);
        let log = AccessLog {
            tx,
            dropped: Counter::default(),
        };
        for _ in 0..5 {
            log.push(record(fe.clone(), End::Fin));
        }
        assert_eq!(log.dropped().get(), 3);
    }

    #[test]
    fn finish_writes_everything_pushed_before() {
        let (log, writer, buf) = to_buffer(LogFormat::Text);
        let fe = frontend();
        for ended in [End::Fin, End::Reset, End::Drain] {
            log.push(record(fe.clone(), ended));
        }
        writer.finish();
        let text = buf.text();
        let ends: Vec<&str> = text
            .lines()
            .filter_map(|l| l.rsplit("ended=").next())
            .collect();
        assert_eq!(ends, vec!["fin", "reset", "drain"]);
        assert_eq!(log.dropped().get(), 0);
    }
}
