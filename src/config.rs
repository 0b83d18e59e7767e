//! Configuration in two stages: [`ServeArgs`] (flags and `PREFSD_*`
//! environment, via clap) and [`FileConfig`] (the TOML file) are merged —
//! flag over env over file over default — and validated into [`Config`],
//! which is passed down by value. Every bad setting is reported at once.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::{ApiKey, Role, parse_hash};
use crate::domain::ChannelName;
use crate::token::{Secret, TokenKey};

/// Default API address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Default data directory.
pub const DEFAULT_DATA: &str = "./prefsd-data";

/// `prefsd serve` flags; each also reads its `PREFSD_*` variable.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "PREFSD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the API [default: 127.0.0.1:7070].
    #[arg(long, env = "PREFSD_LISTEN")]
    pub listen: Option<String>,
    /// Data directory holding prefsd.redb [default: ./prefsd-data].
    #[arg(long, env = "PREFSD_DATA")]
    pub data: Option<PathBuf>,
    /// Extra listener for /metrics, /healthz and /readyz only.
    #[arg(long, env = "PREFSD_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Channels, comma-separated [default: email,sms].
    #[arg(long, env = "PREFSD_CHANNELS", value_delimiter = ',')]
    pub channels: Option<Vec<String>>,
    /// API keys as NAME:ROLE:SHA256HEX, comma-separated (see `prefsd key`).
    #[arg(long, env = "PREFSD_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub keys: Option<Vec<String>>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "PREFSD_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Largest request body on ordinary routes, in bytes [default: 65536].
    #[arg(long, env = "PREFSD_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Largest body of POST /v1/check, /v1/filter and imports [default: 67108864].
    #[arg(long, env = "PREFSD_MAX_BULK_BODY_BYTES")]
    pub max_bulk_body_bytes: Option<usize>,
    /// Most ids in one filter, checks in one batch, or rows in one import request [default: 5000000].
    #[arg(long, env = "PREFSD_MAX_BATCH_ITEMS")]
    pub max_batch_items: Option<usize>,
    /// Most writes sharing one commit [default: 4096].
    #[arg(long, env = "PREFSD_COMMIT_BATCH_MAX")]
    pub commit_batch_max: Option<usize>,
    /// Memory for redb's page cache and write buffer, in bytes [default: 33554432].
    #[arg(long, env = "PREFSD_CACHE_BYTES")]
    pub cache_bytes: Option<usize>,
    /// Seconds between index snapshots while writes arrive [default: 60].
    #[arg(long, env = "PREFSD_SNAPSHOT_INTERVAL_SECS")]
    pub snapshot_interval_secs: Option<u64>,
    /// Base URL of opt-out links, as recipients reach the web tier [default: http://LISTEN].
    #[arg(long, env = "PREFSD_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Token keys as ID:BASE64URLSECRET, comma-separated; the first signs.
    #[arg(long, env = "PREFSD_TOKEN_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub token_keys: Option<Vec<String>>,
    /// File with token keys, one ID:BASE64URLSECRET per line; the first signs.
    #[arg(long, env = "PREFSD_TOKEN_KEYS_FILE")]
    pub token_keys_file: Option<PathBuf>,
    /// Days an opt-out link may opt in or show its page [default: 180].
    #[arg(long, env = "PREFSD_TOKEN_LIFETIME_DAYS")]
    pub token_lifetime_days: Option<u64>,
    /// Proxies whose X-Forwarded-For is believed: IPs or CIDRs, comma-separated.
    #[arg(long, env = "PREFSD_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Requests per minute per client address on /u/ and token redemption [default: 30].
    #[arg(long, env = "PREFSD_RATE_LIMIT_PER_MINUTE")]
    pub rate_limit_per_minute: Option<u32>,
    /// Burst allowance of that rate limit [default: 20].
    #[arg(long, env = "PREFSD_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,
    /// PostgreSQL URL: turns on cluster mode (libpq-style; several hosts with target_session_attrs=read-write fail over).
    #[arg(long, env = "PREFSD_POSTGRES", hide_env_values = true)]
    pub postgres: Option<String>,
    /// Milliseconds between polls of the PostgreSQL event log when no NOTIFY arrives [default: 500].
    #[arg(long, env = "PREFSD_POSTGRES_POLL_MS")]
    pub postgres_poll_ms: Option<u64>,
    /// Milliseconds a write may wait on PostgreSQL before it is answered 503 [default: 10000].
    #[arg(long, env = "PREFSD_POSTGRES_TIMEOUT_MS")]
    pub postgres_timeout_ms: Option<u64>,
    /// Seconds the follower may fail to apply events before /healthz fails [default: 60].
    #[arg(long, env = "PREFSD_FOLLOWER_UNHEALTHY_SECS")]
    pub follower_unhealthy_secs: Option<u64>,
    /// Seconds a client has to send a whole request head once it starts one [default: 10].
    #[arg(long, env = "PREFSD_HEADER_READ_TIMEOUT_SECS")]
    pub header_read_timeout_secs: Option<u64>,
    /// Seconds a connection may sit idle (no request, no bytes) before it is closed [default: 60].
    #[arg(long, env = "PREFSD_IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: Option<u64>,
    /// Most open connections per listener; more are closed at once [default: 4096].
    #[arg(long, env = "PREFSD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Minutes a support console session may sit unused before it ends [default: 30].
    #[arg(long, env = "PREFSD_CONSOLE_IDLE_MINUTES")]
    pub console_idle_minutes: Option<u64>,
    /// Hours a support console session lasts at most, however busy [default: 12].
    #[arg(long, env = "PREFSD_CONSOLE_ABSOLUTE_HOURS")]
    pub console_absolute_hours: Option<u64>,
}

