//! `flowcraft dashboard`: serves the read-only dashboard (see
//! [`crate::runtime::dashboard`]) until SIGINT/SIGTERM.

use clap::Args;

use crate::runtime::dashboard::{DashboardOptions, DashboardServer, DEFAULT_LISTEN};

use super::local_cmds::load_valid;
use super::{fail, BlueprintDir, ServiceArgs, EXIT_OK, EXIT_USAGE};

/// Arguments of `flowcraft dashboard`.
#[derive(Args)]
pub struct DashboardArgs {
    #[command(flatten)]
    pub dir: BlueprintDir,
    #[command(flatten)]
    pub services: ServiceArgs,
    /// Address to serve on. The default serves this host only; another address serves
    /// whoever reaches it (set --token then).
    #[arg(long, default_value = DEFAULT_LISTEN, value_name = "ADDR")]
    pub listen: String,
    /// Every request must carry `Authorization: Bearer <TOKEN>`, or open `/t/<TOKEN>/` in
    /// a browser.
    #[arg(
        long,
        env = "FLOWCRAFT_DASHBOARD_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

/// Runs `flowcraft dashboard`.
pub fn dashboard(args: &DashboardArgs) -> i32 {
    if args.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return fail(EXIT_USAGE, "the dashboard token is empty");
    }
    let blueprints = match load_valid(&args.dir) {
        Ok(b) => b,
        Err(code) => return code,
    };
    let s = &args.services;
    let store = match s.run_store(4) {
        Ok(store) => store,
        Err(code) => return code,
    };
    let options = DashboardOptions {
        store,
        amqp_url: s.rabbitmq_url.clone(),
        queue: s.queue.clone(),
        blueprints,
        token: args.token.clone(),
    };
    let signal_rx = match super::ops::stop_signals() {
        Ok(rx) => rx,
        Err(code) => return code,
    };
    let server = match DashboardServer::start(&args.listen, options) {
        Ok(server) => server,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let addr = server.local_addr();
    eprintln!("flowcraft: dashboard on http://{addr}/ (Ctrl-C to stop)");
    if args.token.is_some() {
        eprintln!(
            "flowcraft: requests need Authorization: Bearer <token>; in a browser open http://{addr}/t/<token>/"
        );
    } else if !addr.ip().is_loopback() {
        eprintln!(
            "flowcraft: warning: serving {addr} without a token: anyone who reaches it sees every run (set --token)"
        );
    }
    let _ = signal_rx.recv();
    server.stop();
    eprintln!("flowcraft: dashboard stopped");
    EXIT_OK
}
