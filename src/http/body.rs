//! Request bodies: [`Tracked`] tells `handle` whether a body was read to its
//! end, so an answer given before (a 413, a 401, a 404 on an unknown
//! service) says `Connection: close` — hyper closes such a connection, and
//! a pooled client must not send its next request into it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, SizeHint};

/// A request body that records reaching its end.
#[derive(Debug)]
pub struct Tracked<B> {
    inner: B,
    /// `None` for a body that was empty from the start (no allocation on
    /// the check path); else set once the end is seen.
    ended: Option<Arc<AtomicBool>>,
}

impl<B: Body> Tracked<B> {
    /// Wraps a body and returns the flag `handle` reads afterwards.
    pub fn new(inner: B) -> (Tracked<B>, Option<Arc<AtomicBool>>) {
        let ended = (!inner.is_end_stream()).then(|| Arc::new(AtomicBool::new(false)));
        (Tracked { inner, ended: ended.clone() }, ended)
    }

    fn end(&self) {
        if let Some(ended) = &self.ended {
            ended.store(true, Ordering::Release);
        }
    }
}

/// Whether a body that had content was left unread (or partly read).
pub fn left_unread(ended: Option<&Arc<AtomicBool>>) -> bool {
    ended.is_some_and(|e| !e.load(Ordering::Acquire))
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.end(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.end(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};

    #[tokio::test]
    async fn records_whether_the_end_was_reached() {
        let (_, ended) = Tracked::new(Empty::<Bytes>::new());
        assert!(ended.is_none() && !left_unread(ended.as_ref()), "an empty body needs no reading");

        let (body, ended) = Tracked::new(Full::new(Bytes::from_static(b"abc")));
        assert!(left_unread(ended.as_ref()));
        let read = body.collect().await.unwrap().to_bytes();
        assert_eq!(&read[..], b"abc");
        assert!(!left_unread(ended.as_ref()));
    }
}
