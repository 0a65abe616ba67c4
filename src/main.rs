//! `village-gateway`: the command line. Parses arguments, sets up logging, loads the config
//! and calls into the library. Exit codes: 0 ok, 78 bad config (`EX_CONFIG`), 1 anything else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::error;

use village_gateway::config::{Config, EXIT_BAD_CONFIG};
use village_gateway::event::UnitId;
use village_gateway::field::commission;
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
    /// Find the unit ids that answer on a bus, and which generic profile they fit.
    Scan {
        #[command(flatten)]
        bus: BusArgs,
        /// Unit ids to try: `1-247`, `5`, or `1-4,50,100`.
        #[arg(long, default_value = "1-247")]
        units: String,
    },
    /// Read registers, coils or discrete inputs of one unit: `--input 0 4` = 4 input
    /// registers from address 0 (PDU addresses, 0-based).
    Read {
        #[command(flatten)]
        bus: BusArgs,
        /// Unit id 1..=247 (or the TCP unit id).
        #[arg(long)]
        unit: u8,
        /// Input registers (FC04): ADDRESS COUNT.
        #[arg(long, num_args = 2, value_names = ["ADDRESS", "COUNT"], group = "table")]
        input: Option<Vec<u16>>,
        /// Holding registers (FC03): ADDRESS COUNT.
        #[arg(long, num_args = 2, value_names = ["ADDRESS", "COUNT"], group = "table")]
        holding: Option<Vec<u16>>,
        /// Coils (FC01): ADDRESS COUNT.
        #[arg(long, num_args = 2, value_names = ["ADDRESS", "COUNT"], group = "table")]
        coil: Option<Vec<u16>>,
        /// Discrete inputs (FC02): ADDRESS COUNT.
        #[arg(long, num_args = 2, value_names = ["ADDRESS", "COUNT"], group = "table")]
        discrete: Option<Vec<u16>>,
    },
    /// Run the embedded MQTT broker (for trying the gateway by hand) on 127.0.0.1:PORT.
    #[cfg(feature = "embedded-broker")]
    Broker {
        #[arg(long, default_value_t = 1883)]
        port: u16,
    },
}

/// Where `scan` and `read` talk to.
#[derive(Debug, clap::Args)]
struct BusArgs {
    /// Serial port (e.g. /dev/serial/by-id/usb-FTDI_...).
    #[arg(long, conflicts_with = "tcp")]
    port: Option<String>,
    /// Modbus TCP converter, host:port.
    #[arg(long)]
    tcp: Option<String>,
    #[arg(long, default_value_t = 9600)]
    baud: u32,
    /// none, even or odd.
    #[arg(long, default_value = "none")]
    parity: String,
    #[arg(long, default_value_t = 1)]
    stop_bits: u8,
    /// The RS-485 adapter echoes our own transmission.
    #[arg(long)]
    echo: bool,
    /// Per transaction, e.g. 50ms (default: derived from the baud rate).
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<std::time::Duration>,
}

impl From<BusArgs> for commission::Target {
    fn from(a: BusArgs) -> Self {
        commission::Target {
            port: a.port,
            tcp: a.tcp,
            baud: a.baud,
            parity: a.parity,
            stop_bits: a.stop_bits,
            echo: a.echo,
            timeout: a.timeout,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::CheckConfig { .. } | Command::Outbox { .. }
    ) {
        // These reports (no sockets, no serial ports) end quietly when their reader does (`check-config ... | head`), as
        // other command-line tools do, instead of panicking in println!. The daemon keeps
        // Rust's default (SIGPIPE ignored): a closed socket must be an error, not its death.
        // SAFETY: no other thread exists yet, and SIG_DFL installs no handler code.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    village_gateway::logging::init(matches!(cli.command, Command::Demo { .. }));
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{}: ok", config.display());
                println!("{}", village_gateway::config::summary(&c));
                println!("{}", village_gateway::field::budget::report(&c));
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
        Command::Scan { bus, units } => runtime_main(|_| async move {
            let target = commission::Target::from(bus);
            let units = commission::parse_units(&units)?;
            let report = commission::scan(&target, &units, |unit, found| {
                // Progress on stderr (a full scan takes ~40 s at 9600 baud).
                if found.is_some() {
                    eprintln!("unit {unit} answers");
                }
            })
            .await?;
            print!("{}", commission::format_scan(&report));
            Ok::<(), anyhow::Error>(())
        }),
        Command::Read {
            bus,
            unit,
            input,
            holding,
            coil,
            discrete,
        } => runtime_main(|_| async move {
            use commission::Table;
            let (table, range) = [
                (Table::Input, input),
                (Table::Holding, holding),
                (Table::Coil, coil),
                (Table::DiscreteInput, discrete),
            ]
            .into_iter()
            .find_map(|(t, r)| r.map(|r| (t, r)))
            .ok_or_else(|| anyhow::anyhow!("give one of --input, --holding, --coil, --discrete"))?;
            let target = commission::Target::from(bus);
            let (lines, stats) =
                commission::read(&target, UnitId(unit), table, range[0], range[1]).await?;
            print!("{lines}");
            println!("{}", commission::stats_line(&stats));
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
