//! The `flowcraft` command: run, check and draw blueprints in process; operate the
//! distributed worker.

mod cli;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .target(env_logger::Target::Stderr)
        .init();
    let code = cli::main();
    std::process::exit(code);
}
