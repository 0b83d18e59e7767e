//! The shared state of a running sidecar, as a cheap handle.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;

use crate::auth::Keys;
use crate::config::Config;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
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
}

impl App {
    /// Opens the store in `config.data`, loads the index and starts the writer.
    pub fn open(config: Config) -> Result<App, StoreError> {
        let started = std::time::Instant::now();
        let store = Arc::new(Store::open(&config.data)?);
        let loaded = store.load(&config.channels)?;
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
        let index = Arc::new(RwLock::new(loaded.index));
        let (writer, thread) = Writer::start(
            store.clone(),
            index.clone(),
            loaded.services,
            WriterConfig { max_batch: config.commit_batch_max, queue: 65_536 },
            metrics.clone(),
        );
        let keys = Keys::new(&config.keys);
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

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Whether the sidecar takes traffic.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
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
