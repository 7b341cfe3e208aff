//! The access log: one JSON line per request on stdout. No secrets and no content: names, statuses,
//! counts and durations only.

use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gateway_layers::failover::Attempt;
use gateway_layers::record::{End, Record};
use serde::Serialize;
use serde::ser::{SerializeSeq, Serializer};

use super::observation::Observation;

#[derive(Serialize)]
struct Line<'a> {
    #[serde(serialize_with = "display")]
    timestamp: Rfc3339,
    request_id: Option<&'a str>,
    /// The peer's IP address (a proxy's, behind one).
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<IpAddr>,
    consumer: Option<&'a str>,
    deployment: Option<&'a str>,
    operation: &'a str,
    stream: bool,
    status: u16,
    backend: Option<&'a str>,
    region: Option<&'a str>,
    attempts: Attempts<'a>,
    tokens: Option<Tokens>,
    /// The `service_tier` asked for and the one that served, when either was named.
    #[serde(skip_serializing_if = "Option::is_none")]
    service_tier: Option<Tiers>,
    durations: Durations,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<&'a str>,
    client_closed: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    body_error: bool,
    /// The gateway cut the response at the end of its shutdown grace.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    shutdown: bool,
}

struct Attempts<'a>(&'a [Attempt]);

#[derive(Serialize)]
struct AttemptLine<'a> {
    backend: &'a str,
    status: Option<u16>,
    outcome: &'a str,
    elapsed_ms: f64,
}

#[derive(Serialize)]
struct Tokens {
    prompt: u64,
    completion: u64,
    total: u64,
    /// Of `prompt`, tokens served from the prompt cache (as the backend reported them).
    cached_prompt: u64,
    /// Of `completion`, tokens spent on reasoning (as the backend reported them).
    reasoning: u64,
    /// True when the backend did not report usage and these are the gateway's estimate.
    estimated: bool,
}

#[derive(Serialize)]
struct Tiers {
    requested: &'static str,
    served: &'static str,
}

#[derive(Serialize)]
struct Durations {
    ttfb_ms: f64,
    total_ms: f64,
    overhead_ms: f64,
}

/// A UTC timestamp such as `2025-06-01T12:00:00.123Z`.
pub(crate) struct Rfc3339(pub(crate) SystemTime);

/// Writes the line of a request. A closed or failing stdout is ignored: the log must never fail or
/// delay a request beyond the write itself.
pub(super) fn write(obs: &Observation, record: Option<&Record>, end: End, total: Duration) {
    let served_by = obs.served_by(record);
    let request = record.and_then(Record::request);
    let line = Line {
        timestamp: Rfc3339(obs.wall),
        request_id: record.and_then(|r| r.request_id().to_str().ok()),
        client: obs.client,
        consumer: record.and_then(Record::consumer).map(|c| &**c),
        deployment: obs
            .undeclared
            .as_deref()
            .or_else(|| (&*obs.deployment != super::UNKNOWN).then_some(&*obs.deployment)),
        operation: request.map_or(super::UNKNOWN, |r| r.operation.as_str()),
        stream: request.is_some_and(|r| r.stream),
        status: obs.status,
        backend: served_by.map(|b| &*b.name),
        region: served_by.map(|b| &*b.region),
        attempts: Attempts(
            record
                .and_then(Record::failover)
                .map_or(&[], |r| &r.attempts),
        ),
        tokens: record.and_then(tokens),
        service_tier: record.and_then(tiers),
        durations: Durations {
            ttfb_ms: ms(obs.ttfb),
            total_ms: ms(total),
            overhead_ms: ms(obs.overhead),
        },
        limit: record.and_then(Record::limit).map(|l| l.as_str()),
        client_closed: end == End::ClientClosed && !record.is_some_and(Record::shutdown),
        body_error: end == End::Error,
        shutdown: record.is_some_and(Record::shutdown),
    };
    let mut buf = Vec::with_capacity(512);
    if serde_json::to_writer(&mut buf, &line).is_err() {
        return;
    }
    buf.push(b'\n');
    writer().send(buf);
}

/// Lines go to stdout from a thread of their own, through a bounded queue: a slow or stalled log
/// pipe must not block the runtime's workers, and with them every request. When the queue is full
/// the line is dropped and counted.
///
/// The thread writes in batches: it wakes for the first line after a quiet spell, writes whatever
/// has queued up by then in one write, and then rests [`BATCH`] before it looks again. Woken for every
/// line, it cost a futex wake on the request's worker, a context switch and a `write` per request:
/// under load, about a tenth of the gateway's CPU (docs/benchmarks.md, "Profile of the hot path").
struct Writer {
    queue: std::sync::mpsc::SyncSender<Message>,
}

enum Message {
    Line(Vec<u8>),
    /// Answered once every line queued before it is written.
    Flush(std::sync::mpsc::Sender<()>),
}

/// Lines waiting for stdout at most.
const QUEUE: usize = 8192;
/// The writer's rest between batches: how late a line may reach stdout under load. The queue holds
/// far more than a rest's worth of lines at any rate the gateway serves.
const BATCH: Duration = Duration::from_millis(10);
/// A batch larger than this is written before the queue is drained further.
const BATCH_BYTES: usize = 256 * 1024;

