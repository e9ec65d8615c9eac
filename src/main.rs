//! The `flowcraft` command: run, check and draw blueprints in process; operate the
//! distributed worker.

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .target(env_logger::Target::Stderr)
        .init();
    let code = flowcraft_rabbitmq::cli::main();
    std::process::exit(code);
}
