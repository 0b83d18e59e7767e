//! Helpers shared by the integration test binaries: an in-process sidecar on
//! `127.0.0.1:0` with a temporary data dir, a child `prefsd serve` process,
//! and polling with a deadline.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod pg;

use prefsd::app::App;
use prefsd::client::Client;
use prefsd::config::Config;

/// A sidecar running inside the test process.
pub struct TestApp {
    pub addr: SocketAddr,
    /// The metrics listener's address, when `config.metrics_listen` was set
    /// (use `127.0.0.1:0`).
    pub metrics_addr: Option<SocketAddr>,
    pub client: Client,
    pub app: App,
    pub data: PathBuf,
    _dir: Option<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Stops the server gracefully and waits until the store is closed.
    pub fn stop(mut self) -> PathBuf {
        self.shutdown();
        self.data.clone()
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts a sidecar with default settings and a fresh temporary data dir.
pub fn spawn_app() -> TestApp {
    spawn_with(|_| {})
}

/// Starts a sidecar, letting `tweak` adjust the configuration first.
pub fn spawn_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut app = spawn_on(&data, tweak);
    app._dir = Some(dir);
    app
}

/// Starts a sidecar on an existing data dir (which the caller keeps alive).
pub fn spawn_on(data: &Path, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let mut config = Config::for_data_dir(data.to_owned());
    tweak(&mut config);
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let metrics = match config.metrics_listen {
                Some(m) => Some(tokio::net::TcpListener::bind(m).await.unwrap()),
                None => None,
            };
            let metrics_addr = metrics.as_ref().map(|l| l.local_addr().unwrap());
            let app = App::open(config).unwrap();
            addr_tx.send((addr, metrics_addr, app.clone())).unwrap();
            prefsd::server::run(listener, metrics, app, async {
                let _ = stop_rx.await;
            })
            .await;
        });
    });
    let (addr, metrics_addr, app) = addr_rx.recv_timeout(Duration::from_secs(30)).expect("sidecar started");
    TestApp {
        addr,
        metrics_addr,
        client: Client::new(&format!("http://{addr}"), None),
        app,
        data: data.to_owned(),
        _dir: None,
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `prefsd serve` child process on a free port over `data`.
pub struct ChildSidecar {
    pub child: Child,
    pub addr: SocketAddr,
    pub client: Client,
}

impl ChildSidecar {
    /// Starts the binary and waits until `/readyz` answers 200.
    pub fn start(data: &Path, extra_env: &[(&str, &str)]) -> ChildSidecar {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_prefsd"));
        cmd.args(["serve", "--listen", &addr.to_string(), "--data"])
            .arg(data)
            .env_remove("PREFSD_CONFIG")
            .env("PREFSD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn prefsd");
        let client = Client::new(&format!("http://{addr}"), None);
        let mut sidecar = ChildSidecar { child, addr, client };
        let probe = sidecar.client.clone();
        let started = wait_for("prefsd to become ready", Duration::from_secs(60), || {
            if let Ok(Some(status)) = sidecar.child.try_wait() {
                return Some(Err(status));
            }
            match probe.send("GET", "/readyz", None, None) {
                Ok(a) if a.status == 200 => Some(Ok(())),
                _ => None,
            }
        });
        if let Err(status) = started {
            panic!("prefsd exited before becoming ready: {status}");
        }
        sidecar
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.child.wait().expect("wait for prefsd")
    }
}

impl Drop for ChildSidecar {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// Whether every external helper program is required (CI), not skippable.
pub fn require_all() -> bool {
    std::env::var("PREFSD_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Prints a SKIP line, or panics under `PREFSD_TEST_REQUIRE_ALL=1`.
pub fn skip(test: &str, why: &str) {
    if require_all() {
        panic!("{test}: {why}, and PREFSD_TEST_REQUIRE_ALL=1 forbids skipping");
    }
    println!("SKIP {test}: {why}");
    eprintln!("SKIP {test}: {why}");
}
