//! Hostile and odd input on every surface — webhook requests, job messages, events, timers,
//! node outputs, start contexts — and the worker keeps serving a normal run next to it:
//! nothing crashes, nothing wedges, no state is invented.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use flowcraft_rabbitmq::{RedisCoordinationStore, WebhookOptions, WebhookServer};

/// A receiver over this test's services (unsigned calls, 1 KiB bodies).
fn receiver(env: &TestEnv) -> WebhookServer {
    WebhookServer::start(
        "127.0.0.1:0",
        WebhookOptions {
            store: env.store(),
            coord: RedisCoordinationStore::new(env.redis.clone(), env.prefix.clone()),
            amqp_url: amqp_url(),
            exchange: env.events_exchange(),
            secret: None,
            max_body: 1024,
        },
    )
    .unwrap()
}

/// Sends raw bytes and returns the status code of the answer (0: none before `within`).
fn raw_request(addr: SocketAddr, bytes: &[u8], within: Duration) -> u16 {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return 0;
    };
    stream.set_read_timeout(Some(within)).unwrap();
    let _ = stream.write_all(bytes);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A well-formed call of an unknown webhook: the receiver is serving when it answers 404.
fn answers_normally(addr: SocketAddr, within: Duration) -> bool {
    let request = b"POST /webhooks/no-run/no-node HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
    raw_request(addr, request, within) == 404
}

#[test]
fn a_huge_content_length_is_refused_and_the_receiver_keeps_serving() {
    let env = TestEnv::new("hostile_cl");
    let server = receiver(&env);
    let addr = server.local_addr();
    for length in [
        "4611686018427387904",
        "18446744073709551615",
        "99999999999999999999",
    ] {
        for _ in 0..3 {
            let head = format!("POST /webhooks/x/y HTTP/1.1\r\nContent-Length: {length}\r\n\r\n");
            let status = raw_request(addr, head.as_bytes(), Duration::from_secs(5));
            assert!(status == 413 || status == 400, "{length}: {status}");
        }
    }
    assert!(answers_normally(addr, Duration::from_secs(5)));
    server.stop();
}

#[test]
fn slow_and_silent_clients_hold_no_thread() {
    let env = TestEnv::new("hostile_slow");
    let server = receiver(&env);
    let addr = server.local_addr();
    // More slow clients than the receiver has threads: each announces a body and sends none.
    let slow: Vec<TcpStream> = (0..12)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"POST /webhooks/x/y HTTP/1.1\r\nContent-Length: 500\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    // Silent connections that send nothing at all.
    let silent: Vec<TcpStream> = (0..12).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let started = Instant::now();
    assert!(answers_normally(addr, Duration::from_secs(5)));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered only after {:?}",
        started.elapsed()
    );
    // The slow ones are timed out with 408, not left open.
    let mut first = slow.into_iter().next().unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut response = Vec::new();
    let _ = first.read_to_end(&mut response);
    assert!(
        String::from_utf8_lossy(&response).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    drop(silent);
    server.stop();
}

#[test]
fn a_flood_of_connections_is_answered_503_past_the_bound() {
    let env = TestEnv::new("hostile_flood");
    let server = receiver(&env);
    let addr = server.local_addr();
    let held: Vec<TcpStream> = (0..80).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // Past the bound, a connection is refused at once rather than queued for ever.
    let refused = raw_request(
        addr,
        b"POST /webhooks/x/y HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        Duration::from_secs(5),
    );
    assert_eq!(refused, 503);
    drop(held);
    env.eventually("the receiver serves again", WAIT, || {
        answers_normally(addr, Duration::from_secs(2))
    });
    server.stop();
}

#[test]
fn garbage_heads_ids_and_bodies_get_4xx_and_no_state() {
    let env = TestEnv::new("hostile_http");
    let server = receiver(&env);
    let addr = server.local_addr();
    let within = Duration::from_secs(5);
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), 400),
        (
            b"POST /webhooks/x/y HTTP/1.1\r\nno colon here\r\n\r\n".to_vec(),
            400,
        ),
        (
            b"POST /webhooks/x/y HTTP/1.1\r\nContent-Length: abc\r\n\r\n".to_vec(),
            400,
        ),
        (
            b"POST /webhooks/x/y HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            411,
        ),
        (
            format!(
                "POST /webhooks/x/y HTTP/1.1\r\nX-Big: {}\r\n\r\n",
                "a".repeat(64 * 1024)
            )
            .into_bytes(),
            431,
        ),
        // A NUL in the ids: refused, not a database error.
        (
            b"POST /webhooks/%00/%00 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            400,
        ),
        (
            format!(
                "POST /webhooks/{}/n HTTP/1.1\r\nContent-Length: 2\r\n\r\n{{}}",
                "r".repeat(300)
            )
            .into_bytes(),
            400,
        ),
        (b"GET /webhooks/x/y HTTP/1.1\r\n\r\n".to_vec(), 405),
    ];
    for (request, want) in cases {
        let got = raw_request(addr, &request, within);
        assert_eq!(
            got,
            want,
            "{}",
            String::from_utf8_lossy(&request[..request.len().min(80)])
        );
    }
    assert!(answers_normally(addr, within));
    server.stop();
}

#[test]
fn a_webhook_body_postgresql_cannot_store_is_refused_before_it_fires() {
    let env = TestEnv::new("hostile_whbody");
    let server = receiver(&env);
    let addr = server.local_addr();
    let bps = examples();
    let worker = env
        .worker(inc_registry(), bps.clone())
        .public_url(format!("http://{addr}"))
        .threads(2)
        .build()
        .unwrap()
        .start()
        .unwrap();
    let client = env.client(bps);
    let run = client
        .start_workflow("webhook-approval", Default::default())
        .unwrap();
    env.wait_for_status(&run, "awaiting", WAIT);
    let path = format!("/webhooks/{run}/review");
    // PostgreSQL's jsonb refuses \u0000; 70 levels of nesting cannot be read back.
    let nul = br#"{"decision": "a\u0000b"}"#;
    assert_eq!(http_post(addr, &path, nul, &[]).0, 400);
    let deep = format!("{}1{}", "[".repeat(70), "]".repeat(70));
    assert_eq!(http_post(addr, &path, deep.as_bytes(), &[]).0, 400);
    assert_eq!(
        env.store().status(&run).unwrap().unwrap().status,
        "awaiting"
    );
    // The webhook did not fire: a correct call resumes the run.
    let (status, reply) = http_post(addr, &path, br#"{"decision": "approve"}"#, &[]);
    assert_eq!(status, 202, "{reply}");
    env.wait_for_status(&run, "completed", WAIT);
    server.stop();
    worker.stop().unwrap();
}
