//! The rows' ceilings: the most an HTTP server could show in a row with the benchmark's
//! own client on this machine. A bare HTTP/1.1 server inside the harness whose only work
//! per request is the floor's, inline on its runtime's threads (the daemon's shape: one
//! worker per core). It checks nothing: it is not a daemon, it is a bound.
//!
//! Row 2's work ([`BareServer::start`]): create the file, write it, `fsetxattr` per
//! `X-Metadata-*` header, close, and answer `200 []`. [`Publish`] says how it makes the
//! file appear: in place as the floor does, or atomically (readers never see a partial
//! file), which the daemon must do, through a temp name and `rename` or through an unnamed
//! file (`O_TMPFILE`) and `linkat`. Row 6's work is in `bare_start`.

use std::convert::Infallible;
use std::fs::File;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use xattr::FileExt;

/// How the bare server makes a file appear under its name.
#[derive(Debug, Clone, Copy)]
pub enum Publish {
    /// Created under its name and written there, as the floor does.
    InPlace,
    /// Written under a hidden temp name, then renamed over its name.
    Rename,
    /// Written as an unnamed file in its directory, then linked in under its name.
    Link,
}

/// The running server; stopped when dropped.
pub struct BareServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BareServer {
    /// Row 2's server: stores each request's body as the floor does, published as
    /// `publish` says.
    ///
    /// # Errors
    /// When the runtime cannot be built or the port bound.
    pub fn start(publish: Publish) -> anyhow::Result<BareServer> {
        BareServer::serve(move |request| answer(request, publish))
    }

    /// Binds a loopback port and answers every request with `answer`, on a runtime and a
    /// thread of its own.
    ///
    /// # Errors
    /// When the runtime cannot be built or the port bound.
    pub fn serve<F, R, B>(answer: F) -> anyhow::Result<BareServer>
    where
        F: Fn(Request<Incoming>) -> R + Clone + Send + Sync + 'static,
        R: Future<Output = Response<B>> + Send + 'static,
        B: hyper::body::Body<Data = Bytes, Error = Infallible> + Send + 'static,
    {
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
                    () = accept(listener, answer) => {}
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

async fn accept<F, R, B>(listener: tokio::net::TcpListener, answer: F)
where
    F: Fn(Request<Incoming>) -> R + Clone + Send + Sync + 'static,
    R: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes, Error = Infallible> + Send + 'static,
{
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let answer = answer.clone();
                async move { Ok::<_, Infallible>(answer(request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(request: Request<Incoming>, publish: Publish) -> Response<Full<Bytes>> {
    match store(request, publish).await {
        Ok(()) => Response::new(Full::new(Bytes::from_static(b"[]"))),
        Err(err) => {
            let mut response = Response::new(Full::new(Bytes::from(err.to_string())));
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            response
        }
    }
}

/// The floor's syscalls for one request's file, published as `publish` says.
async fn store(request: Request<Incoming>, publish: Publish) -> anyhow::Result<()> {
    let (parts, body) = request.into_parts();
    let path = form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
        .find(|(key, _)| key == "path")
        .map(|(_, value)| PathBuf::from(value.into_owned()))
        .context("no path")?;
    let content = body.collect().await?.to_bytes();
    let dir = path.parent().context("no directory")?;
    let temp = dir.join(format!(
        ".{}.bare",
        path.file_name().context("no name")?.to_string_lossy()
    ));
    let mut file = match publish {
        Publish::InPlace => File::create(&path)?,
        Publish::Rename => File::options().write(true).create_new(true).open(&temp)?,
        Publish::Link => File::options()
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)?,
    };
    file.write_all(&content)?;
    for (name, value) in &parts.headers {
        if let Some(key) = name.as_str().strip_prefix("x-metadata-") {
            file.set_xattr(format!("user.e2b.{key}"), value.as_bytes())?;
        }
    }
    match publish {
        Publish::InPlace => {}
        Publish::Rename => std::fs::rename(&temp, &path)?,
        Publish::Link => {
            let unnamed = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
            nix::unistd::linkat(
                nix::fcntl::AT_FDCWD,
                &unnamed,
                nix::fcntl::AT_FDCWD,
                &path,
                nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
            )?;
        }
    }
    Ok(())
}
