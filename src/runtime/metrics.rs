//! [`Metrics`]: what a worker counts, in Prometheus' text format, and the HTTP endpoints an
//! operator and a load balancer read: `GET /metrics`, `GET /healthz` (the process serves)
//! and `GET /readyz` (it consumes, and PostgreSQL and Redis answer; 503 with the reason
//! otherwise). Labels are bounded: outcomes and node types, never a run id.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::runtime::error::{Error, Result};
use crate::services::http::{HttpLimits, HttpServer, Request, Response};
use crate::services::postgres::store::RunStore;
use crate::services::redis::RedisCoordinationStore;

/// A worker's metrics.
pub struct Metrics {
    registry: Registry,
    /// Deliveries settled, by outcome: `ack`, `retry`, `dead_letter`.
    pub jobs: IntCounterVec,
    /// Node execution time in seconds, by `uses`.
    pub node_seconds: HistogramVec,
    /// Deliveries received and not yet settled.
    pub in_flight: IntGauge,
    /// Connections to RabbitMQ opened again after a loss.
    pub reconnects: IntCounter,
    /// Whether a session is consuming right now.
    pub consuming: AtomicBool,
    /// Runs by outcome: `started`, `completed`, `failed`.
    pub runs: IntCounterVec,
    /// Seconds from a job's delivery to its settlement (its successors published and
    /// confirmed): a chain's hop latency, but for the broker's own delivery time.
    pub job_seconds: Histogram,
    /// Node commits per commit statement.
    pub commit_batch: Histogram,
    /// Reconciler passes.
    pub reconciler_passes: IntCounter,
    /// Runs a reconciler pass recovered (stalled runs reconciled, lost wake-ups sent).
    pub recovered_runs: IntCounter,
    /// Successors' run state read ahead, by outcome: `used` by their delivery, `unused`
    /// (expired: the delivery came late, or to another process).
    pub read_ahead: IntCounterVec,
}

/// A metric, once `registry` holds it (our names are valid and distinct).
fn registered<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<C>,
) -> C {
    let metric = metric.expect("a valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are distinct");
    metric
}

impl Metrics {
    /// Fresh metrics, registered under the `flowcraft_` names.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let jobs = registered(
            &registry,
            IntCounterVec::new(
                Opts::new("flowcraft_jobs_total", "Deliveries settled, by outcome"),
                &["outcome"],
            ),
        );
        let node_seconds = registered(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "flowcraft_node_duration_seconds",
                    "Node execution time, by node type",
                ),
                &["uses"],
            ),
        );
        let in_flight = registered(
            &registry,
            IntGauge::new(
                "flowcraft_deliveries_in_flight",
                "Deliveries received and not yet settled",
            ),
        );
        let reconnects = registered(
            &registry,
            IntCounter::new(
                "flowcraft_reconnects_total",
                "RabbitMQ connections opened again after a loss",
            ),
        );
        let runs = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "flowcraft_runs_total",
                    "Runs, by outcome: started, completed, failed",
                ),
                &["outcome"],
            ),
        );
        let job_seconds = registered(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "flowcraft_job_latency_seconds",
                    "From a job's delivery to its settlement, successors published and confirmed",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            ),
        );
        let commit_batch = registered(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "flowcraft_commit_batch_size",
                    "Node commits per commit statement",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
            ),
        );
        let reconciler_passes = registered(
            &registry,
            IntCounter::new("flowcraft_reconciler_passes_total", "Reconciler passes"),
        );
        let recovered_runs = registered(
            &registry,
            IntCounter::new(
                "flowcraft_recovered_runs_total",
                "Runs a reconciler pass recovered: stalled runs reconciled, awaiting runs woken",
            ),
        );
        let read_ahead = registered(&registry, IntCounterVec::new(
            Opts::new(
                "flowcraft_read_ahead_total",
                "Successors' run state read ahead during their delivery, by outcome: used, unused",
            ),
            &["outcome"],
        ));
        Metrics {
            registry,
            jobs,
            node_seconds,
            in_flight,
            reconnects,
            consuming: AtomicBool::new(false),
            runs,
            job_seconds,
            commit_batch,
            reconciler_passes,
            recovered_runs,
            read_ahead,
        }
    }

    /// The metrics in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr`.
pub(crate) fn serve(
    addr: &str,
    metrics: Arc<Metrics>,
    store: RunStore,
    coord: RedisCoordinationStore,
) -> Result<HttpServer> {
    let handler = move |request: &Request| -> Response {
        if request.method != "GET" {
            return Response::error(405, "use GET");
        }
        match request.path.as_str() {
            "/metrics" => Response {
                status: 200,
                content_type: "text/plain; version=0.0.4".into(),
                body: metrics.render().into_bytes(),
            },
            "/healthz" => Response::json(200, &serde_json::json!({"status": "ok"})),
            "/readyz" => {
                let mut problems = Vec::new();
                if !metrics.consuming.load(Ordering::SeqCst) {
                    problems.push("not consuming from RabbitMQ".to_string());
                }
                if let Err(e) = store.ping() {
                    problems.push(format!("PostgreSQL: {e}"));
                }
                if let Err(e) = coord.ping() {
                    problems.push(format!("Redis: {e}"));
                }
                if problems.is_empty() {
                    Response::json(200, &serde_json::json!({"status": "ready"}))
                } else {
                    Response::json(
                        503,
                        &serde_json::json!({"status": "not ready", "problems": problems}),
                    )
                }
            }
            _ => Response::error(404, "use /metrics, /healthz or /readyz"),
        }
    };
    HttpServer::start(
        addr,
        "flowcraft-metrics",
        HttpLimits {
            max_body: 0,
            threads: 2,
            ..HttpLimits::default()
        },
        Arc::new(handler),
    )
    .map_err(|source| Error::Listen {
        what: "metrics",
        addr: addr.to_string(),
        source,
    })
}
