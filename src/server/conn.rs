//! One connection's clock: [`Watched`] wraps a socket and closes it when a
//! client holds it without using it.
//!
//! hyper's own `header_read_timeout` starts when the connection goes idle,
//! so on its own it would also cut every keep-alive connection after the
//! head timeout. Here the two are told apart, as Go's `ReadHeaderTimeout`
//! and `IdleTimeout` are:
//!
//! - **idle**: no request in flight and no byte read or written for
//!   `idle` — the socket reports a timeout and hyper closes it;
//! - **head**: once the first byte of a request head arrives, the whole
//!   head must arrive within `head`;
//! - **stalled write**: an answer the client does not read for `idle`.
//!
//! A request is *in flight* from the moment hyper hands its head to the
//! service until the service answers ([`Activity::begin`]); a handler that
//! waits on the writer or a slow body is never cut by these clocks (body
//! reads have their own per-read timeout in `http::Incoming::bytes`).
//!
//! On close, [`Watched`] shuts its write side first and then reads and
//! discards what the client is still sending for up to [`LINGER`], so an
//! answer sent before the body was read (a 413) reaches the client instead
//! of being destroyed by a TCP reset ("lingering close", as nginx does).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Longest a closing connection drains what the client still sends.
pub const LINGER: Duration = Duration::from_secs(2);

/// The limits a connection is held to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From a request head's first byte to its end.
    pub head: Duration,
    /// With nothing in flight and no bytes moving.
    pub idle: Duration,
}

/// What the socket and the service tell each other about one connection.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last byte moved or answer given.
    last: AtomicU64,
    /// Requests handed to the service and not yet answered.
    in_flight: AtomicU32,
    /// Milliseconds after `epoch`, plus one, when the current head began; 0: none.
    head_started: AtomicU64,
}

impl Activity {
    /// A connection accepted now.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            head_started: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    fn touch(&self) {
        self.last.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Bytes arrived: the connection is active, and with nothing in
    /// flight they are the start of a request head.
    fn read_some(&self) {
        let now = self.now_ms();
        self.last.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) == 0 && self.head_started.load(Ordering::Relaxed) == 0 {
            self.head_started.store(now + 1, Ordering::Relaxed);
        }
    }

    /// A request's head is complete and the service has it: no clock runs
    /// until the returned guard drops with the answer.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// When the read side gives up, if it may: `(deadline, why)`.
    fn read_deadline(&self, limits: Limits) -> Option<(Instant, &'static str)> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let idle = (self.at(self.last.load(Ordering::Relaxed)) + limits.idle, "idle timeout");
        match self.head_started.load(Ordering::Relaxed) {
            0 => Some(idle),
            started => {
                let head = (self.at(started - 1) + limits.head, "request head read timeout");
                Some(if head.0 < idle.0 { head } else { idle })
            }
        }
    }
}

/// A request in flight; dropping it (with the answer) restarts the idle clock.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A socket held to [`Limits`]; see the module docs.
#[derive(Debug)]
pub struct Watched<S> {
    io: S,
    activity: Arc<Activity>,
    limits: Limits,
    read_timer: Pin<Box<Sleep>>,
    write_timer: Pin<Box<Sleep>>,
    /// Set once a clock fired: no lingering for a client that stalled.
    timed_out: bool,
    /// Set once the write side is shut: the lingering deadline.
    closing: Option<Instant>,
}

impl<S> Watched<S> {
    /// Wraps `io`, whose requests report to `activity`.
    pub fn new(io: S, activity: Arc<Activity>, limits: Limits) -> Watched<S> {
        Watched {
            io,
            activity,
            limits,
            read_timer: Box::pin(tokio::time::sleep(limits.idle)),
            write_timer: Box::pin(tokio::time::sleep(limits.idle)),
            timed_out: false,
            closing: None,
        }
    }
}

/// Waits on `timer` for `deadline`: `Ready` once it has passed.
fn due(timer: &mut Pin<Box<Sleep>>, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
    if deadline <= Instant::now() {
        return Poll::Ready(());
    }
    if timer.deadline() != deadline.into() {
        timer.as_mut().reset(deadline.into());
    }
    timer.as_mut().poll(cx)
}

