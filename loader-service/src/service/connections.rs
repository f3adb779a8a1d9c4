//! Connection limits: at most `max_connections` open at once (one more is closed as soon as it
//! is accepted, which its client sees as UNAVAILABLE), and a connection from which nothing
//! arrives for `connection_idle_timeout_s` closed. A live HTTP/2 client answers the server's
//! keep-alive pings, so the idle timeout only ends sockets that never speak (or stopped
//! speaking) HTTP/2: without it each would hold one of the `max_connections` places forever.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// What the accept loop enforces.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConnectionLimits {
    pub(super) max_connections: usize,
    pub(super) idle_timeout: Duration,
}

/// The connections `listener` accepts within `limits`. Accept errors (out of file descriptors,
/// a client that reset during the handshake) are logged and the loop goes on: an error from
/// this stream would end the server.
pub(super) fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
) -> impl Stream<Item = io::Result<Limited>> {
    let open = Arc::new(AtomicUsize::new(0));
    futures::stream::unfold((listener, open), move |(listener, open)| async move {
        loop {
            let (socket, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let slot = Slot::take(&open, limits.max_connections);
            let Some(slot) = slot else {
                tracing::warn!(
                    %peer,
                    max_connections = limits.max_connections,
                    "connection refused: max_connections reached"
                );
                metrics::counter!("atmorep_refused_total", "limit" => "max_connections")
                    .increment(1);
                drop(socket);
                continue;
            };
            let limited = Limited {
                inner: socket,
                idle_timeout: limits.idle_timeout,
                deadline: Box::pin(tokio::time::sleep(limits.idle_timeout)),
                _slot: slot,
            };
            return Some((Ok(limited), (listener, open)));
        }
    })
}

/// One of the `max_connections` places, given back when its connection is dropped.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|n| {
            metrics::gauge!("atmorep_connections_open").set((n + 1) as f64);
            Self(open.clone())
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let left = self.0.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!("atmorep_connections_open").set(left as f64);
    }
}

/// A TCP connection that counts against `max_connections` and fails its reads once nothing has
/// arrived for the idle timeout (hyper then closes it).
#[derive(Debug)]
pub(super) struct Limited {
    inner: TcpStream,
    idle_timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    _slot: Slot,
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + self.idle_timeout;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    metrics::counter!("atmorep_connections_idle_closed_total").increment(1);
                    tracing::info!(
                        peer = ?self.inner.peer_addr().ok(),
                        "connection closed: nothing arrived for connection_idle_timeout_s = {}",
                        self.idle_timeout.as_secs()
                    );
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "connection idle timeout",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
            failed => failed,
        }
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for Limited {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