/// The TOML file: every key optional, same names as the flags with `_`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<String>,
    data: Option<PathBuf>,
    metrics_listen: Option<String>,
    channels: Option<Vec<String>>,
    #[serde(default)]
    keys: Vec<FileKey>,
    log_format: Option<String>,
    max_body_bytes: Option<usize>,
    max_bulk_body_bytes: Option<usize>,
    max_batch_items: Option<usize>,
    commit_batch_max: Option<usize>,
    cache_bytes: Option<usize>,
    snapshot_interval_secs: Option<u64>,
    public_url: Option<String>,
    #[serde(default)]
    token_keys: Vec<FileTokenKey>,
    token_keys_file: Option<PathBuf>,
    token_lifetime_days: Option<u64>,
    trusted_proxies: Option<Vec<String>>,
    rate_limit_per_minute: Option<u32>,
    rate_limit_burst: Option<u32>,
    postgres: Option<String>,
    postgres_poll_ms: Option<u64>,
    postgres_timeout_ms: Option<u64>,
    follower_unhealthy_secs: Option<u64>,
    header_read_timeout_secs: Option<u64>,
    idle_timeout_secs: Option<u64>,
    max_connections: Option<usize>,
    console_idle_minutes: Option<u64>,
    console_absolute_hours: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTokenKey {
    id: u8,
    secret: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    name: String,
    role: String,
    sha256: String,
}

/// Why cluster mode refuses to start without configured token keys.
pub const CLUSTER_NEEDS_TOKEN_KEYS: &str = "cluster mode (postgres) needs token keys shared by every sidecar, \
    or a link issued by one is refused by the others: generate a key with `prefsd token generate` and give \
    every sidecar the same token_keys (PREFSD_TOKEN_KEYS or token_keys_file)";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated configuration of a sidecar.
