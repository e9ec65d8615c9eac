//! Webhooks: registering an endpoint for a paused `webhook` node, and the HTTP receiver that
//! turns a call into an event for the workers.
//!
//! [`register_endpoint`] stores `{webhook_id: "<run>:<node>", event_name:
//! "webhook:<run>:<node>", url}` and returns `{url, event}`. [`WebhookServer`] (a blocking
//! server, [`HttpServer`](crate::services::http::HttpServer)) serves `POST /webhooks/<runId>/<nodeId>`:
//!
//! | answer | when |
//! | --- | --- |
//! | 202 | accepted: `{"event", "payload"}` was published (confirmed) to the events exchange |
//! | 400 | the body is not JSON, or not a value PostgreSQL can store (see [`limits`](crate::vocabulary::limits)); a run or node id that is empty, longer than 256 bytes or has a control character; a malformed request |
//! | 401 | a secret is configured and `X-Flowcraft-Signature` is not `sha256=<hex HMAC-SHA256 of the body>` |
//! | 404 | no such endpoint (or not `POST /webhooks/<run>/<node>`: 404/405) |
//! | 409 | the webhook already fired: its node was resumed (it fires once per pause) |
//! | 408 | the request did not arrive whole within 10 s |
//! | 411 | a chunked body (send `Content-Length`) |
//! | 413 | the body is over the limit (default 1 MiB) |
//! | 431 | the request line and headers are over 16 KiB |
//! | 500 | the handler panicked (that request only) |
//! | 503 | a service is unreachable, the node has not paused yet, or every connection slot is taken; nothing was recorded, retry |

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::runtime::error::Error;
use crate::runtime::message::{webhook_event_name, EventMessage};
use crate::runtime::scheduling;
use crate::services::http::{HttpLimits, HttpServer, Request, Response};
use crate::services::postgres::store::{RunStore, StoreError};
use crate::services::rabbitmq::{self as amqp, JobSink, KeptPublisher};
use crate::services::redis::RedisCoordinationStore;
use crate::services::url::percent_decode;
use crate::vocabulary::keys::{meta_key, output_key, AWAITING_DETAILS, AWAITING_NODE_IDS};
use crate::vocabulary::limits::{check_id, check_storable};
use crate::vocabulary::RunStatus;

/// Default body limit.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// The signature header.
pub const SIGNATURE_HEADER: &str = "X-Flowcraft-Signature";

/// A registered endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookEndpoint {
    /// Where to call it: `<public_url>/webhooks/<runId>/<nodeId>`.
    pub url: String,
    /// The event a call publishes: `webhook:<runId>:<nodeId>`.
    pub event: String,
}

/// Registers (idempotently) the endpoint of a run's webhook node.
pub fn register_endpoint(
    store: &RunStore,
    public_url: &str,
    run_id: &str,
    node_id: &str,
) -> Result<WebhookEndpoint, StoreError> {
    let url = format!(
        "{}/webhooks/{run_id}/{node_id}",
        public_url.trim_end_matches('/')
    );
    let event = webhook_event_name(run_id, node_id);
    store.register_webhook(&format!("{run_id}:{node_id}"), &event, &url)?;
    Ok(WebhookEndpoint { url, event })
}

/// `sha256=<hex>` of the body under a secret.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

