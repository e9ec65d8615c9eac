//! `/readyz` follows the services: 503 naming the one that does not answer, 200 once it is
//! back. The shared services are never stopped: the worker reaches Redis through a TCP proxy
//! of this test, which the test takes down and brings back.

mod common;

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use flowcraft_rabbitmq::coordination;

/// Forwards connections to `target`; while down, it closes them all and refuses new ones.
struct Proxy {
    port: u16,
    down: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: &'static str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (is_down, conns) = (down.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if is_down.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let mut list = conns.lock().unwrap();
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
                list.extend([client, server]);
            }
        });
        Proxy { port, down, open }
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            for stream in self.open.lock().unwrap().drain(..) {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}

#[test]
fn readiness_turns_503_while_redis_is_unreachable_and_200_when_it_is_back() {
    let env = TestEnv::new("readyz");
    let proxy = Proxy::start("127.0.0.1:6379");
    let redis = coordination::connect_pool(&format!("redis://127.0.0.1:{}", proxy.port), 4)
        .expect("a pool through the proxy");
    let (chain, _) = workload("chain5");
    let (worker, addr) = TestEnv::start_serving_metrics(
        env.worker_with(env.pg.clone(), redis, inc_registry(), vec![chain])
            .threads(1),
    );
    let ready = || http_get(addr, "/readyz", &[]).0 == 200;
    env.eventually("ready", WAIT, ready);

    proxy.set_down(true);
    env.eventually("not ready while Redis is unreachable", WAIT, || {
        let (status, body) = http_get(addr, "/readyz", &[]);
        status == 503 && body.contains("Redis")
    });
    // The process still serves.
    assert_eq!(http_get(addr, "/healthz", &[]).0, 200);

    proxy.set_down(false);
    env.eventually("ready again", WAIT, ready);
    worker.stop().unwrap();
}
