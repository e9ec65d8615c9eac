//! RabbitMQ plumbing: connecting (with TCP_NODELAY), declaring the job queue with its
//! dead-letter queue, and publishing with publisher confirms.
//!
//! amiquip never sets TCP_NODELAY, and "publish, then wait for the confirm" then stalls
//! ~40 ms per message (Nagle against the broker's delayed ACK). [`connect`] therefore opens
//! the socket itself, sets nodelay, and hands it to amiquip.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, AmqpValue, Auth, Channel, Confirm, ConfirmSmoother, Connection,
    ConnectionOptions, ConnectionTuning, FieldTable, Publish, QueueDeclareOptions,
};
use crossbeam_channel::Receiver;

use crate::services::url::{mask_url, percent_decode};
use crate::vocabulary::limits::cut_reason;

/// Errors talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// A URL that is not a valid `amqp://` URL.
    #[error("invalid AMQP URL '{url}': {reason}")]
    InvalidUrl {
        /// The URL, with its password masked.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The broker could not be reached or refused the connection.
    #[error("cannot connect to RabbitMQ at {url}: {reason}")]
    Connect {
        /// The URL, with its password masked.
        url: String,
        /// Why connecting failed.
        reason: String,
    },
    /// An error from the AMQP client (amiquip) on an open connection or channel.
    #[error("RabbitMQ: {0}")]
    Protocol(Box<amiquip::Error>),
    /// The broker did not confirm a publish within this time (30 s).
    #[error("RabbitMQ did not confirm a publish within {0:?}")]
    ConfirmTimeout(Duration),
    /// The broker nacked a published message.
    #[error("RabbitMQ refused (nacked) a publish")]
    Nacked,
    /// Publishing is unavailable: opening a connection or channel failed earlier.
    #[error("RabbitMQ is unavailable: {0}")]
    Unavailable(String),
    /// The connection or channel closed before the confirms arrived.
    #[error("the RabbitMQ connection is closed")]
    Closed,
}

impl From<amiquip::Error> for AmqpError {
    fn from(e: amiquip::Error) -> Self {
        AmqpError::Protocol(Box::new(e))
    }
}

/// The parts of an `amqp://user:pass@host:port/vhost` URL.
#[derive(Debug, Clone, PartialEq)]
pub struct AmqpUrl {
    /// User name, percent-decoded (`guest` when the URL has no user info).
    pub username: String,
    /// Password, percent-decoded (`guest` without user info; empty when only a user is given).
    pub password: String,
    /// Host name or IP address.
    pub host: String,
    /// TCP port (5672 when absent).
    pub port: u16,
    /// Virtual host, percent-decoded (`/` when the path is absent or empty).
    pub vhost: String,
}

impl AmqpUrl {
    /// Parses an AMQP URL (`amqp://` only; defaults guest/guest, port 5672, vhost `/`).
    pub fn parse(url: &str) -> Result<AmqpUrl, AmqpError> {
        let bad = |reason: &str| AmqpError::InvalidUrl {
            url: mask_url(url),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("amqp://")
            .ok_or_else(|| bad("only amqp:// URLs are supported"))?;
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (rest, None),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((n, p)) => (percent_decode(n), percent_decode(p)),
                None => (percent_decode(u), String::new()),
            },
            None => ("guest".to_string(), "guest".to_string()),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| bad("the port is not a number"))?,
            ),
            None => (hostport, 5672),
        };
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        let vhost = match path {
            None | Some("") => "/".to_string(),
            Some(p) => percent_decode(p),
        };
        Ok(AmqpUrl {
            username,
            password,
            host: host.to_string(),
            port,
            vhost,
        })
    }
}

/// Opens a connection with TCP_NODELAY set on its socket.
pub fn connect(url: &str) -> Result<Connection, AmqpError> {
    connect_named(url, None)
}

