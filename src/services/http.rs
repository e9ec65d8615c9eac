//! A small HTTP/1.1 server for what this crate serves over HTTP (the webhook receiver),
//! built to survive hostile clients. One thread accepts and reads every connection without
//! blocking on any of them (readiness polling), each under a deadline, and refuses
//! oversized heads and bodies before reading them; only a request read whole goes to one of
//! a fixed pool of handler threads. So slow or silent clients hold a connection slot, never
//! a thread. Each connection carries one request (`Connection: close`), and a handler's
//! panic becomes a `500` for that request alone.
//!
//! | limit | default | past it |
//! | --- | --- | --- |
//! | request line and headers | 16 KiB | `431`, connection closed |
//! | body (`Content-Length`) | set by the caller | `413` before reading the body |
//! | time to read a whole request | 10 s | `408`, connection closed |
//! | connections being read | 64 | `503` at once, connection closed |
//! | requests read, waiting for a handler thread | 64 | `503`, connection closed |
//! | handler threads | 4 | requests wait in the queue above |
//!
//! A body must come with `Content-Length` (`411` otherwise: no chunked uploads);
//! `Expect: 100-continue` is answered.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};

/// Bounds of an [`HttpServer`]; see the module docs.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Longest request line plus headers, in bytes.
    pub max_head: usize,
    /// Longest body, in bytes.
    pub max_body: usize,
    /// How long a client may take to send its whole request.
    pub read_timeout: Duration,
    /// Connections being read at once; as many read requests may wait for a handler thread.
    pub max_connections: usize,
    /// Threads that serve requests.
    pub threads: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_head: 16 * 1024,
            max_body: 1024 * 1024,
            read_timeout: Duration::from_secs(10),
            max_connections: 64,
            threads: 4,
        }
    }
}

/// A request, read whole.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `POST`, … as sent.
    pub method: String,
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    /// The path of the target, without the query, still percent-encoded.
    pub path: String,
    /// Header names (lowercase) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
}

impl Request {
    /// The first value of a header (name matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A response: status, content type, body.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The `Content-Type` header.
    pub content_type: String,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, body: &serde_json::Value) -> Response {
        Response {
            status,
            content_type: "application/json".into(),
            body: body.to_string().into_bytes(),
        }
    }

    /// `{"error": message}` with `status`.
    pub fn error(status: u16, message: &str) -> Response {
        Response::json(status, &serde_json::json!({ "error": message }))
    }
}

/// What serves requests.
pub type Handler = dyn Fn(&Request) -> Response + Send + Sync;