#[derive(Debug, Clone)]
pub struct Config {
    /// API address.
    pub listen: SocketAddr,
    /// Optional metrics-only address.
    pub metrics_listen: Option<SocketAddr>,
    /// Data directory.
    pub data: PathBuf,
    /// Configured channels, in order.
    pub channels: Vec<ChannelName>,
    /// API keys; empty means loopback-only, unauthenticated.
    pub keys: Vec<ApiKey>,
    /// Log format.
    pub log_format: LogFormat,
    /// Body limit of ordinary routes.
    pub max_body_bytes: usize,
    /// Body limit of bulk routes.
    pub max_bulk_body_bytes: usize,
    /// Item limit of bulk routes.
    pub max_batch_items: usize,
    /// Writes per commit, at most.
    pub commit_batch_max: usize,
    /// redb's cache size (read cache plus write buffer), which bounds
    /// most of the sidecar's memory beyond the index.
    pub cache_bytes: usize,
    /// Time between snapshots.
    pub snapshot_interval: Duration,
    /// Base URL of opt-out links, without a trailing slash.
    pub public_url: String,
    /// Token keys, first signs; empty means "generate one in the data dir".
    pub token_keys: Vec<TokenKey>,
    /// Token lifetime.
    pub token_lifetime: Duration,
    /// Proxies whose X-Forwarded-For is believed.
    pub trusted_proxies: Vec<Cidr>,
    /// Requests per minute per client on recipient routes.
    pub rate_limit_per_minute: u32,
    /// Burst of that limit.
    pub rate_limit_burst: u32,
    /// Cluster mode's PostgreSQL URL (never logged: it may hold a password).
    pub postgres: Option<String>,
    /// Poll interval of the event log.
    pub postgres_poll: Duration,
    /// The bound on every PostgreSQL call a write waits for.
    pub postgres_timeout: Duration,
    /// How long the follower may fail to apply before `/healthz` fails.
    pub follower_unhealthy: Duration,
    /// Time to receive a whole request head, from its first byte.
    pub header_read_timeout: Duration,
    /// Time a connection may sit with no request in flight and no bytes moving.
    pub idle_timeout: Duration,
    /// Open connections per listener, at most.
    pub max_connections: usize,
    /// A console session ends after this long unused.
    pub console_idle: Duration,
    /// A console session ends this long after sign-in, however busy.
    pub console_absolute: Duration,
}

