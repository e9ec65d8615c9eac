//! `flowcraft dashboard` end to end: runs go through a real worker, the `flowcraft` binary
//! serves the dashboard, and a real headless Chromium (Debian's `chromium`) loads the pages;
//! the tests check the DOM it built. Also: the bearer token, and that reading the
//! dead-letter queue leaves its messages in it.
//!
//! With `FLOWCRAFT_DASHBOARD_SCREENSHOT=<file.png>` set, the failed run's page is also
//! saved as a 1280×900 screenshot (how `docs/dashboard.png` was made).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use flowcraft_rabbitmq::{NodeError, NodeResult};
use serde_json::json;

/// How long Chromium may take to load and dump one page.
const BROWSER_DEADLINE: Duration = Duration::from_secs(90);

/// The Chromium binary; the test fails loudly without it.
fn chromium() -> PathBuf {
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "chromium is missing: these tests load the dashboard in a real headless browser. \
         Install Debian's package (apt-get install -y chromium); .ci/run does."
    );
}

/// Runs Chromium headless with `args` and a throwaway profile, until it exits or the
/// deadline passes; returns its stdout.
fn run_chromium(args: &[String]) -> String {
    let profile = std::env::temp_dir().join(format!(
        "flowcraft-chromium-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut stdout = child.stdout.take().expect("chromium's stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let deadline = Instant::now() + BROWSER_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&profile);
            panic!("chromium did not finish within {BROWSER_DEADLINE:?}: {args:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().expect("chromium's output");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(status.success(), "chromium failed ({status}) on {args:?}");
    out
}

/// The DOM Chromium built from `url`, serialized.
fn browser_dom(url: &str) -> String {
    let dom = run_chromium(&["--dump-dom".to_string(), url.to_string()]);
    assert!(
        dom.contains("flowcraft dashboard"),
        "chromium did not show a dashboard page for {url}: {dom}"
    );
    dom
}

/// A `flowcraft dashboard` process over this test's slice, on a free port.
struct DashboardProcess {
    child: Child,
    addr: SocketAddr,
}

impl DashboardProcess {
    fn start(env: &TestEnv, blueprints: &Path, token: Option<&str>) -> DashboardProcess {
        let mut command = env.flowcraft_command();
        if let Some(token) = token {
            command.env("FLOWCRAFT_DASHBOARD_TOKEN", token);
        }
        let mut child = command
            .args(["dashboard", "--listen", "127.0.0.1:0", "--blueprints"])
            .arg(blueprints)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start flowcraft dashboard");
        let stderr = child.stderr.take().expect("the dashboard's stderr");
        let (tx, rx) = crossbeam_channel::unbounded::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("dashboard on http://").nth(1) {
                        let addr = rest.split('/').next().unwrap_or_default();
                        break addr.parse().expect("the dashboard's address");
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the dashboard did not say where it listens within {WAIT:?}; it said: {seen:?}");
                }
            }
        };
        DashboardProcess { child, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// SIGTERM; the dashboard must stop cleanly.
    fn stop(mut self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success());
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for the dashboard") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the dashboard did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(0), "the dashboard's exit: {status}");
    }
}

impl Drop for DashboardProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The serialized element that starts with the tag holding `marker`, through its closing
/// `</tag>` (elements of the same tag are not nested in what this looks at).
fn element<'a>(dom: &'a str, tag: &str, marker: &str) -> &'a str {
    let at = dom
        .find(marker)
        .unwrap_or_else(|| panic!("no element with {marker} in: {dom}"));
    let open = format!("<{tag}");
    let start = if marker.starts_with(&open) {
        at
    } else {
        dom[..at]
            .rfind(&open)
            .unwrap_or_else(|| panic!("{marker} is not in a <{tag}>"))
    };
    let end = dom[start..]
        .find(&format!("</{tag}>"))
        .map(|e| start + e + tag.len() + 3)
        .unwrap_or_else(|| panic!("<{tag}> with {marker} is not closed"));
    &dom[start..end]
}

/// A directory holding these blueprints, one file each.
fn blueprint_dir(env: &TestEnv, blueprints: &[&flowcraft_rabbitmq::Blueprint]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flowcraft-dashboard-{}", env.tag));
    std::fs::create_dir_all(&dir).unwrap();
    for b in blueprints {
        std::fs::write(
            dir.join(format!("{}.json", b.id())),
            serde_json::to_string(b.def()).unwrap(),
        )
        .unwrap();
    }
    dir
}

