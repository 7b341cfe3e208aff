//! The span pipeline's bound and its accounting: how many spans wait, how many were dropped.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Span, SpanData, SpanExporter, SpanProcessor,
};

/// Most spans waiting for export; beyond it new spans are dropped (about 2 MB of memory at worst).
const MAX_QUEUED: usize = 2048;
/// Spans per export request.
const MAX_BATCH: usize = 512;

/// Name of the counter of spans that never reached the collector.
pub(super) const DROPPED_METRIC: &str = "gateway_spans_dropped_total";

/// Spans between the processor and the collector, shared by [`BoundedProcessor`] and
/// [`CountingExporter`].
#[derive(Debug, Default)]
pub(super) struct Backlog {
    /// Ended spans handed to the batch processor and not yet taken by an export.
    queued: AtomicUsize,
    /// Spans dropped so far (queue full, failed exports, left over at shutdown).
    dropped: AtomicUsize,
    /// Whether the last export failed, so an outage is logged once rather than per batch.
    failing: AtomicBool,
    /// Whether a full queue was already logged.
    full_logged: AtomicBool,
}

/// The SDK's batch processor behind a bound of our own.
///
/// The SDK's processor also drops spans when its queue is full, but only tells how many at shutdown;
/// bounding it here (below its own capacity, so it never drops itself) counts every drop as it happens.
pub(super) struct BoundedProcessor {
    inner: BatchSpanProcessor,
    backlog: Arc<Backlog>,
}

/// The OTLP exporter, counting what it takes off the queue and what fails to arrive.
struct CountingExporter<E> {
    inner: E,
    backlog: Arc<Backlog>,
}

// === impl Backlog ===

impl Backlog {
    fn dropped(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.dropped.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(DROPPED_METRIC).increment(n as u64);
    }

    /// Counts the spans still queued as dropped: called once the exporter has stopped.
    pub(super) fn drop_remaining(&self) {
        let left = self.queued.swap(0, Ordering::AcqRel);
        self.dropped(left);
        let total = self.dropped.load(Ordering::Relaxed);
        if total > 0 {
            tracing::warn!(
                dropped = total,
                "spans dropped in total: the collector was unreachable or too slow"
            );
        }
    }
}

// === impl BoundedProcessor ===

impl BoundedProcessor {
    pub(super) fn new<E>(exporter: E, backlog: Arc<Backlog>) -> Self
    where
        E: SpanExporter + 'static,
    {
        let config = BatchConfigBuilder::default()
            // Room for everything this bound admits plus a batch being assembled: the SDK's own
            // queue never fills, so every drop happens (and is counted) here.
            .with_max_queue_size(MAX_QUEUED + MAX_BATCH)
            .with_max_export_batch_size(MAX_BATCH)
            .build();
        let exporter = CountingExporter {
            inner: exporter,
            backlog: backlog.clone(),
        };
        Self {
            inner: BatchSpanProcessor::new(exporter, config),
            backlog,
        }
    }
}

impl fmt::Debug for BoundedProcessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedProcessor")
            .field("backlog", &self.backlog)
            .finish_non_exhaustive()
    }
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let admitted = self
            .backlog
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_QUEUED).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            self.inner.on_end(span);
            return;
        }
        self.backlog.dropped(1);
        if !self.backlog.full_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                max = MAX_QUEUED,
                "span queue full: dropping spans until the collector catches up"
            );
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

// === impl CountingExporter ===

impl<E: fmt::Debug> fmt::Debug for CountingExporter<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountingExporter")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let b = &self.backlog;
        // Saturating: spans queued before a restart of the count must not wrap it around.
        let _ = b
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                Some(q.saturating_sub(n))
            });
        let result = self.inner.export(batch).await;
        match &result {
            Err(err) => {
                b.dropped(n);
                if !b.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %err, spans = n, "cannot export spans; dropping them until the collector answers");
                }
            }
            Ok(()) => {
                if b.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("span export works again");
                }
                b.full_logged.store(false, Ordering::Relaxed);
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn shutdown(&self) -> OTelSdkResult {
        self.inner.shutdown()
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Span as _, Tracer, TracerProvider as _};
    use opentelemetry_sdk::error::OTelSdkError;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use std::sync::Mutex;

    /// An exporter that fails every export, or counts what it exports.
    #[derive(Debug, Default)]
    struct Stub {
        fail: bool,
        exported: Arc<Mutex<usize>>,
    }

    impl SpanExporter for Stub {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.fail {
                return Err(OTelSdkError::InternalFailure("collector down".into()));
            }
            *self.exported.lock().unwrap() += batch.len();
            Ok(())
        }
    }

    fn provider(stub: Stub, backlog: Arc<Backlog>) -> SdkTracerProvider {
        SdkTracerProvider::builder()
            .with_span_processor(BoundedProcessor::new(stub, backlog))
            .build()
    }

    #[test]
    fn failed_exports_are_counted_as_dropped() {
        let backlog = Arc::new(Backlog::default());
        let p = provider(
            Stub {
                fail: true,
                ..Stub::default()
            },
            backlog.clone(),
        );
        let tracer = p.tracer("t");
        for _ in 0..10 {
            tracer.start("s").end();
        }
        let _ = p.force_flush();
        assert_eq!(backlog.dropped.load(Ordering::Relaxed), 10);
        assert_eq!(backlog.queued.load(Ordering::Relaxed), 0);
        let _ = p.shutdown();
    }

    #[test]
    fn spans_beyond_the_bound_are_dropped_and_counted() {
        let backlog = Arc::new(Backlog::default());
        let exported = Arc::new(Mutex::new(0));
        let p = provider(
            Stub {
                fail: false,
                exported: exported.clone(),
            },
            backlog.clone(),
        );
        // As if the exporter were stuck: the queue is already at its bound.
        backlog.queued.store(MAX_QUEUED, Ordering::Relaxed);
        let tracer = p.tracer("t");
        for _ in 0..3 {
            tracer.start("s").end();
        }
        assert_eq!(backlog.dropped.load(Ordering::Relaxed), 3);
        backlog.queued.store(0, Ordering::Relaxed);
        tracer.start("s").end();
        let _ = p.force_flush();
        assert_eq!(*exported.lock().unwrap(), 1);
        assert_eq!(backlog.dropped.load(Ordering::Relaxed), 3);
        let _ = p.shutdown();
    }
}
