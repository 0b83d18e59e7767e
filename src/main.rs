//! The `prefsd` binary: `serve` runs the sidecar; every other subcommand is
//! a client of a running one.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use prefsd::app::App;
use prefsd::client::{Client, encode};
use prefsd::config::{Config, LogFormat, ServeArgs};
use prefsd::import::{self, Format};

#[derive(Parser)]
#[command(name = "prefsd", version, about = "Notification-preferences sidecar")]
struct Cli {
    /// The sidecar a client subcommand talks to.
    #[arg(long, global = true, env = "PREFSD_URL", default_value = "http://127.0.0.1:7070")]
    url: String,
    /// API key for client subcommands.
    #[arg(long, global = true, env = "PREFSD_KEY", hide_env_values = true)]
    key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Serve(Box<ServeArgs>),
    /// List, create, archive or restore services.
    #[command(subcommand)]
    Services(ServicesCmd),
    /// Read or write one customer's preferences.
    #[command(subcommand)]
    Prefs(PrefsCmd),
    /// May CUSTOMER get CHANNEL from SERVICE? Prints the answer; exit code 0 if allowed, 1 if not.
    Check { customer: String, service: String, channel: String },
    /// Audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Import preferences from CSV (customer,service,channel,status[,reason]) or NDJSON.
    Import {
        /// The file; `-` reads standard input.
        file: String,
        /// csv or ndjson [default: from the file name].
        #[arg(long)]
        format: Option<String>,
        /// Rows per request.
        #[arg(long, default_value_t = 1000)]
        chunk: usize,
    },
    /// Make API keys.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Opt-out link tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Offline, with prefsd stopped: recover a data directory whose write-ahead log is damaged.
    ///
    /// Keeps a copy of the damaged log, replays every intact frame before and after the damage, and
    /// records the events the damaged bytes held as lost, in an audit event.
    Recover {
        /// The data directory.
        #[arg(long, env = "PREFSD_DATA")]
        data: std::path::PathBuf,
    },
    /// Exit 0 if the sidecar at --url is ready (GET /readyz answers 200), 1 if not: for health checks.
    Health,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Issue an opt-out link for CUSTOMER; SERVICE and CHANNEL may be `*`.
    Issue { customer: String, service: String, channel: String },
    /// Print a new random token signing key entry (ID:SECRET) for token_keys.
    Generate {
        /// The key id, 0-255; give each new key a new id.
        #[arg(long, default_value_t = 1)]
        id: u8,
    },
}

