//! The `keywatch` binary: parse the command line, set up logging, run the command, and turn
//! an error into one sentence on stderr and a non-zero exit code.

#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use keywatch::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // sqlx reports PostgreSQL's notices ("relation already exists, skipping") at info.
    let directives = if cli.global.log.contains("sqlx") {
        cli.global.log.clone()
    } else {
        format!("{},sqlx=warn", cli.global.log)
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a log file or journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keywatch: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(keywatch::commands::run(cli));
    // Dropping the runtime would wait for every blocking read, and a read of a quiet stdin
    // never returns: a stopped daemon reading a pipe would hang instead of exiting.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keywatch: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes in one line, without repeating a cause already quoted.
fn chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}
