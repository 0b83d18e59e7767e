//! The shared state of a running sidecar, as a cheap handle.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;

use crate::auth::Keys;
use crate::cluster::{Cluster, ClusterConfig, ClusterStatus};
use crate::config::Config;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::store::{Store, StoreOptions};
use crate::token::{TokenKey, Tokens};
use crate::writer::{Writer, WriterConfig};

/// A handle to the sidecar's state; clone it freely.
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    keys: Keys,
    /// Read on every check; written only by the writer thread, after commits.
    index: Arc<RwLock<Index>>,
    /// Reads (records, audit) open their own redb read transactions.
    store: Arc<Store>,
    writer: Writer,
    /// Joined on close, so the store is dropped (and redb closed) before exit.
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
    /// Cleared when shutdown begins, so load balancers stop sending.
    ready: AtomicBool,
    tokens: Tokens,
    limiter: RateLimiter,
    /// In cluster mode, what the PostgreSQL follower knows.
    cluster: Option<Arc<ClusterStatus>>,
    /// The support console's sessions and tallies (in memory: a restart
    /// signs everyone out).
    console: crate::console::Console,
}

/// The token keys to use: the configured ones, or the embedded default — a
/// key generated once into `DATA/token-keys` (mode 0600) and reused.
fn token_keys(config: &Config) -> Result<Vec<TokenKey>, String> {
    if !config.token_keys.is_empty() {
        return Ok(config.token_keys.clone());
    }
    if config.postgres.is_some() {
        // Config::resolve says so too; this covers a Config built in code.
        return Err(crate::config::CLUSTER_NEEDS_TOKEN_KEYS.into());
    }
    use base64::Engine;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = config.data.join("token-keys");
    let parse = |text: &str| -> Result<Vec<TokenKey>, String> {
        match crate::config::parse_token_keys(text) {
            Ok(keys) if !keys.is_empty() => Ok(keys),
            Ok(_) => Err(format!("{} holds no token key", path.display())),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret).map_err(|e| format!("no randomness for a token key: {e}"))?;
            let line = format!("0:{}\n", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            f.write_all(line.as_bytes())
                .and_then(|()| f.sync_all())
                .and_then(|()| crate::wal::sync_dir(&config.data))
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            tracing::warn!(
                path = %path.display(),
                "no token keys configured: generated a signing key for opt-out links in the data directory; \
                 configure token_keys to share keys between sidecars"
            );
            parse(&line)
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

impl App {
    /// Opens the store in `config.data`, loads the index and starts the writer.
    pub fn open(config: Config) -> Result<App, String> {
        let started = std::time::Instant::now();
        let options = StoreOptions { cache_bytes: config.cache_bytes, ..StoreOptions::default() };
        let store = Arc::new(Store::open_with(&config.data, options).map_err(|e| e.to_string())?);
        let tokens = Tokens::new(token_keys(&config)?, config.token_lifetime.as_secs())?;
        let limiter = RateLimiter::new(config.rate_limit_per_minute, config.rate_limit_burst);
        let loaded = store.load(&config.channels).map_err(|e| e.to_string())?;
        tracing::info!(
            data = %config.data.display(),
            services = loaded.services.len(),
            opted_out_entries = loaded.index.entries(),
            last_seq = loaded.last_seq,
            from_snapshot = loaded.from_snapshot,
            ms = started.elapsed().as_millis() as u64,
            "index loaded"
        );
        let metrics = Arc::new(Metrics::new());
        metrics.set_last_seq(loaded.last_seq);
        metrics.set_wal_replayed(store.replayed());
        let index = Arc::new(RwLock::new(loaded.index));
        let (mut writer, thread) = Writer::start(
            store.clone(),
            index.clone(),
            loaded.services,
            loaded.last_seq,
            WriterConfig { max_batch: config.commit_batch_max, queue: 65_536 },
            metrics.clone(),
        );
        let keys = Keys::new(&config.keys);
        let console = crate::console::Console::new(config.console_idle, config.console_absolute);
        let cluster = match &config.postgres {
            None => None,
            Some(url) => {
                let cluster = Cluster::start(
                    ClusterConfig {
                        url: url.clone(),
                        poll: config.postgres_poll,
                        max_batch: config.commit_batch_max,
                        channels: config.channels.clone(),
                        timeout: config.postgres_timeout,
                        unhealthy_after: config.follower_unhealthy,
                        data: config.data.clone(),
                    },
                    writer.clone(),
                    store.clone(),
                    metrics.clone(),
                )?;
                let status = cluster.status().clone();
                writer.set_cluster(cluster);
                tracing::info!("cluster mode: postgres is the system of record");
                Some(status)
            }
        };
        Ok(App {
            inner: Arc::new(Inner {
                config,
                keys,
                index,
                store,
                writer,
                writer_thread: Mutex::new(Some(thread)),
                metrics,
                ready: AtomicBool::new(true),
                tokens,
                limiter,
                cluster,
                console,
            }),
        })
    }

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The API keys.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// Read access to the index. Hold it briefly: writers wait behind it.
    pub fn index(&self) -> RwLockReadGuard<'_, Index> {
        self.inner.index.read().expect("index lock poisoned")
    }

    /// The store, for reads.
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    /// The writer, for changes.
    pub fn writer(&self) -> &Writer {
        &self.inner.writer
    }

    /// The opt-out link signer.
    pub fn tokens(&self) -> &Tokens {
        &self.inner.tokens
    }

    /// The recipient routes' rate limiter.
    pub fn limiter(&self) -> &RateLimiter {
        &self.inner.limiter
    }

    /// The support console's state.
    pub fn console(&self) -> &crate::console::Console {
        &self.inner.console
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Whether the sidecar takes traffic: loaded, not shutting down, and in
    /// cluster mode following PostgreSQL, caught up and not diverged.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
            && self
                .inner
                .cluster
                .as_ref()
                .is_none_or(|c| c.not_ready(*self.inner.writer.applied().borrow()).is_none())
    }

    /// Why the process should be restarted, if it should: in cluster mode,
    /// the follower has not been able to apply events for longer than the bound.
    pub fn unhealthy(&self) -> Option<String> {
        self.inner.cluster.as_ref().and_then(|c| c.unhealthy())
    }

    /// Cluster mode's follower status, if in cluster mode.
    pub fn cluster(&self) -> Option<&ClusterStatus> {
        self.inner.cluster.as_deref()
    }

    /// Finishes queued writes, writes a final snapshot and closes the store.
    pub async fn close(&self) {
        self.inner.ready.store(false, Ordering::Release);
        self.inner.writer.close().await;
        let thread = self.inner.writer_thread.lock().expect("writer handle").take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}
