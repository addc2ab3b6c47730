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
    // One thread: pgtide waits on databases, and its per-row hand-offs between the connection
    // tasks and the job are cheapest without cross-thread wake-ups (measured by bench.sh).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(pgtide::cli::run(cli));
    std::process::exit(code);
}
