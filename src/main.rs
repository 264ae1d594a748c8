//! The `pecgate` binary: parse the command line, set up logging, run the
//! command, map the outcome to an exit status (sysexits for configuration).

use std::process::ExitCode;

use clap::Parser;
use pecgate::cli::{
    Cli, Command, run_check_config, run_inspect, run_list, run_sandbox, run_verify,
};
use pecgate::config::LogFormat;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon sets up logging itself, from its configuration; the other
    // commands log warnings only, unless asked.
    if !matches!(cli.command, Command::Run) {
        let format = cli.log_format.unwrap_or(LogFormat::Auto);
        let level = cli.log_level.as_deref().unwrap_or("warn");
        if let Err(e) = pecgate::telemetry::init(format, level) {
            eprintln!("pecgate: cannot set up logging: {e:#}");
            return ExitCode::from(78);
        }
    }
    let result = match &cli.command {
        Command::Inspect(args) => run_inspect(args).map_err(anyhow::Error::from),
        Command::Verify(args) => run_verify(args),
        Command::Sandbox(args) => run_sandbox(args),
        Command::Run => pecgate::daemon::run(
            cli.config.as_deref(),
            cli.log_format,
            cli.log_level.as_deref(),
        ),
        Command::List(args) => run_list(cli.config.as_deref(), args),
        Command::Show(args) => pecgate::cli::run_show(cli.config.as_deref(), args),
        Command::Resolve(args) => pecgate::cli::run_resolve(cli.config.as_deref(), args),
        Command::CheckConfig(args) => run_check_config(cli.config.as_deref(), args),
        Command::Status(args) => pecgate::cli::run_status(cli.config.as_deref(), args),
        Command::Report(args) => pecgate::cli::run_report(cli.config.as_deref(), args),
        Command::Backup(args) => pecgate::cli::run_backup(cli.config.as_deref(), args),
        Command::Restore(args) => pecgate::cli::run_restore(cli.config.as_deref(), args),
        Command::Reindex(args) => pecgate::cli::run_reindex(cli.config.as_deref(), args),
        Command::Demo(args) => pecgate::cli::run_demo(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => exit_for_error(&e),
    }
}

/// Maps a failure to an exit status: a closed pipe (`pecgate inspect ... |
/// head`) is success, configuration problems are EX_CONFIG (78), anything
/// else is 2 (like grep's "trouble").
fn exit_for_error(e: &anyhow::Error) -> ExitCode {
    if let Some(io) = e.downcast_ref::<std::io::Error>()
        && io.kind() == std::io::ErrorKind::BrokenPipe
    {
        return ExitCode::SUCCESS;
    }
    eprintln!("pecgate: {e:#}");
    let config = e.downcast_ref::<pecgate::config::ConfigError>().is_some()
        || e.downcast_ref::<pecgate::verify::TrustError>().is_some();
    if config {
        ExitCode::from(78)
    } else {
        ExitCode::from(2)
    }
}