fn timeout(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, why)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.activity.read_some();
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        // Nothing to read: a clock may have run out. The deadline can move
        // while the timer sleeps (a request begins and ends), so look again
        // whenever it fires.
        loop {
            let Some((deadline, why)) = this.activity.read_deadline(this.limits) else {
                return Poll::Pending;
            };
            if due(&mut this.read_timer, deadline, cx).is_pending() {
                return Poll::Pending;
            }
            if this.activity.read_deadline(this.limits).is_some_and(|(d, _)| d <= Instant::now()) {
                this.timed_out = true;
                tracing::debug!(why, "closing a connection");
                return Poll::Ready(Err(timeout(why)));
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Watched<S> {
    /// After a write returned `Pending`: fails once the client has read
    /// nothing for the idle period.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            let deadline = self.activity.at(self.activity.last.load(Ordering::Relaxed)) + self.limits.idle;
            ready!(due(&mut self.write_timer, deadline, cx));
            let deadline = self.activity.at(self.activity.last.load(Ordering::Relaxed)) + self.limits.idle;
            if deadline <= Instant::now() {
                self.timed_out = true;
                return Poll::Ready(timeout("write stalled"));
            }
        }
    }

    /// Reads and drops what the client still sends, until it closes, errs
    /// or [`LINGER`] is over.
    fn drain(&mut self, cx: &mut Context<'_>, until: Instant) -> Poll<()> {
        let mut scratch = [0u8; 16 * 1024];
        loop {
            if Instant::now() >= until {
                return Poll::Ready(());
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(()),
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return due(&mut self.read_timer, until, cx),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.activity.touch();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.stalled(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.activity.touch();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.stalled(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let until = match this.closing {
            Some(until) => until,
            None => {
                ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
                if this.timed_out {
                    return Poll::Ready(Ok(()));
                }
                *this.closing.insert(Instant::now() + LINGER)
            }
        };
        this.drain(cx, until).map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: Limits = Limits { head: Duration::from_millis(100), idle: Duration::from_millis(300) };

    #[tokio::test]
    async fn an_idle_connection_times_out() {
        let (_client, server) = tokio::io::duplex(1024);
        let mut watched = Watched::new(server, Activity::new(), LIMITS);
        let e = watched.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(e.to_string(), "idle timeout");
    }

    #[tokio::test]
    async fn a_started_head_runs_on_the_head_clock() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut watched = Watched::new(server, Activity::new(), LIMITS);
        client.write_all(b"GET / HT").await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(watched.read(&mut buf).await.unwrap(), 8);
        let e = watched.read(&mut buf).await.unwrap_err();
        assert_eq!(e.to_string(), "request head read timeout");
    }

    #[tokio::test]
    async fn no_clock_runs_while_a_request_is_in_flight() {
        let (mut client, server) = tokio::io::duplex(1024);
        let activity = Activity::new();
        let mut watched = Watched::new(server, activity.clone(), LIMITS);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(watched.read(&mut buf).await.unwrap(), 18);
        let guard = activity.begin();
        // The handler waits several idle periods (a slow commit): the read
        // is still pending, not failed.
        let read = tokio::time::timeout(LIMITS.idle * 4, watched.read(&mut buf)).await;
        assert!(read.is_err(), "the read was still pending: {read:?}");
        drop(guard);
        let e = watched.read(&mut buf).await.unwrap_err();
        assert_eq!(e.to_string(), "idle timeout", "the idle clock runs again after the answer");
    }

    #[tokio::test]
    async fn closing_drains_what_the_client_still_sends() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut watched = Watched::new(server, Activity::new(), LIMITS);
        // The client is still sending a body nobody read, more than the
        // pipe holds; the server closes; the client's writes complete.
        let writer = tokio::spawn(async move {
            client.write_all(&[b'x'; 10_000]).await.unwrap();
            client.shutdown().await.unwrap();
        });
        watched.shutdown().await.unwrap();
        writer.await.unwrap();
    }
}