fn signature_matches(secret: &str, body: &[u8], header: &str) -> bool {
    let hex = header
        .trim()
        .strip_prefix("sha256=")
        .unwrap_or(header.trim());
    let Some(expected) = decode_hex(hex) else {
        return false;
    };
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// Options of the receiver.
pub struct WebhookOptions {
    /// Where runs and registered endpoints are looked up.
    pub store: RunStore,
    /// Holds the markers that let a webhook fire once per pause (kept one hour).
    pub coord: RedisCoordinationStore,
    /// RabbitMQ URL that accepted calls are published through.
    pub amqp_url: String,
    /// The events exchange (durable fanout, declared on start) accepted calls go to.
    pub exchange: String,
    /// Shared secret for `X-Flowcraft-Signature`; `None` accepts unsigned calls.
    pub secret: Option<String>,
    /// Largest accepted body in bytes (413 above it); the CLI default is [`DEFAULT_MAX_BODY`].
    pub max_body: usize,
}

struct Receiver {
    options: WebhookOptions,
    publisher: KeptPublisher,
}

/// A running webhook receiver.
pub struct WebhookServer {
    server: HttpServer,
}

impl WebhookServer {
    /// Listens on `addr` (e.g. `127.0.0.1:8080`; port 0 picks a free port). The server's
    /// bounds are [`HttpLimits`]' defaults, with `options.max_body` for bodies.
    pub fn start(addr: &str, options: WebhookOptions) -> Result<WebhookServer, Error> {
        let exchange = options.exchange.clone();
        let declare: amqp::Declare = Box::new(move |channel| {
            channel.exchange_declare(
                amiquip::ExchangeType::Fanout,
                exchange.clone(),
                amiquip::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
            )?;
            Ok(())
        });
        let limits = HttpLimits {
            max_body: options.max_body,
            ..HttpLimits::default()
        };
        let publisher = KeptPublisher::new(options.amqp_url.clone(), declare);
        let receiver = Receiver { options, publisher };
        let server = HttpServer::start(
            addr,
            "flowcraft-webhooks",
            limits,
            Arc::new(move |request: &Request| receiver.answer(request)),
        )
        .map_err(|source| Error::Listen {
            what: "webhooks",
            addr: addr.to_string(),
            source,
        })?;
        log::info!(
            "webhook receiver listening on http://{}",
            server.local_addr()
        );
        Ok(WebhookServer { server })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Stops accepting requests and waits for the handler threads.
    pub fn stop(self) {
        self.server.stop();
    }
}

impl Receiver {
    fn answer(&self, request: &Request) -> Response {
        let parts: Vec<&str> = request.path.trim_matches('/').split('/').collect();
        let (run, node) = match parts.as_slice() {
            ["webhooks", run, node] if !run.is_empty() && !node.is_empty() => {
                (percent_decode(run), percent_decode(node))
            }
            _ => return Response::error(404, "not found: use POST /webhooks/<runId>/<nodeId>"),
        };
        if request.method != "POST" {
            return Response::error(405, "use POST");
        }
        if let Err(reason) =
            check_id("the run id", &run).and_then(|()| check_id("the node id", &node))
        {
            return Response::error(400, &reason);
        }
        let body = &request.body;
        // The signature first: an unsigned caller learns nothing, not even which webhooks exist.
        if let Some(secret) = &self.options.secret {
            match request.header(SIGNATURE_HEADER) {
                Some(sig) if signature_matches(secret, body, sig) => {}
                Some(_) => return Response::error(401, "the signature does not match the body"),
                None => return Response::error(401, &format!("missing {SIGNATURE_HEADER} header")),
            }
        }
        // A webhook fires once per pause: once its node is no longer awaited (resumed, or the
        // run ended), every call is a replay. The marker (per loop iteration) stops two calls
        // racing within the same pause; it expires, so a receiver that crashed between
        // marker and publish does not block the webhook for good.
        // The keys this reads, not the whole run.
        let keys = vec![
            AWAITING_NODE_IDS.to_string(),
            AWAITING_DETAILS.to_string(),
            output_key(&node),
            meta_key(&node),
        ];
        let (awaited, fired_before) = match self.options.store.load_keys(&run, keys) {
            Ok(Some(s)) => (
                scheduling::awaited_details(&s.context, &node)
                    .filter(|d| d.get("type").and_then(Value::as_str) == Some("webhook"))
                    .map(scheduling::paused_iteration),
                // Fired before, and not a node that pauses again (in a loop) in a running run.
                s.context.contains_key(&output_key(&node))
                    && (crate::runtime::scheduling::execution_count(&s.context, &node) == 0
                        || s.status != Some(RunStatus::Running)),
            ),
            Ok(None) => (None, false),
            Err(e) => {
                log::warn!("webhook lookup failed: {e}");
                return Response::error(503, "the database is unavailable; retry later");
            }
        };
        if awaited.is_none() {
            // An awaited webhook node registered its endpoint before pausing; otherwise
            // look the endpoint up, to tell an unknown webhook from one called too early or
            // too late.
            let webhook_id = format!("{run}:{node}");
            match self.options.store.webhook(&webhook_id) {
                Ok(Some(_)) => {}
                Ok(None) => return Response::error(404, "unknown webhook"),
                Err(e) => {
                    log::warn!("webhook lookup failed: {e}");
                    return Response::error(503, "the database is unavailable; retry later");
                }
            }
        }
        let payload: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return Response::error(400, &format!("the body is not JSON: {e}")),
        };
        if let Err(reason) = check_storable("the body", &payload, 0) {
            return Response::error(400, &reason);
        }
        let Some(iteration) = awaited else {
            if fired_before {
                return Response::error(
                    409,
                    "this webhook already fired (its node is not awaiting a call)",
                );
            }
            // Registered, but the pause is not committed yet: the caller should retry.
            return Response::error(
                503,
                "the run is not waiting for this call yet; retry shortly",
            );
        };
        let fired_key = self
            .options
            .coord
            .key(&format!("webhook:fired:{run}:{node}:{iteration}"));
        match self
            .options
            .coord
            .set_if_not_exist(&fired_key, "1", Duration::from_secs(3600))
        {
            Ok(true) => {}
            Ok(false) => return Response::error(409, "this webhook already fired"),
            Err(e) => {
                log::warn!("webhook marker failed: {e}");
                return Response::error(503, "Redis is unavailable; retry later");
            }
        }
        let Ok(iteration) = u32::try_from(iteration) else {
            return Response::error(400, "the awaited iteration is out of range");
        };
        let event = EventMessage::webhook(&run, &node, iteration, payload);
        if let Err(e) = self.publish(&event) {
            log::warn!("cannot publish webhook event {}: {e}", event.event);
            let _ = self.options.coord.delete(&[fired_key]);
            return Response::error(503, "RabbitMQ is unavailable; retry later");
        }
        log::info!("run {run}: webhook '{node}' accepted");
        Response::json(202, &json!({"accepted": true, "event": event.event}))
    }

    fn publish(&self, event: &EventMessage) -> Result<(), Error> {
        self.publisher.with(
            |publisher| {
                publisher
                    .publish_jobs(&self.options.exchange, "", &[event.to_body()])
                    .map_err(Error::from)
            },
            |_| true,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify() {
        let sig = sign("s3cret", b"{\"a\":1}");
        assert!(sig.starts_with("sha256=") && sig.len() == 7 + 64);
        assert!(signature_matches("s3cret", b"{\"a\":1}", &sig));
        assert!(!signature_matches("s3cret", b"{\"a\":2}", &sig));
        assert!(!signature_matches("other", b"{\"a\":1}", &sig));
        assert!(!signature_matches("s3cret", b"{\"a\":1}", "sha256=zz"));
    }

    #[test]
    fn paths_decode() {
        assert_eq!(percent_decode("a%3Ab"), "a:b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
