//! Reading what a handler left of an HTTP/1.1 request body.
//!
//! A handler may answer before it has read the body: the gate refuses a request, an upload
//! names a bad path. hyper then reads on only if the rest of the body is already in its
//! buffer; otherwise it closes the connection after the answer, with the client's bytes
//! still arriving. A client that is still writing its body then sees a broken pipe or a
//! reset instead of the answer (the Python SDK reports a `WriteError`, not the 401).
//!
//! So a body dropped before its end is read to its end in the background, as Go's
//! net/http does, within a byte and a time budget: past those the connection is closed as
//! before. A request that sent `Expect: 100-continue` is left alone: reading its body would
//! ask the client to send what nobody wants.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

/// The most of an abandoned body read before giving up on the connection.
pub const DRAIN_BYTES: u64 = 8 << 20;
/// The longest an abandoned body is read before giving up on the connection.
pub const DRAIN_TIME: Duration = Duration::from_secs(10);

/// A request body that, dropped before its end, is read to its end in the background.
pub struct DrainOnDrop<B: Body<Data = Bytes> + Send + Unpin + 'static> {
    /// `None` once dropped.
    inner: Option<B>,
    /// The body has reported its end or an error: nothing to read.
    finished: bool,
}

impl<B: Body<Data = Bytes> + Send + Unpin + 'static> DrainOnDrop<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        DrainOnDrop {
            inner: Some(inner),
            finished: false,
        }
    }
}

impl<B: Body<Data = Bytes> + Send + Unpin + 'static> Body for DrainOnDrop<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            this.finished = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl<B: Body<Data = Bytes> + Send + Unpin + 'static> Drop for DrainOnDrop<B> {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        if self.finished || inner.is_end_stream() {
            return;
        }
        // Dropped outside the runtime (at process exit): nothing to keep alive.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let read = tokio::time::timeout(DRAIN_TIME, discard(inner, DRAIN_BYTES)).await;
            if !matches!(read, Ok(true)) {
                tracing::debug!(
                    "an unread request body was left unfinished; the connection closes"
                );
            }
        });
    }
}

/// Reads `body` to its end, or until more than `budget` bytes were read or it fails.
/// True when it reached its end.
async fn discard<B: Body<Data = Bytes> + Unpin>(mut body: B, budget: u64) -> bool {
    let mut read: u64 = 0;
    loop {
        match body.frame().await {
            None => return true,
            Some(Err(_)) => return false,
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    read = read.saturating_add(data.remaining() as u64);
                    if read > budget {
                        return false;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use std::convert::Infallible;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    type Sent = Result<Frame<Bytes>, Infallible>;

    fn channel_body() -> (mpsc::Sender<Sent>, StreamBody<ReceiverStream<Sent>>) {
        let (tx, rx) = mpsc::channel(1);
        (tx, StreamBody::new(ReceiverStream::new(rx)))
    }

    fn chunk(len: usize) -> Sent {
        Ok(Frame::data(Bytes::from(vec![b'x'; len])))
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_is_read_to_its_end() {
        let (tx, body) = channel_body();
        let mut wrapped = DrainOnDrop::new(body);
        tx.send(chunk(3)).await.expect("first chunk");
        let first = wrapped.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().expect("data").len(), 3);
        drop(wrapped);
        // Someone reads the rest: with a channel of one, each send waits for the last.
        for _ in 0..4 {
            tx.send(chunk(1024)).await.expect("the drain reads on");
        }
        drop(tx);
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_is_not_read_again() {
        let (tx, body) = channel_body();
        let mut wrapped = DrainOnDrop::new(body);
        tx.send(chunk(5)).await.expect("chunk");
        drop(tx);
        assert!(wrapped.frame().await.expect("a frame").is_ok());
        assert!(wrapped.frame().await.is_none());
        assert!(wrapped.finished);
    }

    #[tokio::test]
    async fn discarding_stops_past_the_budget() {
        let (tx, body) = channel_body();
        let sender = tokio::spawn(async move {
            let mut sent = 0;
            while tx.send(chunk(100)).await.is_ok() {
                sent += 1;
            }
            sent
        });
        assert!(!discard(body, 250).await, "gave up");
        // 3 chunks read (300 bytes, past 250), at most one more waiting in the channel.
        let sent = sender.await.expect("sender");
        assert!((3..=5).contains(&sent), "{sent} chunks were sent");
    }

    #[tokio::test]
    async fn discarding_a_short_body_reaches_its_end() {
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            for _ in 0..3 {
                tx.send(chunk(100)).await.expect("send");
            }
        });
        assert!(discard(body, 300).await);
    }
}
