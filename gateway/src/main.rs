//! The `wasmhook` command: `serve` runs the gateway, `migrate` applies
//! database migrations and exits, and `app`, `webhook`, `event`,
//! `delivery` and `plugin` administer a running gateway over its API.

use std::io::Write;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use wasmhook::cli::{
    self, AppCommand, AppScope, DeliveryCommand, EventCommand, PluginCommand, Remote, Request,
    WebhookCommand,
};
use wasmhook::config::Settings;
use wasmhook::server::Gateway;
use wasmhook::store::{Store, redacted_url};
use wasmhook::telemetry::{self, LogFormat};

/// mimalloc rather than glibc's malloc: under `wasmhook-bench` (SQLite,
/// one webhook, no plugin, four interleaved pairs) the gateway's CPU per
/// delivery fell from ~230 to ~205 µs and its delivery rate rose ~11%;
/// glibc spent the difference searching and consolidating its bins. Built
/// without transparent huge pages (`no_thp`): with them its arenas grew
/// in 2 MiB pages, and the peak RSS of `--events 10000` was ~49 MiB
/// instead of ~32 MiB, for no measurable speed.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "wasmhook", version, about = "Self-hosted webhook gateway")]
struct Cli {
    /// How log lines on stderr look: `text` for people, `json` (one
    /// object per line) for log collectors. The level comes from
    /// `WASMHOOK_LOG` (default `info`).
    #[arg(long, global = true, env = "WASMHOOK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API and the delivery worker.
    Serve(Box<Settings>),
    /// Apps on a running gateway.
    App {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: AppCommand,
    },
    /// Webhooks of an app on a running gateway.
    Webhook {
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        scope: AppScope,
        #[command(subcommand)]
        command: WebhookCommand,
    },
    /// Publish events to a running gateway.
    Event {
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        scope: AppScope,
        #[command(subcommand)]
        command: EventCommand,
    },
    /// Deliveries of an app: their attempts, and sending them again.
    Delivery {
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        scope: AppScope,
        #[command(subcommand)]
        command: DeliveryCommand,
    },
    /// WebAssembly plugins: upload, list, try, attach.
    Plugin {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Apply database migrations and exit.
    Migrate {
        #[arg(
            long,
            env = "WASMHOOK_DATABASE_URL",
            hide_env_values = true,
            default_value = "sqlite://wasmhook.db"
        )]
        database_url: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init_logs(cli.log_format);
    match cli.command {
        Command::Serve(settings) => serve(&settings).await,
        Command::Migrate { database_url } => {
            Store::migrate(&database_url)
                .await
                .context("migration failed")?;
            println!("migrations applied to {}", redacted_url(&database_url));
            Ok(())
        }
        Command::App { remote, command } => admin(&remote, Request::App(command)).await,
        Command::Webhook {
            remote,
            scope,
            command,
        } => admin(&remote, Request::Webhook(scope, command)).await,
        Command::Event {
            remote,
            scope,
            command,
        } => admin(&remote, Request::Event(scope, command)).await,
        Command::Delivery {
            remote,
            scope,
            command,
        } => admin(&remote, Request::Delivery(scope, command)).await,
        Command::Plugin { remote, command } => admin(&remote, Request::Plugin(command)).await,
    }
}

/// Runs an admin command; an error is printed as one line, status 1.
async fn admin(remote: &Remote, request: Request) -> anyhow::Result<()> {
    if let Err(error) = cli::run(remote, request).await {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
    Ok(())
}

async fn serve(settings: &Settings) -> anyhow::Result<()> {
    let gateway = Gateway::build(settings)
        .await
        .context("gateway failed to start")?;
    let addr = gateway.local_addr()?;
    let mut out = std::io::stdout().lock();
    if let Some(token) = &gateway.generated_admin_token {
        writeln!(
            out,
            "generated admin token (shown only now, store it safely): {token}"
        )?;
    }
    writeln!(out, "wasmhook listening on http://{addr}")?;
    out.flush()?;
    drop(out);
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    gateway
        .run(shutdown)
        .await
        .context("gateway stopped with an error")?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Cancels `shutdown` on ctrl-c or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down: no new claims, finishing in-flight deliveries");
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks the whole command tree (e.g. no required global flag).
    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