/// A running server; [`stop`](HttpServer::stop) ends it.
pub struct HttpServer {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// What a handler thread does with a connection whose request was read (or refused).
enum Work {
    Serve(Request),
    Answer(Response),
}

impl HttpServer {
    /// Listens on `addr` (port 0 picks a free port) and serves with `handler`; `name` names
    /// the threads (`<name>-read`, `<name>-<i>`).
    pub fn start(
        addr: &str,
        name: &str,
        limits: HttpLimits,
        handler: Arc<Handler>,
    ) -> io::Result<HttpServer> {
        let listener = TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let listener = mio::net::TcpListener::from_std(listener)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let (tx, rx) = bounded::<(TcpStream, Work)>(limits.max_connections.max(1));
        let limits = Arc::new(limits);
        let mut threads = Vec::new();
        for i in 0..limits.threads.max(1) {
            let (rx, limits, handler) = (rx.clone(), limits.clone(), handler.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || handle_requests(&rx, &limits, &*handler))?,
            );
        }
        let mut reader = Reader::new(listener, limits, tx, stopping.clone())?;
        threads.push(
            std::thread::Builder::new()
                .name(format!("{name}-read"))
                .spawn(move || reader.run())?,
        );
        Ok(HttpServer {
            addr: local,
            stopping,
            threads,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, drops the requests still being read, lets the handler threads answer
    /// the requests already read (the queue drains), and waits for them.
    pub fn stop(self) {
        self.stopping.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// How often the reading thread looks at the stop flag when nothing happens.
const STOP_POLL: Duration = Duration::from_millis(100);
/// The listener's token; connections take the others (mio reserves `usize::MAX`).
const LISTENER: mio::Token = mio::Token(0);

/// A connection whose request is being read.
struct Pending {
    stream: TcpStream,
    /// The same socket, registered for readiness.
    watched: mio::net::TcpStream,
    buffer: Vec<u8>,
    /// How far `buffer` was searched for the end of the head.
    scanned: usize,
    /// The request line and headers, once read; the body is read after them.
    head: Option<(Request, usize)>,
    deadline: Instant,
}

/// The reading thread: accepts connections and reads their requests as bytes arrive.
struct Reader {
    poll: mio::Poll,
    listener: mio::net::TcpListener,
    limits: Arc<HttpLimits>,
    work: Sender<(TcpStream, Work)>,
    stopping: Arc<AtomicBool>,
    pending: HashMap<usize, Pending>,
    next_token: usize,
}

impl Reader {
    fn new(
        listener: mio::net::TcpListener,
        limits: Arc<HttpLimits>,
        work: Sender<(TcpStream, Work)>,
        stopping: Arc<AtomicBool>,
    ) -> io::Result<Reader> {
        let poll = mio::Poll::new()?;
        poll.register(
            &listener,
            LISTENER,
            mio::Ready::readable(),
            mio::PollOpt::level(),
        )?;
        Ok(Reader {
            poll,
            listener,
            limits,
            work,
            stopping,
            pending: HashMap::new(),
            next_token: 1,
        })
    }

    fn run(&mut self) {
        let mut events = mio::Events::with_capacity(256);
        while !self.stopping.load(Ordering::SeqCst) {
            let now = Instant::now();
            let wait = self
                .pending
                .values()
                .map(|p| p.deadline.saturating_duration_since(now))
                .min()
                .map_or(STOP_POLL, |d| d.min(STOP_POLL));
            if self.poll.poll(&mut events, Some(wait)).is_err() {
                continue;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    mio::Token(token) => self.read(token),
                }
            }
            self.expire();
        }
    }

    fn accept(&mut self) {
        // At most one bound's worth per wake-up, so a flood cannot starve the reads.
        for _ in 0..self.limits.max_connections.max(1) {
            let stream = match self.listener.accept_std() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Out of file descriptors, most likely: the backlog stays readable, so
                    // pause rather than spin.
                    log::warn!("webhook receiver cannot accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    return;
                }
            };
            if self.pending.len() >= self.limits.max_connections {
                refuse_busy(stream);
                continue;
            }
            let token = self.free_token();
            let watched = stream
                .set_nonblocking(true)
                .and_then(|()| stream.try_clone())
                .and_then(mio::net::TcpStream::from_stream);
            let Ok(watched) = watched else { continue };
            let registered = self.poll.register(
                &watched,
                mio::Token(token),
                mio::Ready::readable(),
                mio::PollOpt::level(),
            );
            if registered.is_err() {
                continue;
            }
            self.pending.insert(
                token,
                Pending {
                    stream,
                    watched,
                    buffer: Vec::new(),
                    scanned: 0,
                    head: None,
                    deadline: Instant::now() + self.limits.read_timeout,
                },
            );
        }
    }

    /// A token no connection holds (mio reserves `usize::MAX`; the listener has 0).
    fn free_token(&mut self) -> usize {
        loop {
            let token = self.next_token;
            self.next_token = if token >= usize::MAX - 2 {
                1
            } else {
                token + 1
            };
            if !self.pending.contains_key(&token) {
                return token;
            }
        }
    }

    fn read(&mut self, token: usize) {
        let Some(pending) = self.pending.get_mut(&token) else {
            return;
        };
        match read_available(pending, &self.limits) {
            Ok(None) => {}
            Ok(Some(request)) => self.finish(token, Some(Work::Serve(request))),
            Err(Refusal::Answer(response)) => self.finish(token, Some(Work::Answer(response))),
            Err(Refusal::Gone) => self.finish(token, None),
        }
    }

    /// Answers `408` to the connections past their deadline.
    fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<usize> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            self.finish(token, Some(Work::Answer(timed_out())));
        }
    }

