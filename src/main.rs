//! `village-gateway`: the command line. Parses arguments, sets up logging, loads the config
//! and calls into the library. Exit codes: 0 ok, 78 bad config (`EX_CONFIG`), 1 anything else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::error;

use village_gateway::config::{Config, EXIT_BAD_CONFIG};
use village_gateway::event::UnitId;
use village_gateway::sim::{SimProfile, Simulator};
use village_gateway::store::{self, Store};
use village_gateway::{daemon, demo};

#[derive(Debug, Parser)]
#[command(
    name = "village-gateway",
    version,
    about = "Village fire-alarm gateway: Modbus field buses, local alarm logic, store-and-forward over MQTT."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway daemon.
    Run {
        /// The TOML config file.
        #[arg(long, short, default_value = "/etc/village-gateway/gateway.toml")]
        config: PathBuf,
    },
    /// Check a config file: exit 0 when it is good, 78 with file:line and key when not.
    CheckConfig {
        #[arg(long, short, default_value = "/etc/village-gateway/gateway.toml")]
        config: PathBuf,
    },
    /// Serve simulated detectors (units 1..=N) and a relay module as Modbus RTU slaves on a
    /// pseudo-terminal (or a serial port), with a console on stdin: `alarm 3`, `fault 3`,
    /// `offline 3`, `normal 3`, `help`.
    Simulate {
        /// Serve on this serial port instead of a new pseudo-terminal.
        #[arg(long)]
        port: Option<String>,
        /// Baud rate whose wire time the replies take.
        #[arg(long, default_value_t = 9600)]
        baud: u32,
        /// Number of smoke detectors (units 1..=N).
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(0..=99))]
        detectors: u8,
        /// Unit id of the relay module (sounders, panel LEDs, keys).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(1..=247))]
        relay_unit: u8,
        /// Also serve Modbus TCP on this address (host:port).
        #[arg(long)]
        tcp: Option<String>,
    },
    /// Show the outbox: depth and bytes per lane, oldest pending event, last acknowledged seq.
    /// sled allows one process: stop the daemon first (its retained status has depth and age).
    Outbox {
        #[arg(long, short, default_value = "/etc/village-gateway/gateway.toml")]
        config: PathBuf,
    },
    /// Watch the gateway guard a simulated village: smoke, silence, reset, a detector going dead.
    Demo {
        /// Use this MQTT broker (mqtt://host:port) instead of the embedded one.
        #[arg(long)]
        broker: Option<String>,
        /// Detectors per bus (two buses).
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..=99))]
        detectors: u8,
    },
    /// Run the embedded MQTT broker (for demos and tests) on 127.0.0.1:PORT.
    #[cfg(feature = "embedded-broker")]
    #[command(hide = true)]
    Broker {
        #[arg(long, default_value_t = 1883)]
        port: u16,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    village_gateway::logging::init(matches!(cli.command, Command::Demo { .. }));
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{}: ok", config.display());
                println!("{}", village_gateway::config::summary(&c));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                exit_code(EXIT_BAD_CONFIG)
            }
        },
        Command::Outbox { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return exit_code(EXIT_BAD_CONFIG);
                }
            };
            outbox(&config)
        }
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return exit_code(EXIT_BAD_CONFIG);
                }
            };
            runtime_main(|shutdown| daemon::run(config, shutdown, None))
        }
        Command::Simulate {
            port,
            baud,
            detectors,
            relay_unit,
            tcp,
        } => runtime_main(|shutdown| async move {
            let devices = (1..=detectors)
                .map(|u| (UnitId(u), SimProfile::Smoke))
                .chain(std::iter::once((UnitId(relay_unit), SimProfile::Relay)));
            let sim = Simulator::new(baud, devices);
            let _guard;
            match port {
                Some(p) => {
                    let s = sim.clone();
                    println!("Serving {detectors} detectors (units 1..={detectors}) and a relay module (unit {relay_unit}) on {p} at {baud} baud.");
                    tokio::spawn(async move { s.serve_port(&p).await });
                }
                None => {
                    let g = sim.serve_pty()?;
                    println!("Serving {detectors} detectors (units 1..={detectors}) and a relay module (unit {relay_unit}) on {} at {baud} baud (wire time emulated).", g.path());
                    _guard = g;
                }
            }
            if let Some(addr) = tcp {
                let listener = tokio::net::TcpListener::bind(&addr).await?;
                println!("Serving Modbus TCP on {addr}.");
                let s = sim.clone();
                tokio::spawn(async move { s.serve_tcp(listener).await });
            }
            println!("Type `help` for commands.");
            let stdin = tokio::io::BufReader::new(tokio::io::stdin());
            tokio::select! {
                r = sim.run_console(stdin, tokio::io::stdout()) => r?,
                () = shutdown.cancelled() => {}
            }
            Ok::<(), anyhow::Error>(())
        }),
        Command::Demo { broker, detectors } => {
            runtime_main(|shutdown| demo::run(broker, detectors, shutdown))
        }
        #[cfg(feature = "embedded-broker")]
        Command::Broker { port } => match village_gateway::broker::run_forever(port) {
            Ok(never) => match never {},
            Err(e) => {
                error!(error = %format!("{e:#}"), "Broker failed.");
                ExitCode::FAILURE
            }
        },
    }
}

/// `outbox`: opens the store read-only in spirit (never creates, never moves aside, never
/// evicts) and prints its figures.
fn outbox(config: &Config) -> ExitCode {
    let dir = config.gateway.state_dir.join("outbox");
    let settings = daemon::store_settings(config);
    let store = match Store::open_existing(&dir, settings) {
        Ok(s) => s,
        Err(e @ store::Error::Locked { .. }) => {
            eprintln!("{e}");
            eprintln!("Stop it first (systemctl stop village-gateway), or read outbox_depth and oldest_pending_age_s from its retained status topic.");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match store.stats() {
        Ok(stats) => {
            println!("outbox {}", dir.display());
            print!(
                "{}",
                store::render_stats(
                    &stats,
                    settings.max_bytes,
                    store.quarantined(),
                    std::time::SystemTime::now()
                )
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot read the outbox {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Runs `f` on a multi-thread runtime with a shutdown token cancelled by SIGTERM or SIGINT.
fn runtime_main<F, Fut, E>(f: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: Into<anyhow::Error>,
{
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "Cannot start the runtime.");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signals.cancel();
        });
        match f(shutdown).await.map_err(Into::into) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!(error = %format!("{e:#}"), "Stopped on an error.");
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