/// Like [`connect`], reporting `name` as the connection's `information` client property (it
/// shows in `rabbitmqctl list_connections client_properties`).
pub fn connect_named(url: &str, name: Option<&str>) -> Result<Connection, AmqpError> {
    let parsed = AmqpUrl::parse(url)?;
    let fail = |reason: String| AmqpError::Connect {
        url: mask_url(url),
        reason,
    };
    let addr = (parsed.host.as_str(), parsed.port)
        .to_socket_addrs()
        .map_err(|e| fail(e.to_string()))?
        .next()
        .ok_or_else(|| fail("the host does not resolve".into()))?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| fail(e.to_string()))?;
    stream.set_nodelay(true).map_err(|e| fail(e.to_string()))?;
    let stream = mio::net::TcpStream::from_stream(stream).map_err(|e| fail(e.to_string()))?;
    let options = ConnectionOptions::default()
        .auth(Auth::Plain {
            username: parsed.username,
            password: parsed.password,
        })
        .virtual_host(parsed.vhost)
        .heartbeat(30)
        .connection_timeout(Some(Duration::from_secs(10)))
        .information(name.map(String::from));
    Connection::insecure_open_stream(stream, options, ConnectionTuning::default())
        .map_err(|e| fail(e.to_string()))
}

/// The name of a job queue's dead-letter queue.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// How many messages `queue` holds; `None` if no such queue exists (a passive declare; the
/// broker then closes `channel`).
pub fn queue_depth(channel: &Channel, queue: &str) -> Result<Option<u32>, AmqpError> {
    match channel.queue_declare_passive(queue.to_string()) {
        Ok(q) => Ok(Some(q.declared_message_count().unwrap_or(0))),
        // The server closes the channel with 404 NOT_FOUND (a queue named "x404" is not that).
        Err(amiquip::Error::ServerClosedChannel { code: 404, .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Looks at up to `max` messages at the head of `queue`, oldest first, without taking them:
/// each is fetched unacknowledged and shown to `visit`, then all are rejected with requeue,
/// which puts them back where they were (closing the channel would too, should anything
/// fail on the way). They come back marked redelivered. Returns how many were looked at.
pub fn peek_queue(
    channel: &Channel,
    queue: &str,
    max: usize,
    mut visit: impl FnMut(&[u8], &AmqpProperties),
) -> Result<usize, AmqpError> {
    let mut seen = 0;
    let mut last = None;
    while seen < max {
        let Some(got) = channel.basic_get(queue.to_string(), false)? else {
            break;
        };
        seen += 1;
        visit(&got.delivery.body, &got.delivery.properties);
        last = Some(got.delivery);
    }
    if let Some(delivery) = last {
        delivery.nack_multiple(channel, true)?;
    }
    Ok(seen)
}

/// Declares the durable job queue and its dead-letter queue `<queue>.dead`, both without
/// arguments, so a client that declares the job queue as the seed README does
/// (`assertQueue(queue, {durable: true})`) agrees with it. Dead letters are published to
/// `<queue>.dead` explicitly (with a reason header), not routed by a queue argument.
pub fn declare_job_queue(channel: &Channel, queue: &str) -> Result<(), AmqpError> {
    for name in [dead_letter_queue(queue), queue.to_string()] {
        channel.queue_declare(
            name,
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
        )?;
    }
    Ok(())
}

/// Header of a dead-lettered message that says why it was dead-lettered.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-flowcraft-reason";

/// The properties of a dead letter: persistent, the identifying properties the message came
/// with (`message_id`, `correlation_id`, `timestamp`, `type`, `app_id`, content type and
/// encoding) and its headers unless they are large (over [`MAX_KEPT_HEADERS`] as text), with
/// `reason` — cut to [`MAX_REASON_BYTES`](crate::vocabulary::limits::MAX_REASON_BYTES) — in
/// the header [`DEAD_LETTER_REASON_HEADER`]. `user_id` and `expiration` are not kept: the
/// broker would refuse another user's id, and a dead letter must not expire.
pub fn dead_letter_properties(original: &AmqpProperties, reason: &str) -> AmqpProperties {
    let mut headers = match original.headers() {
        Some(h) if format!("{h:?}").len() <= MAX_KEPT_HEADERS => h.clone(),
        _ => FieldTable::new(),
    };
    headers.insert(
        DEAD_LETTER_REASON_HEADER.into(),
        AmqpValue::LongString(cut_reason(reason)),
    );
    let content_type = original
        .content_type()
        .clone()
        .unwrap_or_else(|| "application/json".into());
    let mut properties = AmqpProperties::default()
        .with_delivery_mode(2)
        .with_content_type(content_type)
        .with_headers(headers);
    if let Some(v) = original.content_encoding() {
        properties = properties.with_content_encoding(v.clone());
    }
    if let Some(v) = original.message_id() {
        properties = properties.with_message_id(v.clone());
    }
    if let Some(v) = original.correlation_id() {
        properties = properties.with_correlation_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        properties = properties.with_timestamp(*v);
    }
    if let Some(v) = original.type_() {
        properties = properties.with_type_(v.clone());
    }
    if let Some(v) = original.app_id() {
        properties = properties.with_app_id(v.clone());
    }
    properties
}

/// Largest original headers (as text) a dead letter keeps, so the dead letter's header frame
/// stays far below the broker's frame size.
pub const MAX_KEPT_HEADERS: usize = 16 * 1024;

/// Declares the durable fanout exchange of events and binds the job queue to it, so events
/// (webhook calls) reach the workers with the jobs.
pub fn declare_events(channel: &Channel, exchange: &str, queue: &str) -> Result<(), AmqpError> {
    channel.exchange_declare(
        amiquip::ExchangeType::Fanout,
        exchange,
        amiquip::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
    )?;
    channel.queue_bind(queue, exchange, "", FieldTable::new())?;
    Ok(())
}

/// Declares (idempotently) the delay queue for one duration, `<queue>.delay.<ms>`: its
/// messages expire after at most `ms` and dead-letter into the job queue. One queue per
/// duration keeps every queue in expiry order (RabbitMQ expires messages only at the head).
/// An unused delay queue deletes itself after `ms` + 10 minutes.
pub fn declare_delay_queue(channel: &Channel, queue: &str, ms: u64) -> Result<String, AmqpError> {
    let name = format!("{queue}.delay.{ms}");
    let mut arguments = FieldTable::new();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AmqpValue::LongString(String::new()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AmqpValue::LongString(queue.to_string()),
    );
    let expires = ms.saturating_add(600_000).min(i32::MAX as u64) as i32;
    arguments.insert("x-expires".into(), AmqpValue::LongInt(expires));
    channel.queue_declare(
        name.clone(),
        QueueDeclareOptions {
            durable: true,
            arguments,
            ..QueueDeclareOptions::default()
        },
    )?;
    Ok(name)
}

/// Persistent JSON message properties.
pub fn persistent_json() -> AmqpProperties {
    AmqpProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}

/// Something job messages are published through: a [`ConfirmPublisher`] waits for the
/// broker's confirms; an [`AsyncPublisher`] does not (its confirms are tracked elsewhere).
pub trait JobSink {
    /// Publishes messages with `properties` to an exchange (`""`: routed by queue name).
    fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        bodies: &[Vec<u8>],
        properties: &AmqpProperties,
    ) -> Result<(), AmqpError>;

    /// The channel (to declare queues on).
    fn channel(&self) -> &Channel;

    /// Publishes persistent JSON messages to an exchange (`""`: routed by queue name).
    fn publish_jobs(
        &mut self,
        exchange: &str,
        routing_key: &str,
        bodies: &[Vec<u8>],
    ) -> Result<(), AmqpError> {
        self.publish(exchange, routing_key, bodies, &persistent_json())
    }

    /// Publishes one persistent message to `queue` through its delay queue of `queue_ms`
    /// ([`declare_delay_queue`]), expiring — and so arriving — after `expiration_ms`.
    fn publish_delayed(
        &mut self,
        queue: &str,
        queue_ms: u64,
        body: Vec<u8>,
        expiration_ms: u64,
    ) -> Result<(), AmqpError> {
        let delay_queue = declare_delay_queue(self.channel(), queue, queue_ms)?;
        let properties = persistent_json().with_expiration(expiration_ms.to_string());
        self.publish("", &delay_queue, &[body], &properties)
    }
}

impl JobSink for ConfirmPublisher {
    fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        bodies: &[Vec<u8>],
        properties: &AmqpProperties,
    ) -> Result<(), AmqpError> {
        let first = self.inner.published() + 1;
        self.inner
            .publish(exchange, routing_key, bodies, properties)?;
        self.wait_for_confirms(first)
    }

    fn channel(&self) -> &Channel {
        self.inner.channel()
    }
}

/// A channel in confirm mode whose confirms are consumed by someone else: it only counts
/// its publishes, so the caller knows which delivery tags to wait for.
///
/// Paced ([`pace_with`](AsyncPublisher::pace_with)), it keeps at most
/// [`MAX_UNCONFIRMED`] publishes unconfirmed: a node that makes 100 000 jobs (a batch's
/// scatter) publishes them as the broker takes them, instead of queueing them all in memory.
pub struct AsyncPublisher {
    channel: Channel,
    published: u64,
    /// The highest delivery tag up to which every publish is confirmed, as whoever follows
    /// the confirms records it.
    confirmed: Option<Arc<AtomicU64>>,
}

/// How long a publisher waits for the broker's confirms before it gives up.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Most publishes a paced [`AsyncPublisher`] leaves unconfirmed before it waits.
pub const MAX_UNCONFIRMED: u64 = 2_048;

impl AsyncPublisher {
    /// Puts a channel in confirm mode; returns the publisher and its confirm stream.
    pub fn new(channel: Channel) -> Result<(AsyncPublisher, Receiver<Confirm>), AmqpError> {
        let confirms = channel.listen_for_publisher_confirms()?;
        channel.enable_publisher_confirms()?;
        Ok((
            AsyncPublisher {
                channel,
                published: 0,
                confirmed: None,
            },
            confirms,
        ))
    }

    /// How many messages were published so far: the delivery tag of the latest one.
    pub fn published(&self) -> u64 {
        self.published
    }

    /// Paces publishing by `confirmed` (a [`ConfirmTracker::watermark`] of this channel's
    /// confirms): a publish waits while [`MAX_UNCONFIRMED`] are unconfirmed.
    pub fn pace_with(&mut self, confirmed: Arc<AtomicU64>) {
        self.confirmed = Some(confirmed);
    }

    /// Waits until fewer than [`MAX_UNCONFIRMED`] publishes are unconfirmed (at most
    /// [`CONFIRM_TIMEOUT`] without progress).
    fn wait_for_room(&self) -> Result<(), AmqpError> {
        let Some(confirmed) = &self.confirmed else {
            return Ok(());
        };
        let mut last = confirmed.load(Ordering::Acquire);
        let mut progress = Instant::now();
        while self.published.saturating_sub(last) >= MAX_UNCONFIRMED {
            if progress.elapsed() > CONFIRM_TIMEOUT {
                return Err(AmqpError::ConfirmTimeout(CONFIRM_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(1));
            let now = confirmed.load(Ordering::Acquire);
            if now != last {
                (last, progress) = (now, Instant::now());
            }
        }
        Ok(())
    }

    /// Closes the channel.
    pub fn close(self) -> Result<(), AmqpError> {
        self.channel.close().map_err(AmqpError::from)
    }
}

impl JobSink for AsyncPublisher {
    fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        bodies: &[Vec<u8>],
        properties: &AmqpProperties,
    ) -> Result<(), AmqpError> {
        for body in bodies {
            self.wait_for_room()?;
            self.channel.basic_publish(
                exchange,
                Publish::with_properties(body, routing_key, properties.clone()),
            )?;
            self.published += 1;
        }
        Ok(())
    }

    fn channel(&self) -> &Channel {
        &self.channel
    }
}

/// Follows one channel's publisher confirms: which delivery tags are settled, and whether
/// any of them was refused.
#[derive(Default)]
pub struct ConfirmTracker {
    smoother: ConfirmSmoother,
    confirmed: u64,
    nacked: std::collections::BTreeSet<u64>,
    /// `confirmed`, for the channel's publisher to pace itself by.
    watermark: Arc<AtomicU64>,
}

impl ConfirmTracker {
    /// Takes in one confirm from the broker.
    pub fn record(&mut self, confirm: Confirm) {
        for c in self.smoother.process(confirm) {
            let tag = match c {
                Confirm::Ack(p) => p.delivery_tag,
                Confirm::Nack(p) => {
                    self.nacked.insert(p.delivery_tag);
                    p.delivery_tag
                }
            };
            self.confirmed = self.confirmed.max(tag);
        }
        self.watermark.store(self.confirmed, Ordering::Release);
    }

    /// [`confirmed`](Self::confirmed), shared: what a paced [`AsyncPublisher`] waits on.
    pub fn watermark(&self) -> Arc<AtomicU64> {
        self.watermark.clone()
    }

    /// Every tag up to and including this one is settled.
    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    /// Whether a tag in `first..=last` was refused; forgets refusals before `first`.
    pub fn any_nacked(&mut self, first: u64, last: u64) -> bool {
        self.nacked = self.nacked.split_off(&first);
        self.nacked.range(first..=last).next().is_some()
    }
}

/// A channel in confirm mode: [`publish`](JobSink::publish)
/// returns only once the broker has confirmed every message it sent. (An
/// [`AsyncPublisher`] whose confirms it follows itself.)
pub struct ConfirmPublisher {
    inner: AsyncPublisher,
    confirms: Receiver<Confirm>,
    tracker: ConfirmTracker,
    timeout: Duration,
}

impl ConfirmPublisher {
    /// Puts a channel in confirm mode.
    pub fn new(channel: Channel) -> Result<ConfirmPublisher, AmqpError> {
        let (inner, confirms) = AsyncPublisher::new(channel)?;
        Ok(ConfirmPublisher {
            inner,
            confirms,
            tracker: ConfirmTracker::default(),
            timeout: CONFIRM_TIMEOUT,
        })
    }

    /// Waits until every message published so far is confirmed; an error if one from
    /// `first` on was refused.
    fn wait_for_confirms(&mut self, first: u64) -> Result<(), AmqpError> {
        let last = self.inner.published();
        while self.tracker.confirmed() < last {
            match self.confirms.recv_timeout(self.timeout) {
                Ok(confirm) => self.tracker.record(confirm),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    return Err(AmqpError::ConfirmTimeout(self.timeout))
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(AmqpError::Closed)
                }
            }
        }
        if first <= last && self.tracker.any_nacked(first, last) {
            Err(AmqpError::Nacked)
        } else {
            Ok(())
        }
    }

    /// Closes the channel.
    pub fn close(self) -> Result<(), AmqpError> {
        self.inner.close()
    }
}

/// What a [`KeptPublisher`] declares on a fresh channel before its first publish.
pub type Declare = Box<dyn Fn(&Channel) -> Result<(), AmqpError> + Send + Sync>;

/// A confirm publisher on a connection of its own, opened on first use and kept; dropped
/// when a publish fails, so the next one reconnects. Shared by threads (a client, the
/// webhook receiver's handlers).
pub struct KeptPublisher {
    url: String,
    declare: Declare,
    open: std::sync::Mutex<Option<(Connection, ConfirmPublisher)>>,
}

impl KeptPublisher {
    /// A publisher to `url` that runs `declare` on each new channel.
    pub fn new(url: impl Into<String>, declare: Declare) -> KeptPublisher {
        KeptPublisher {
            url: url.into(),
            declare,
            open: std::sync::Mutex::new(None),
        }
    }

    /// Runs `f` with the publisher (connecting first if needed). If `f` fails and
    /// `broken` says the error is the connection's, the connection is dropped.
    pub fn with<T, E: From<AmqpError>>(
        &self,
        f: impl FnOnce(&mut ConfirmPublisher) -> Result<T, E>,
        broken: impl Fn(&E) -> bool,
    ) -> Result<T, E> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let (_, publisher) = match open.take() {
            Some(kept) => open.insert(kept),
            None => {
                let mut connection = connect(&self.url)?;
                let channel = connection.open_channel(None).map_err(AmqpError::from)?;
                let publisher = ConfirmPublisher::new(channel)?;
                (self.declare)(publisher.channel())?;
                open.insert((connection, publisher))
            }
        };
        let result = f(publisher);
        if result.as_ref().is_err_and(&broken) {
            *open = None;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = AmqpUrl::parse("amqp://guest:s%40cret@127.0.0.1:5673/%2f").unwrap();
        assert_eq!(
            u,
            AmqpUrl {
                username: "guest".into(),
                password: "s@cret".into(),
                host: "127.0.0.1".into(),
                port: 5673,
                vhost: "/".into()
            }
        );
        let u = AmqpUrl::parse("amqp://rabbit").unwrap();
        assert_eq!(
            (u.port, u.vhost.as_str(), u.username.as_str()),
            (5672, "/", "guest")
        );
        assert_eq!(AmqpUrl::parse("amqp://h/prod").unwrap().vhost, "prod");
        assert!(AmqpUrl::parse("http://h").is_err());
        assert!(AmqpUrl::parse("amqp://h:port").is_err());
    }

    #[test]
    fn masks_passwords() {
        assert_eq!(mask_url("amqp://u:secret@h:1/%2f"), "amqp://u:***@h:1/%2f");
        assert_eq!(
            mask_url("postgres://postgres@127.0.0.1/db"),
            "postgres://postgres@127.0.0.1/db"
        );
        assert_eq!(mask_url("redis://:pw@h"), "redis://:***@h");
    }
}