/// An address range, `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDR` or `ADDR/PREFIX`.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
            None => {
                let a = s.parse::<IpAddr>().ok()?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

fn parse_token_key(id: &str, secret: &str) -> Result<TokenKey, String> {
    use base64::Engine;
    let id: u8 =
        id.trim().parse().map_err(|_| format!("token key id {id:?} is not a number from 0 to 255"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(secret.trim().trim_end_matches('='))
        .map_err(|_| format!("token key {id}: the secret is not URL-safe base64"))?;
    let secret = Secret::new(bytes).map_err(|e| format!("token key {id}: {e}"))?;
    Ok(TokenKey { id, secret })
}

/// Parses `ID:BASE64URLSECRET` entries separated by commas or lines (`#` comments).
pub fn parse_token_keys(text: &str) -> Result<Vec<TokenKey>, String> {
    let mut errors = Vec::new();
    let keys = parse_token_keys_text(text, &mut errors);
    if errors.is_empty() { Ok(keys) } else { Err(errors.join("; ")) }
}

fn parse_token_keys_text(text: &str, errors: &mut Vec<String>) -> Vec<TokenKey> {
    let mut keys = Vec::new();
    for entry in text.split([',', '\n']).map(str::trim).filter(|e| !e.is_empty() && !e.starts_with('#')) {
        match entry.split_once(':') {
            Some((id, secret)) => match parse_token_key(id, secret) {
                Ok(k) => keys.push(k),
                Err(e) => errors.push(e),
            },
            None => errors.push("token keys must look like ID:BASE64URLSECRET".into()),
        }
    }
    keys
}

impl Config {
    /// A configuration for tests and embedding: defaults, the given data dir
    /// and an ephemeral loopback port.
    pub fn for_data_dir(data: PathBuf) -> Config {
        let args = ServeArgs { listen: Some("127.0.0.1:0".into()), data: Some(data), ..ServeArgs::default() };
        Config::resolve(&args, FileConfig::default()).expect("defaults are valid")
    }

    /// Reads the file named by `args.config` (if any) and merges.
    pub fn load(args: &ServeArgs) -> Result<Config, String> {
        let file = match &args.config {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
                toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))?
            }
        };
        Config::resolve(args, file)
    }

    /// Merges flags/env over the file over defaults, and validates.
    pub fn resolve(args: &ServeArgs, file: FileConfig) -> Result<Config, String> {
        let mut errors = Vec::new();
        let addr = |what: &str, v: &str, errors: &mut Vec<String>| -> Option<SocketAddr> {
            v.parse()
                .map_err(|_| errors.push(format!("{what} {v:?} is not an address like 127.0.0.1:7070")))
                .ok()
        };
        let listen = args.listen.clone().or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen = addr("listen", &listen, &mut errors);
        let metrics_listen = args
            .metrics_listen
            .clone()
            .or(file.metrics_listen)
            .and_then(|v| addr("metrics_listen", &v, &mut errors));
        let data = args.data.clone().or(file.data).unwrap_or_else(|| DEFAULT_DATA.into());
        let channel_names =
            args.channels.clone().or(file.channels).unwrap_or_else(|| vec!["email".into(), "sms".into()]);
        let mut channels: Vec<ChannelName> = Vec::new();
        for c in &channel_names {
            match ChannelName::parse(c.trim()) {
                Ok(c) if channels.contains(&c) => errors.push(format!("channel {c} is listed twice")),
                Ok(c) => channels.push(c),
                Err(e) => errors.push(e.0),
            }
        }
        if channels.is_empty() {
            errors.push("at least one channel must be configured".into());
        }
        let mut keys = Vec::new();
        let mut add_key = |name: &str, role: &str, hash: &str, errors: &mut Vec<String>| {
            let role_ok = Role::parse(role);
            let hash_ok = parse_hash(hash);
            match (role_ok, hash_ok) {
                _ if name.is_empty() => errors.push("an API key has an empty name".into()),
                (None, _) => {
                    errors.push(format!("API key {name}: role {role:?} is not sender, support or admin"))
                }
                (_, None) => errors.push(format!(
                    "API key {name}: sha256 must be 64 hex digits (make one with `prefsd key generate`)"
                )),
                (Some(role), Some(hash)) => keys.push(ApiKey { name: name.to_owned(), role, hash }),
            }
        };
        match &args.keys {
            Some(list) => {
                for entry in list.iter().filter(|e| !e.trim().is_empty()) {
                    let parts: Vec<&str> = entry.trim().splitn(3, ':').collect();
                    match parts.as_slice() {
                        [name, role, hash] => add_key(name, role, hash, &mut errors),
                        _ => errors.push("PREFSD_KEYS entries must look like NAME:ROLE:SHA256HEX".into()),
                    }
                }
            }
            None => {
                for k in &file.keys {
                    add_key(&k.name, &k.role, &k.sha256, &mut errors);
                }
            }
        }
        let log_format = match args.log_format.clone().or(file.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                errors.push(format!("log_format {other:?} is neither text nor json"));
                LogFormat::Text
            }
        };
        let positive = |what: &str, v: usize, errors: &mut Vec<String>| {
            if v == 0 {
                errors.push(format!("{what} must be positive"));
            }
            v
        };
        let max_body_bytes = positive(
            "max_body_bytes",
            args.max_body_bytes.or(file.max_body_bytes).unwrap_or(64 * 1024),
            &mut errors,
        );
        let max_bulk_body_bytes = positive(
            "max_bulk_body_bytes",
            args.max_bulk_body_bytes.or(file.max_bulk_body_bytes).unwrap_or(64 * 1024 * 1024),
            &mut errors,
        );
        let max_batch_items = positive(
            "max_batch_items",
            args.max_batch_items.or(file.max_batch_items).unwrap_or(5_000_000),
            &mut errors,
        );
        let commit_batch_max = positive(
            "commit_batch_max",
            args.commit_batch_max.or(file.commit_batch_max).unwrap_or(4096),
            &mut errors,
        );
        let cache_bytes = positive(
            "cache_bytes",
            args.cache_bytes.or(file.cache_bytes).unwrap_or(crate::store::DEFAULT_CACHE_BYTES),
            &mut errors,
        );
        let snapshot_interval = Duration::from_secs(
            args.snapshot_interval_secs.or(file.snapshot_interval_secs).unwrap_or(60).max(1),
        );
        let public_url = args
            .public_url
            .clone()
            .or(file.public_url)
            .unwrap_or_else(|| match listen {
                Some(l) => format!("http://{l}"),
                None => String::new(),
            })
            .trim_end_matches('/')
            .to_owned();
        if !(public_url.starts_with("http://") || public_url.starts_with("https://")) {
            errors.push(format!("public_url {public_url:?} must start with http:// or https://"));
        }
        let mut token_keys = match &args.token_keys {
            Some(list) => parse_token_keys_text(&list.join(","), &mut errors),
            None => file
                .token_keys
                .iter()
                .filter_map(|k| {
                    parse_token_key(&k.id.to_string(), &k.secret).map_err(|e| errors.push(e)).ok()
                })
                .collect(),
        };
        if let Some(path) = args.token_keys_file.clone().or(file.token_keys_file) {
            match std::fs::read_to_string(&path) {
                Ok(text) => token_keys.extend(parse_token_keys_text(&text, &mut errors)),
                Err(e) => errors.push(format!("cannot read token keys file {}: {e}", path.display())),
            }
        }
        let token_lifetime_days = args.token_lifetime_days.or(file.token_lifetime_days).unwrap_or(180);
        if token_lifetime_days == 0 {
            errors.push("token_lifetime_days must be positive".into());
        }
        let mut trusted_proxies = Vec::new();
        for p in args.trusted_proxies.clone().or(file.trusted_proxies).unwrap_or_default() {
            match Cidr::parse(p.trim()) {
                Some(c) => trusted_proxies.push(c),
                None if p.trim().is_empty() => {}
                None => errors.push(format!("trusted proxy {p:?} is not an address or CIDR range")),
            }
        }
        let rate_limit_per_minute = args.rate_limit_per_minute.or(file.rate_limit_per_minute).unwrap_or(30);
        let rate_limit_burst = args.rate_limit_burst.or(file.rate_limit_burst).unwrap_or(20);
        if rate_limit_per_minute == 0 || rate_limit_burst == 0 {
            errors.push("rate_limit_per_minute and rate_limit_burst must be positive".into());
        }
        let header_read_timeout_secs =
            args.header_read_timeout_secs.or(file.header_read_timeout_secs).unwrap_or(10);
        let idle_timeout_secs = args.idle_timeout_secs.or(file.idle_timeout_secs).unwrap_or(60);
        if header_read_timeout_secs == 0 || idle_timeout_secs == 0 {
            errors.push("header_read_timeout_secs and idle_timeout_secs must be positive".into());
        }
        let max_connections = positive(
            "max_connections",
            args.max_connections.or(file.max_connections).unwrap_or(4096),
            &mut errors,
        );
        if let Some(listen) = listen
            && keys.is_empty()
            && !listen.ip().is_loopback()
        {
            errors.push(format!(
                "listen address {listen} is not loopback and no API keys are configured: \
                 add keys (see `prefsd key generate`) or listen on 127.0.0.1"
            ));
        }
        let postgres = args.postgres.clone().or(file.postgres).filter(|u| !u.trim().is_empty());
        if postgres.is_some() && token_keys.is_empty() {
            // A key generated per data directory would make every sidecar
            // refuse the links the others issue.
            errors.push(CLUSTER_NEEDS_TOKEN_KEYS.into());
        }
        let postgres_timeout = Duration::from_millis(
            args.postgres_timeout_ms.or(file.postgres_timeout_ms).unwrap_or(10_000).max(10),
        );
        let follower_unhealthy = Duration::from_secs(
            args.follower_unhealthy_secs.or(file.follower_unhealthy_secs).unwrap_or(60).max(1),
        );
        let console_idle_minutes = args.console_idle_minutes.or(file.console_idle_minutes).unwrap_or(30);
        let console_absolute_hours =
            args.console_absolute_hours.or(file.console_absolute_hours).unwrap_or(12);
        if console_idle_minutes == 0 || console_absolute_hours == 0 {
            errors.push("console_idle_minutes and console_absolute_hours must be positive".into());
        }
        if !errors.is_empty() {
            return Err(errors.join("\n"));
        }
        Ok(Config {
            listen: listen.expect("checked above"),
            metrics_listen,
            data,
            channels,
            keys,
            log_format,
            max_body_bytes,
            max_bulk_body_bytes,
            max_batch_items,
            commit_batch_max,
            cache_bytes,
            snapshot_interval,
            public_url,
            token_keys,
            token_lifetime: Duration::from_secs(token_lifetime_days * 86_400),
            trusted_proxies,
            rate_limit_per_minute,
            rate_limit_burst,
            postgres,
            postgres_poll: Duration::from_millis(
                args.postgres_poll_ms.or(file.postgres_poll_ms).unwrap_or(500).max(10),
            ),
            postgres_timeout,
            follower_unhealthy,
            header_read_timeout: Duration::from_secs(header_read_timeout_secs),
            idle_timeout: Duration::from_secs(idle_timeout_secs),
            max_connections,
            console_idle: Duration::from_secs(console_idle_minutes.saturating_mul(60)),
            console_absolute: Duration::from_secs(console_absolute_hours.saturating_mul(3600)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_mode_needs_token_keys() {
        let args = ServeArgs { postgres: Some("postgresql://db/prefs".into()), ..ServeArgs::default() };
        let e = Config::resolve(&args, FileConfig::default()).unwrap_err();
        assert!(e.contains("prefsd token generate"), "{e}");
        let key = format!("1:{}", "A".repeat(43));
        let args = ServeArgs { token_keys: Some(vec![key]), ..args };
        let c = Config::resolve(&args, FileConfig::default()).unwrap();
        assert_eq!(c.postgres_timeout, Duration::from_secs(10));
        assert_eq!(c.follower_unhealthy, Duration::from_secs(60));
    }

    #[test]
    fn defaults_are_loopback_and_two_channels() {
        let c = Config::resolve(&ServeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.data, PathBuf::from(DEFAULT_DATA));
        assert_eq!(c.channels.iter().map(|c| c.as_str()).collect::<Vec<_>>(), ["email", "sms"]);
    }

    #[test]
    fn refuses_public_address_without_keys_and_reports_every_error() {
        let args = ServeArgs {
            listen: Some("0.0.0.0:7070".into()),
            channels: Some(vec!["Email".into()]),
            log_format: Some("xml".into()),
            ..ServeArgs::default()
        };
        let err = Config::resolve(&args, FileConfig::default()).unwrap_err();
        assert!(err.contains("not loopback"), "{err}");
        assert!(err.contains("Email"), "{err}");
        assert!(err.contains("xml"), "{err}");
    }

    #[test]
    fn cache_bytes_defaults_to_the_store_default_and_must_be_positive() {
        let c = Config::resolve(&ServeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(c.cache_bytes, crate::store::DEFAULT_CACHE_BYTES);
        let file: FileConfig = toml::from_str("cache_bytes = 1048576").unwrap();
        assert_eq!(Config::resolve(&ServeArgs::default(), file).unwrap().cache_bytes, 1 << 20);
        let args = ServeArgs { cache_bytes: Some(0), ..ServeArgs::default() };
        let err = Config::resolve(&args, FileConfig::default()).unwrap_err();
        assert!(err.contains("cache_bytes must be positive"), "{err}");
    }

    #[test]
    fn cidrs_match_addresses() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one = Cidr::parse("::1").unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn token_keys_parse_and_short_secrets_are_refused() {
        let good = "A".repeat(43);
        let args = ServeArgs {
            token_keys: Some(vec![format!("2:{good}"), "1:c2hvcnQ".into()]),
            ..ServeArgs::default()
        };
        let err = Config::resolve(&args, FileConfig::default()).unwrap_err();
        assert!(err.contains("at least 32 bytes"), "{err}");
        let args = ServeArgs { token_keys: Some(vec![format!("2:{good}")]), ..ServeArgs::default() };
        assert_eq!(Config::resolve(&args, FileConfig::default()).unwrap().token_keys[0].id, 2);
    }

    #[test]
    fn flags_override_the_file() {
        let text = format!(
            "listen = \"127.0.0.1:1\"\nchannels = [\"email\", \"push\"]\n[[keys]]\nname = \"ops\"\nrole = \"admin\"\nsha256 = \"{}\"\n",
            crate::auth::hash_key("k")
        );
        let file: FileConfig = toml::from_str(&text).unwrap();
        let args = ServeArgs { listen: Some("0.0.0.0:2".into()), ..ServeArgs::default() };
        let c = Config::resolve(&args, file).unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.channels.len(), 2);
        assert_eq!(c.keys[0].name, "ops");
    }
}
