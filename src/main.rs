//! The `pgtide` binary: parse the command line, set up logging, run, map errors to exit codes.

use clap::Parser;

fn main() {
    let cli = pgtide::cli::Cli::parse();
    // The demo talks to its user on stdout; only warnings belong on stderr there.
    let quiet = matches!(cli.command, pgtide::cli::Command::Demo);
    pgtide::telemetry::init(
        cli.log_format,
        if quiet { "pgtide=warn" } else { "pgtide=info" },
    );
    // One thread for single runs: pgtide waits on databases, and its per-row hand-offs between
    // connection tasks and the job are cheapest without cross-thread wake-ups (measured by
    // bench.sh). The daemon runs many jobs at once and gets every core.
    let runtime = match cli.command {
        pgtide::cli::Command::Run => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    }
    .expect("tokio runtime");
    let code = runtime.block_on(pgtide::cli::run(cli));
    std::process::exit(code);
}