#[derive(Subcommand)]
enum ServicesCmd {
    /// List every service.
    List,
    /// Register a service.
    Create {
        slug: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Archive a service: history stays, new writes are refused.
    Archive { slug: String },
    /// Take a service out of the archive.
    Restore { slug: String },
}

#[derive(Subcommand)]
enum PrefsCmd {
    /// Effective status of every pair, and the explicit records.
    Get { customer: String },
    /// Write a preference; SERVICE and CHANNEL may be `*`.
    Set {
        customer: String,
        service: String,
        channel: String,
        /// opted_out or opted_in.
        status: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Every audit entry after --after, as NDJSON on standard output.
    Export {
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// One customer's entries.
    Customer { customer: String },
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Print a new random key and the hash to configure.
    Generate {
        /// The key's name.
        #[arg(long, default_value = "sender")]
        name: String,
        /// sender, support (staff: customers, reasons, audit) or admin.
        #[arg(long, default_value = "sender")]
        role: String,
    },
    /// Print the hash of an existing key.
    Hash { key: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Recover { data } => recover(&data),
        other => {
            let client = Client::new(&cli.url, cli.key);
            run_client(&client, other)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("prefsd: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn serve(args: ServeArgs) -> Result<ExitCode, String> {
    let config = Config::load(&args)?;
    init_logs(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let api = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        let metrics = match config.metrics_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen on {addr} (metrics): {e}"))?,
            ),
            None => None,
        };
        let local = api.local_addr().map_err(|e| e.to_string())?;
        let metrics_local = metrics.as_ref().and_then(|l| l.local_addr().ok());
        let app = App::open(config).map_err(|e| e.to_string())?;
        tracing::info!(
            listen = %local,
            metrics_listen = %metrics_local.map_or_else(|| "none".to_owned(), |a| a.to_string()),
            keys = app.config().keys.len(),
            "prefsd serving"
        );
        if app.config().keys.is_empty() {
            tracing::info!("no API keys configured: serving unauthenticated on loopback only");
        }
        prefsd::server::run(api, metrics, app, prefsd::server::shutdown_signal()).await;
        Ok(ExitCode::SUCCESS)
    })
}

fn recover(data: &std::path::Path) -> Result<ExitCode, String> {
    init_logs(LogFormat::Text);
    let done = prefsd::store::repair(data).map_err(|e| format!("cannot recover {}: {e}", data.display()))?;
    println!("{done}");
    Ok(ExitCode::SUCCESS)
}

/// Logs go to stderr, one line per event (JSON objects with `log_format =
/// json`); `PREFSD_LOG` filters them (default `info`, which includes one
/// line per request on target `prefsd::request`).
fn init_logs(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("PREFSD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn print(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

fn run_client(client: &Client, command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Serve(_) | Command::Recover { .. } => unreachable!("handled by main"),
        Command::Services(cmd) => {
            let value = match cmd {
                ServicesCmd::List => client.call("GET", "/v1/services", None)?,
                ServicesCmd::Create { slug, name, description } => client.call(
                    "POST",
                    "/v1/services",
                    Some(&serde_json::json!({"slug": slug, "name": name, "description": description})),
                )?,
                ServicesCmd::Archive { slug } => client.call(
                    "PATCH",
                    &format!("/v1/services/{}", encode(&slug)),
                    Some(&serde_json::json!({"archived": true})),
                )?,
                ServicesCmd::Restore { slug } => client.call(
                    "PATCH",
                    &format!("/v1/services/{}", encode(&slug)),
                    Some(&serde_json::json!({"archived": false})),
                )?,
            };
            print(&value);
        }
        Command::Prefs(PrefsCmd::Get { customer }) => {
            print(&client.call("GET", &format!("/v1/customers/{}/preferences", encode(&customer)), None)?);
        }
        Command::Prefs(PrefsCmd::Set { customer, service, channel, status, reason }) => {
            let path = format!(
                "/v1/customers/{}/preferences/{}/{}",
                encode(&customer),
                encode(&service),
                encode(&channel)
            );
            print(&client.call(
                "PUT",
                &path,
                Some(&serde_json::json!({"status": status, "reason": reason})),
            )?);
        }
        Command::Check { customer, service, channel } => {
            let path = format!(
                "/v1/check?customer={}&service={}&channel={}",
                encode(&customer),
                encode(&service),
                encode(&channel)
            );
            let value = client.call("GET", &path, None)?;
            print(&value);
            if value["allowed"] != serde_json::Value::Bool(true) {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Audit(AuditCmd::Customer { customer }) => {
            print(&client.call("GET", &format!("/v1/customers/{}/audit", encode(&customer)), None)?);
        }
        Command::Audit(AuditCmd::Export { mut after }) => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let mut total = 0u64;
            loop {
                let page = client.call("GET", &format!("/v1/audit?after={after}&limit=10000"), None)?;
                for entry in page["entries"].as_array().into_iter().flatten() {
                    writeln!(out, "{entry}").map_err(|e| e.to_string())?;
                    total += 1;
                }
                let next = page["next_after"].as_u64().unwrap_or(after);
                if next == after {
                    break;
                }
                after = next;
            }
            out.flush().map_err(|e| e.to_string())?;
            eprintln!("exported {total} audit entries");
        }
        Command::Import { file, format, chunk } => {
            return import_file(client, &file, format.as_deref(), chunk);
        }
        Command::Key(KeyCmd::Generate { name, role }) => {
            if prefsd::auth::Role::parse(&role).is_none() {
                return Err(format!("role {role:?} is not sender, support or admin"));
            }
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| format!("no randomness: {e}"))?;
            use base64::Engine;
            let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
            let hash = prefsd::auth::hash_key(&key);
            println!("key:    {key}");
            println!("sha256: {hash}");
            println!("config: [[keys]] name = {name:?}, role = {role:?}, sha256 = {hash:?}");
            println!("env:    PREFSD_KEYS={name}:{role}:{hash}");
        }
        Command::Key(KeyCmd::Hash { key }) => println!("{}", prefsd::auth::hash_key(&key)),
        Command::Health => match client.send("GET", "/readyz", None, None) {
            Ok(answer) if answer.status == 200 => println!("ready"),
            Ok(answer) => {
                eprintln!("prefsd: not ready: /readyz answered {}", answer.status);
                return Ok(ExitCode::from(1));
            }
            Err(e) => {
                eprintln!("prefsd: not ready: {e}");
                return Ok(ExitCode::from(1));
            }
        },
        Command::Token(TokenCmd::Issue { customer, service, channel }) => {
            let customer = serde_json::Value::String(customer);
            let body = serde_json::json!({"customer": customer, "service": service, "channel": channel});
            print(&client.call("POST", "/v1/tokens", Some(&body))?);
        }
        Command::Token(TokenCmd::Generate { id }) => {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| format!("no randomness: {e}"))?;
            use base64::Engine;
            println!("{id}:{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn import_file(client: &Client, file: &str, format: Option<&str>, chunk: usize) -> Result<ExitCode, String> {
    let format = match format {
        None => Format::from_path(file),
        Some("csv") => Format::Csv,
        Some("ndjson") => Format::Ndjson,
        Some(other) => return Err(format!("format {other:?} is neither csv nor ndjson")),
    };
    let (input, size): (Box<dyn std::io::Read>, u64) = if file == "-" {
        (Box::new(std::io::stdin()), 0)
    } else {
        let f = std::fs::File::open(file).map_err(|e| format!("cannot open {file}: {e}"))?;
        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
        (Box::new(f), size)
    };
    let bar =
        if size > 0 { indicatif::ProgressBar::new(size) } else { indicatif::ProgressBar::new_spinner() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:40}] {bytes}/{total_bytes} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let (mut accepted, mut rejected) = (0u64, Vec::new());
    import::read(input, format, chunk.max(1), |rows, bad, pos| {
        rejected.extend(bad.into_iter().map(|r| (r.line, r.message)));
        if !rows.is_empty() {
            let items: Vec<&serde_json::Value> = rows.iter().map(|r| &r.item).collect();
            let answer = client.call(
                "POST",
                "/v1/preferences/import",
                Some(&serde_json::json!({ "items": items })),
            )?;
            let results = answer["results"].as_array().cloned().unwrap_or_default();
            for (row, result) in rows.iter().zip(results) {
                if result.get("seq").is_some() {
                    accepted += 1;
                } else {
                    let message = result["error"]["message"].as_str().unwrap_or("rejected").to_owned();
                    rejected.push((row.line, message));
                }
            }
        }
        bar.set_position(pos);
        bar.set_message(format!("{accepted} accepted, {} rejected", rejected.len()));
        Ok(())
    })?;
    bar.finish_and_clear();
    rejected.sort();
    for (line, message) in &rejected {
        eprintln!("line {line}: {message}");
    }
    println!("{accepted} rows accepted, {} rejected", rejected.len());
    Ok(if rejected.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
