//! A throwaway PostgreSQL server for tests: `initdb` into a temporary
//! directory, `pg_ctl start` on a free loopback port, stop it at will
//! (`-m immediate` simulates a crash), and build a streaming standby with
//! `pg_basebackup`. PostgreSQL refuses to run as root, so as root its
//! binaries run as the `postgres` user. [`Proxy`] sits between a sidecar
//! and the server and can freeze the link (a blackholed network).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Where the server binaries are, if installed.
pub fn bin_dir() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates
        .into_iter()
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file() && d.join("postgres").is_file())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A server this test owns.
pub struct Postgres {
    bin: PathBuf,
    pub dir: PathBuf,
    pub port: u16,
    as_postgres: bool,
    _tmp: Option<tempfile::TempDir>,
}

impl Postgres {
    /// Initializes and starts a new server, or `None` (after a SKIP line or
    /// a panic under `PREFSD_TEST_REQUIRE_ALL=1`) when PostgreSQL is absent.
    pub fn start(test: &str) -> Option<Postgres> {
        let Some(bin) = bin_dir() else {
            super::skip(test, "PostgreSQL server binaries (initdb, pg_ctl) are not installed");
            return None;
        };
        let tmp = tempfile::tempdir().expect("tempdir");
        let as_postgres = is_root();
        if as_postgres {
            chown_postgres(tmp.path());
        }
        let dir = tmp.path().join("pgdata");
        let pg = Postgres { bin, dir, port: super::free_port(), as_postgres, _tmp: Some(tmp) };
        pg.run(
            "initdb",
            &["-D", pg.dir.to_str().unwrap(), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        );
        pg.start_server();
        pg.wait_ready();
        Some(pg)
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path).args(args);
            c
        } else {
            let mut c = Command::new(path);
            c.args(args);
            c
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self.command(program, args).output().unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts (or restarts) the server on its port.
    pub fn start_server(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=on -c max_connections=200",
            self.port
        );
        let log = self.dir.parent().unwrap().join(format!("pg-{}.log", self.port));
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.dir.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Waits until the server accepts connections.
    pub fn wait_ready(&self) {
        let url = self.url();
        super::wait_for("postgres to accept connections", std::time::Duration::from_secs(60), || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async { tokio_postgres::connect(&url, tokio_postgres::NoTls).await.ok().map(|_| ()) })
        });
    }

    /// Stops with `-m immediate`: no checkpoint, like a crash.
    pub fn crash(&self) {
        self.run("pg_ctl", &["-D", self.dir.to_str().unwrap(), "-m", "immediate", "-w", "stop"]);
    }

    /// The URL of database `postgres` on this server.
    pub fn url(&self) -> String {
        url_on(self.port)
    }

    /// A streaming standby of this server, started on its own port.
    pub fn standby(&self) -> Postgres {
        let port = super::free_port();
        let dir = self.dir.parent().unwrap().join(format!("standby-{port}"));
        self.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-D",
                dir.to_str().unwrap(),
                "-R",
                "-X",
                "stream",
            ],
        );
        let standby =
            Postgres { bin: self.bin.clone(), dir, port, as_postgres: self.as_postgres, _tmp: None };
        standby.start_server();
        standby.wait_ready();
        standby
    }

    /// Promotes a standby to primary.
    pub fn promote(&self) {
        self.run("pg_ctl", &["-D", self.dir.to_str().unwrap(), "-w", "promote"]);
    }

    /// Runs SQL and returns the rows as text columns.
    pub fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let url = self.url();
        let sql = sql.to_owned();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
            tokio::spawn(conn);
            let rows = client.simple_query(&sql).await.expect("query");
            rows.into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
                    }
                    _ => None,
                })
                .collect()
        })
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.dir.join("postmaster.pid").exists() {
            let _ = self
                .command("pg_ctl", &["-D", self.dir.to_str().unwrap(), "-m", "immediate", "stop"])
                .output();
        }
    }
}

fn chown_postgres(path: &Path) {
    let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(path).status().expect("chown");
    assert!(status.success(), "chown postgres {path:?}");
}

/// The URL of database `postgres` through `port`.
fn url_on(port: u16) -> String {
    format!("postgresql://postgres@127.0.0.1:{port}/postgres?connect_timeout=3")
}

/// A TCP proxy to a server that can freeze: while frozen it neither reads
/// nor delivers a byte in either direction, and closes nothing (new
/// connections are accepted and then hang too) — what a blackholed network
/// looks like to the client. Stops when dropped.
pub struct Proxy {
    pub port: u16,
    frozen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Starts forwarding `127.0.0.1:PORT` to the server on `target`.
    pub fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let (frozen, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (f, st) = (frozen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                        for (from, to) in
                            [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                        {
                            let (f, st) = (f.clone(), st.clone());
                            std::thread::spawn(move || pump(from, to, &f, &st));
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy { port, frozen, stop }
    }

    /// The URL of database `postgres` through the proxy.
    pub fn url(&self) -> String {
        url_on(self.port)
    }

    /// Holds every byte from now on.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Delivers again, held bytes first.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`, holding bytes while `frozen`, until either side
/// closes or `stop` is set (then both are shut down).
fn pump(mut from: TcpStream, mut to: TcpStream, frozen: &AtomicBool, stop: &AtomicBool) {
    from.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let hold = || {
        while frozen.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    while !stop.load(Ordering::SeqCst) {
        hold();
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                continue;
            }
            Err(_) => break,
        };
        // Bytes read just as the freeze began are held too.
        hold();
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}
