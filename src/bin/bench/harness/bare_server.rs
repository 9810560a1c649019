//! Row 2's ceiling: the most any HTTP server could show in that row with the benchmark's own
//! client on this machine. A bare HTTP/1.1 server inside the harness whose only work per
//! request is the floor's (create the file, write it, `fsetxattr` per `X-Metadata-*`
//! header, close), answering `200 []`. It checks nothing and writes in place (no temp file,
//! no rename, no ownership), inline on its runtime's threads: it is not a daemon, it is a
//! bound. Its runtime has the daemon's shape (one worker per core).

use std::convert::Infallible;
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use xattr::FileExt;

/// The running server; stopped when dropped.
pub struct BareServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BareServer {
    /// Binds a loopback port and serves on a thread of its own.
    ///
    /// # Errors
    /// When the runtime cannot be built or the port bound.
    pub fn start() -> anyhow::Result<BareServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                tokio::select! {
                    () = accept(listener) => {}
                    _ = stopped => {}
                }
            });
        });
        Ok(BareServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// A URL of the server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for BareServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept(listener: tokio::net::TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|request| async {
                Ok::<_, Infallible>(answer(request).await)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(request: Request<Incoming>) -> Response<Full<Bytes>> {
    match store(request).await {
        Ok(()) => Response::new(Full::new(Bytes::from_static(b"[]"))),
        Err(err) => {
            let mut response = Response::new(Full::new(Bytes::from(err.to_string())));
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            response
        }
    }
}

/// The floor's syscalls for one request's file.
async fn store(request: Request<Incoming>) -> anyhow::Result<()> {
    let (parts, body) = request.into_parts();
    let path = form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
        .find(|(key, _)| key == "path")
        .map(|(_, value)| value.into_owned())
        .context("no path")?;
    let content = body.collect().await?.to_bytes();
    let mut file = File::create(&path)?;
    file.write_all(&content)?;
    for (name, value) in &parts.headers {
        if let Some(key) = name.as_str().strip_prefix("x-metadata-") {
            file.set_xattr(format!("user.e2b.{key}"), value.as_bytes())?;
        }
    }
    Ok(())
}