    /// Stops watching a connection and hands it, with its request or answer, to a handler
    /// thread (or closes it).
    fn finish(&mut self, token: usize, work: Option<Work>) {
        let Some(pending) = self.pending.remove(&token) else {
            return;
        };
        let _ = self.poll.deregister(&pending.watched);
        drop(pending.watched);
        let stream = pending.stream;
        let Some(work) = work else {
            let _ = stream.shutdown(Shutdown::Both);
            return;
        };
        if stream.set_nonblocking(false).is_err() {
            return;
        }
        if let Err(TrySendError::Full((stream, _))) = self.work.try_send((stream, work)) {
            refuse_busy(stream);
        }
    }
}

/// Every slot is taken: say so at once (without waiting on the client) and close.
fn refuse_busy(mut stream: TcpStream) {
    let _ = stream.set_nonblocking(true);
    let _ = write_response(
        &mut stream,
        &Response::error(503, "too many connections; retry later"),
    );
    let _ = stream.shutdown(Shutdown::Both);
}

fn handle_requests(rx: &Receiver<(TcpStream, Work)>, limits: &HttpLimits, handler: &Handler) {
    for (mut stream, work) in rx.iter() {
        let response = match work {
            Work::Serve(request) => catch_unwind(AssertUnwindSafe(|| handler(&request)))
                .unwrap_or_else(|_| Response::error(500, "the request could not be handled")),
            Work::Answer(response) => response,
        };
        let _ = stream.set_write_timeout(Some(limits.read_timeout));
        let _ = write_response(&mut stream, &response);
        close_lingering(stream);
    }
}

/// Closes after the answer so that the client reads it: closing a socket with unread input
/// resets the connection, and a client still sending (a refused upload) would see the reset
/// instead of the answer. So: end our side, then read and drop what still comes, briefly.
fn close_lingering(mut stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let _ = stream.set_read_timeout(Some(LINGER));
    let mut sink = [0u8; 8192];
    let mut drained = 0usize;
    while Instant::now() < deadline && drained < MAX_LINGER_BYTES {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// How long a closing connection's input is drained.
const LINGER: Duration = Duration::from_millis(500);
/// How much of a closing connection's input is drained at most.
const MAX_LINGER_BYTES: usize = 1024 * 1024;

/// Why a request was not read.
enum Refusal {
    /// Answer this, then close.
    Answer(Response),
    /// The client went away or broke the connection: nothing to answer.
    Gone,
}

/// Reads what has arrived on a connection; returns the request once it is whole. A client
/// that closed its side after sending is still answered, if what it sent is whole.
fn read_available(pending: &mut Pending, limits: &HttpLimits) -> Result<Option<Request>, Refusal> {
    let mut chunk = [0u8; 8192];
    let mut closed = false;
    loop {
        match pending.stream.read(&mut chunk) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => pending.buffer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(Refusal::Gone),
        }
        if pending.head.is_none() && pending.buffer.len() > limits.max_head + 4 {
            break;
        }
        if let Some((_, length)) = &pending.head {
            if pending.buffer.len() >= *length {
                break;
            }
        }
    }
    match parse_available(pending, limits)? {
        Some(request) => Ok(Some(request)),
        None if closed => Err(Refusal::Gone),
        None => Ok(None),
    }
}

/// Parses the head once it is whole, then waits for the body; returns the request once it
/// is whole.
fn parse_available(pending: &mut Pending, limits: &HttpLimits) -> Result<Option<Request>, Refusal> {
    if pending.head.is_none() {
        let from = pending.scanned.saturating_sub(3);
        let found = find_head_end(&pending.buffer[from..]).map(|end| end + from);
        pending.scanned = pending.buffer.len();
        // The head is too long once its end is past the limit, or not found within it.
        let seen = found.unwrap_or(pending.buffer.len());
        if seen > limits.max_head {
            return Err(Refusal::Answer(Response::error(
                431,
                &format!("the request head is over {} bytes", limits.max_head),
            )));
        }
        let Some(end) = found else {
            return Ok(None);
        };
        let (request, length) = parse_head(&pending.buffer[..end], limits)?;
        let body_arrived = pending.buffer.len() - (end + 4);
        if length > body_arrived
            && request.version == "HTTP/1.1"
            && request
                .header("expect")
                .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
        {
            // Small enough to go out whole on a fresh socket.
            let _ = pending.stream.write(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        pending.buffer.drain(..end + 4);
        pending.head = Some((request, length));
    }
    match pending.head.take() {
        Some((mut request, length)) if pending.buffer.len() >= length => {
            pending.buffer.truncate(length);
            request.body = std::mem::take(&mut pending.buffer);
            Ok(Some(request))
        }
        head => {
            pending.head = head;
            Ok(None)
        }
    }
}

/// Parses the request line and headers: the request (its body still empty) and the body's
/// announced length.
fn parse_head(head: &[u8], limits: &HttpLimits) -> Result<(Request, usize), Refusal> {
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return Err(bad_request("malformed request line"));
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() || method.is_empty() {
        return Err(bad_request("malformed request line"));
    }
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad_request("malformed header line"));
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let path = target.split('?').next().unwrap_or_default().to_string();
    let request = Request {
        method: method.to_string(),
        version: version.to_string(),
        path,
        headers,
        body: Vec::new(),
    };
    if request.header("transfer-encoding").is_some() {
        return Err(Refusal::Answer(Response::error(
            411,
            "send the body with Content-Length (chunked bodies are not accepted)",
        )));
    }
    let length = match request.header("content-length") {
        None => 0,
        Some(text) => match text.parse::<u64>() {
            Ok(n) => n,
            Err(_) => return Err(bad_request("Content-Length is not a number")),
        },
    };
    if length > limits.max_body as u64 {
        return Err(Refusal::Answer(Response::error(
            413,
            &format!("the body is over {} bytes", limits.max_body),
        )));
    }
    Ok((request, length as usize))
}

fn bad_request(message: &str) -> Refusal {
    Refusal::Answer(Response::error(400, message))
}

/// The index of the `\r\n\r\n` that ends the head.
fn find_head_end(buffer: &[u8]) -> Option<usize> {
    buffer.windows(4).position(|w| w == b"\r\n\r\n")
}

fn timed_out() -> Response {
    Response::error(408, "the request took too long to arrive")
}

fn write_response(stream: &mut TcpStream, response: &Response) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason_phrase(response.status),
        response.content_type,
        response.body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(&response.body)?;
    stream.flush()
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[test]
    fn a_panicking_handler_answers_500_and_the_server_goes_on() {
        let handler: Arc<Handler> = Arc::new(|request: &Request| {
            if request.path == "/panic" {
                panic!("boom");
            }
            Response::json(200, &serde_json::json!({"body": request.body.len()}))
        });
        let limits = HttpLimits {
            threads: 1,
            ..HttpLimits::default()
        };
        let server = HttpServer::start("127.0.0.1:0", "test-http", limits, handler).unwrap();
        let addr = server.local_addr();
        // More panics than threads: the one thread survives each.
        for _ in 0..3 {
            let answer = ask(addr, b"GET /panic HTTP/1.1\r\n\r\n");
            assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
        }
        let answer = ask(
            addr,
            b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
        );
        assert!(answer.contains("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with(r#"{"body":3}"#), "{answer}");
        server.stop();
    }
}