fn writer() -> &'static Writer {
    static WRITER: std::sync::OnceLock<Writer> = std::sync::OnceLock::new();
    WRITER.get_or_init(|| {
        let (queue, lines) = std::sync::mpsc::sync_channel::<Message>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_batches(&lines));
        if let Err(err) = spawned {
            tracing::error!(%err, "cannot start the access-log writer; access log lines are lost");
        }
        Writer { queue }
    })
}

/// The writer thread: until every sender is gone, waits for a line, writes what queued up with it,
/// and rests. Whole lines only, so lines never interleave with another writer's.
fn write_batches(lines: &std::sync::mpsc::Receiver<Message>) {
    let stdout = std::io::stdout();
    let mut batch: Vec<u8> = Vec::with_capacity(64 * 1024);
    // Blocks only while nothing is queued: an idle gateway's writer sleeps until the next line.
    while let Ok(first) = lines.recv() {
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Line(line) => {
                    batch.extend_from_slice(&line);
                    if batch.len() >= BATCH_BYTES {
                        let _ = stdout.lock().write_all(&batch);
                        batch.clear();
                    }
                }
                Message::Flush(done) => {
                    let mut out = stdout.lock();
                    let _ = out.write_all(&batch);
                    let _ = out.flush();
                    batch.clear();
                    let _ = done.send(());
                }
            }
            next = lines.try_recv().ok();
        }
        if !batch.is_empty() {
            let _ = stdout.lock().write_all(&batch);
            batch.clear();
        }
        // Lines sent during the rest find no receiver waiting: their senders wake nobody.
        std::thread::sleep(BATCH);
    }
}

impl Writer {
    fn send(&self, line: Vec<u8>) {
        if self.queue.try_send(Message::Line(line)).is_err() {
            metrics::counter!("gateway_access_log_dropped_total").increment(1);
        }
    }
}

/// Waits, at most `limit`, until every access-log line queued so far is on stdout: the last
/// requests' lines (streams cut at shutdown among them) must not be lost when the process exits.
/// Blocks the calling thread.
pub fn flush(limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    let (done, flushed) = std::sync::mpsc::channel();
    let mut message = Message::Flush(done);
    loop {
        match writer().queue.try_send(message) {
            Ok(()) => break,
            Err(std::sync::mpsc::TrySendError::Full(back))
                if std::time::Instant::now() < deadline =>
            {
                message = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
    let _ = flushed.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
}

/// What the call was charged (the figure the consumer's limits counted): the backend's usage, or the
/// gateway's own measure when it never told.
fn tokens(record: &Record) -> Option<Tokens> {
    let charge = record.charged()?;
    let u = charge.usage;
    Some(Tokens {
        prompt: u.prompt,
        completion: u.completion,
        total: u.total,
        cached_prompt: u.cached_prompt,
        reasoning: u.reasoning,
        estimated: charge.estimated,
    })
}

fn tiers(record: &Record) -> Option<Tiers> {
    let requested = record.request().and_then(|r| r.service_tier);
    let served = record.service_tier();
    (requested.is_some() || served.is_some()).then(|| Tiers {
        requested: super::observation::tier_label(requested),
        served: super::observation::tier_label(served),
    })
}

/// Milliseconds with microsecond precision.
fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

fn display<T: fmt::Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

// === impl Attempts ===

impl Serialize for Attempts<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for a in self.0 {
            seq.serialize_element(&AttemptLine {
                backend: &a.backend_name,
                status: a.status,
                outcome: a.outcome.as_str(),
                elapsed_ms: ms(a.elapsed),
            })?;
        }
        seq.end()
    }
}

// === impl Rfc3339 ===

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let (year, month, day) = civil_from_days(secs / 86_400);
        let rem = secs % 86_400;
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            since.subsec_millis()
        )
    }
}

/// Year, month and day of the `days`-th day after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_core::tokens::Usage;

    #[test]
    fn tokens_are_what_was_charged_with_their_cached_and_reasoning_parts() {
        let record = Record::new(http::HeaderValue::from_static("r"), None);
        assert!(tokens(&record).is_none(), "nothing charged, no tokens");
        let measured = Usage {
            prompt: 12,
            completion: 30,
            total: 42,
            ..Usage::default()
        };
        record.set_estimated_usage(measured);
        let line = serde_json::to_value(tokens(&record)).unwrap();
        assert_eq!(
            line,
            serde_json::json!({"prompt": 12, "completion": 30, "total": 42, "cached_prompt": 0,
                "reasoning": 0, "estimated": true})
        );
        record.set_usage(Usage {
            prompt: 2000,
            completion: 300,
            total: 2300,
            cached_prompt: 1920,
            reasoning: 256,
        });
        let line = serde_json::to_value(tokens(&record)).unwrap();
        assert_eq!(
            line,
            serde_json::json!({"prompt": 2000, "completion": 300, "total": 2300,
                "cached_prompt": 1920, "reasoning": 256, "estimated": false})
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let at = |secs: u64, ms: u64| {
            Rfc3339(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms)).to_string()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_748_779_200, 123), "2025-06-01T12:00:00.123Z");
        assert_eq!(at(4_107_542_399, 999), "2100-02-28T23:59:59.999Z");
    }
}
