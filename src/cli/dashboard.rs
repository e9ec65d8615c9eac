//! `flowcraft dashboard`: serves the read-only dashboard (to be built).

use clap::Args;

use super::{fail, ServiceArgs, EXIT_USAGE};

/// Arguments of `flowcraft dashboard`.
#[derive(Args)]
pub struct DashboardArgs {
    #[command(flatten)]
    pub services: ServiceArgs,
}

/// Runs `flowcraft dashboard`.
pub fn dashboard(_args: &DashboardArgs) -> i32 {
    fail(EXIT_USAGE, "the dashboard is not built yet")
}