/// The error the failing node always returns (markup in it must show as text).
const CHARGE_ERROR: &str = "the <b>payments</b> API refused the card";

/// `order` → `reserve` → `charge` (always fails, fatally) → `ship` and `email`.
fn order_blueprint() -> flowcraft_rabbitmq::Blueprint {
    bp(r#"{"id":"dash-order","nodes":[
        {"id":"order","uses":"inc"},
        {"id":"reserve","uses":"inc"},
        {"id":"charge","uses":"charge"},
        {"id":"ship","uses":"inc"},
        {"id":"email","uses":"inc"}],
      "edges":[{"source":"order","target":"reserve"},{"source":"reserve","target":"charge"},
               {"source":"charge","target":"ship"},{"source":"charge","target":"email"}]}"#)
}

fn order_registry() -> flowcraft_rabbitmq::NodeRegistry {
    let mut registry = inc_registry();
    registry.register_fn("charge", |_| -> Result<NodeResult, NodeError> {
        Err(NodeError::fatal(CHARGE_ERROR))
    });
    registry
}

#[test]
fn a_browser_shows_a_failed_runs_failing_node_and_the_counts() {
    let env = TestEnv::new("dash_fail");
    let order = order_blueprint();
    let (chain, _) = workload("chain5");
    let worker = env.start_worker(order_registry(), vec![order.clone(), chain.clone()], 2);
    let failed = env.start_run(&order, ctx(json!({})));
    let completed = env.start_run(&chain, ctx(json!({})));
    let row = env.wait_for_status(&failed, "failed", WAIT);
    let reason = row.result.as_ref().unwrap()["reason"].as_str().unwrap();
    assert!(reason.contains(CHARGE_ERROR), "{reason}");
    env.wait_for_status(&completed, "completed", WAIT);
    worker.stop().unwrap();

    let dir = blueprint_dir(&env, &[&order, &chain]);
    let dashboard = DashboardProcess::start(&env, &dir, None);

    // The run's page: the failing node is drawn failed, with its error.
    let run_url = dashboard.url(&format!("/run/{failed}"));
    let dom = browser_dom(&run_url);
    let charge = element(&dom, "g", r#"data-node-id="charge""#);
    assert!(charge.contains(r#"class="node failed""#), "{charge}");
    assert!(charge.contains(r#"data-state="failed""#), "{charge}");
    // The error is on the node, as text: markup in it would have become an element.
    let title = element(charge, "title", "<title");
    assert!(
        title.contains("the &lt;b&gt;payments&lt;/b&gt; API refused the card"),
        "the error is not on the failed node: {charge}"
    );
    for (node, state) in [
        ("order", "done"),
        ("reserve", "done"),
        ("ship", "not-reached"),
        ("email", "not-reached"),
    ] {
        let g = element(&dom, "g", &format!(r#"data-node-id="{node}""#));
        assert!(
            g.contains(&format!(r#"class="node {state}""#)),
            "{node} should be {state}: {g}"
        );
    }
    let header = element(&dom, "section", r#"class="run""#);
    assert!(header.contains(r#"data-status="failed""#), "{header}");
    let reason = element(header, "dd", r#"class="reason""#);
    assert!(
        reason.contains("the &lt;b&gt;payments&lt;/b&gt; API"),
        "{reason}"
    );

    // The index: one failed run, one completed, and the failed one listed as failed.
    let dom = browser_dom(&dashboard.url("/"));
    for (status, count) in [("failed", 1), ("completed", 1), ("running", 0), ("all", 2)] {
        let chip = element(&dom, "a", &format!(r#"data-status="{status}" data-count"#));
        assert!(
            chip.contains(&format!(r#"data-count="{count}""#)),
            "{status} should count {count}: {chip}"
        );
    }
    let row = element(&dom, "tr", &format!(r#"data-run-id="{failed}""#));
    assert!(row.contains(r#"data-status="failed""#), "{row}");
    assert!(row.contains("dash-order"), "{row}");

    // Filtered by status: only the failed run.
    let dom = browser_dom(&dashboard.url("/runs/failed"));
    assert!(dom.contains(&format!(r#"data-run-id="{failed}""#)), "{dom}");
    assert!(
        !dom.contains(&format!(r#"data-run-id="{completed}""#)),
        "{dom}"
    );
    // Filtered by blueprint: only the chain's run.
    let dom = browser_dom(&dashboard.url(&format!("/runs/all/{}", chain.id())));
    assert!(
        dom.contains(&format!(r#"data-run-id="{completed}""#)),
        "{dom}"
    );
    assert!(
        !dom.contains(&format!(r#"data-run-id="{failed}""#)),
        "{dom}"
    );

    if let Ok(path) = std::env::var("FLOWCRAFT_DASHBOARD_SCREENSHOT") {
        run_chromium(&[
            format!("--screenshot={path}"),
            "--window-size=1280,900".into(),
            "--hide-scrollbars".into(),
            run_url.clone(),
        ]);
        assert!(Path::new(&path).exists(), "no screenshot at {path}");
    }

    // Unknown pages and runs are 404s.
    assert_eq!(http_get(dashboard.addr, "/run/no-such-run", &[]).0, 404);
    assert_eq!(http_get(dashboard.addr, "/runs/sleeping", &[]).0, 404);
    dashboard.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_token_is_required_when_set() {
    let env = TestEnv::new("dash_token");
    let dir = blueprint_dir(&env, &[&order_blueprint()]);
    let token = "s3cret token/with?odd chars";
    let dashboard = DashboardProcess::start(&env, &dir, Some(token));
    let addr = dashboard.addr;

    let (status, body) = http_get(addr, "/", &[]);
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains("data-status"), "{body}");
    assert_eq!(
        http_get(addr, "/", &[("Authorization", "Bearer wrong")]).0,
        401
    );
    assert_eq!(
        http_get(
            addr,
            "/dead-letters",
            &[("Authorization", &format!("Basic {token}"))]
        )
        .0,
        401
    );
    let (status, body) = http_get(addr, "/", &[("Authorization", &format!("Bearer {token}"))]);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(r#"data-status="all" data-count="0""#),
        "{body}"
    );

    // A browser uses the path prefix; the pages' links keep it.
    let prefix = "/t/s3cret%20token%2Fwith%3Fodd%20chars";
    assert_eq!(http_get(addr, "/t/wrong/", &[]).0, 401);
    let dom = browser_dom(&dashboard.url(&format!("{prefix}/")));
    assert!(
        dom.contains(r#"data-status="failed" data-count="0""#),
        "{dom}"
    );
    assert!(
        dom.contains(&format!(r#"href="{prefix}/dead-letters""#)),
        "{dom}"
    );
    let dom = run_chromium(&["--dump-dom".into(), dashboard.url("/")]);
    assert!(dom.contains("Unauthorized"), "{dom}");
    assert!(!dom.contains("data-status"), "{dom}");
    dashboard.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_dead_letters_page_shows_messages_and_leaves_them_queued() {
    let env = TestEnv::new("dash_dlq");
    let (chain, _) = workload("chain5");
    let worker = env.start_worker(inc_registry(), vec![chain.clone()], 1);
    env.publish_raw(b"<script>alert('dead')</script> is not a job");
    env.publish_raw(br#"{"runId":"ghost-run","nodeId":"n1"}"#);
    env.eventually("two dead letters", WAIT, || {
        env.queue_depth(&env.dead_queue()) == 2
    });
    worker.stop().unwrap();

    let dir = blueprint_dir(&env, &[&chain]);
    let dashboard = DashboardProcess::start(&env, &dir, None);
    let dom = browser_dom(&dashboard.url("/"));
    let depth = element(&dom, "a", r#"class="depth""#);
    assert!(depth.contains(r#"data-depth="2""#), "{depth}");

    let dom = browser_dom(&dashboard.url("/dead-letters"));
    assert!(dom.contains(r#"data-depth="2""#), "{dom}");
    assert_eq!(dom.matches(r#"<li class="message">"#).count(), 2, "{dom}");
    assert!(
        dom.contains("&lt;script&gt;alert('dead')&lt;/script&gt; is not a job"),
        "{dom}"
    );
    assert!(!dom.contains("<script>alert"), "{dom}");
    // The job-shaped one links to its run.
    assert!(dom.contains(r#"href="/run/ghost-run""#), "{dom}");
    // Newest first.
    let script = dom.find("is not a job").unwrap();
    let ghost = dom.find("ghost-run").unwrap();
    assert!(ghost < script, "the newest should come first: {dom}");

    // Looking took nothing off the queue, in order.
    env.eventually("the dead letters back in their queue", WAIT, || {
        env.queue_depth(&env.dead_queue()) == 2
    });
    let first = env.take_message(&env.dead_queue()).expect("a dead letter");
    assert!(
        String::from_utf8_lossy(&first).starts_with("<script>"),
        "the order changed"
    );
    dashboard.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
