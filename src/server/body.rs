//! Request bodies that fail when they stall. A body that delivers nothing for the idle
//! timeout ends with an [`io::ErrorKind::TimedOut`] error, which handlers report as 408
//! ([`crate::error::Error::reading_body`]); the connection is then closed, since the rest
//! of the body was never read. The time counts only while the daemon waits for the client:
//! a long upload that keeps moving is never cut off, however long it takes in total.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::panics::guard::BoxError;

/// A request body with an idle timeout (or none, for client streams that may be quiet).
pub struct IdleTimeoutBody<B> {
    inner: B,
    timeout: Option<Duration>,
    /// Armed when the daemon starts waiting for the next frame.
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    timed_out: bool,
}

impl<B> IdleTimeoutBody<B> {
    /// `inner`, failing after `timeout` without a frame (never, when `None`).
    pub fn new(inner: B, timeout: Option<Duration>) -> Self {
        IdleTimeoutBody {
            inner,
            timeout,
            timer: None,
            waiting: false,
            timed_out: false,
        }
    }
}

impl<B> Body for IdleTimeoutBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.timed_out {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                Poll::Ready(frame.map(|result| result.map_err(Into::into)))
            }
            Poll::Pending => {
                let Some(timeout) = this.timeout else {
                    return Poll::Pending;
                };
                if !this.waiting {
                    this.waiting = true;
                    let deadline = Instant::now() + timeout;
                    match &mut this.timer {
                        Some(timer) => timer.as_mut().reset(deadline),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                let expired = this
                    .timer
                    .as_mut()
                    .is_some_and(|timer| timer.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                this.timed_out = true;
                let message = format!(
                    "the request body sent nothing for {} s (--body-idle-timeout-secs)",
                    timeout.as_secs()
                );
                Poll::Ready(Some(Err(
                    io::Error::new(io::ErrorKind::TimedOut, message).into()
                )))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.timed_out || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_times_out_and_a_moving_one_does_not() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, io::Error>>(4);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut body = IdleTimeoutBody::new(StreamBody::new(stream), Some(Duration::from_secs(10)));
        // Frames 9 s apart: 36 s in total, never 10 s idle.
        for _ in 0..4 {
            let tx = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(9)).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).await;
            });
            let frame = body.frame().await.expect("a frame").expect("not an error");
            assert!(frame.is_data());
        }
        let err = body
            .frame()
            .await
            .expect("an error")
            .expect_err("timed out");
        let err = err.downcast::<io::Error>().expect("an io::Error");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(body.frame().await.is_none(), "nothing after the timeout");
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_timeout_a_body_may_wait_forever() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, io::Error>>(1);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut body = IdleTimeoutBody::new(StreamBody::new(stream), None);
        let waited = tokio::time::timeout(Duration::from_secs(3600), body.frame()).await;
        assert!(waited.is_err(), "still waiting after an hour");
        drop(tx);
    }
}
