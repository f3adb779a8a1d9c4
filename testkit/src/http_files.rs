//! A plain HTTP file server on 127.0.0.1:0 — what a public bucket looks like to an anonymous
//! reader (`https://storage.googleapis.com/BUCKET/PATH`): GET and HEAD of the files under a
//! folder, byte ranges, 404 for anything else, no listing. It logs every request path, so a
//! test can tell which URLs a reader asked for, and counts the body bytes it sent.

use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

/// A running file server; dropping it stops it.
#[derive(Debug)]
pub struct HttpFileServer {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    served: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpFileServer {
    /// Serves the files under `root` at `http://127.0.0.1:PORT/RELATIVE/PATH`.
    pub fn start(root: &Path) -> io::Result<Self> {
        let root = Arc::new(root.canonicalize()?);
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("http-file-server")
            .enable_all()
            .build()?;
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let served = log.clone();
        let thread = std::thread::Builder::new()
            .name(format!("http-file-server-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    loop {
                        let socket = tokio::select! {
                            accepted = listener.accept() => match accepted {
                                Ok((socket, _)) => socket,
                                Err(_) => continue,
                            },
                            _ = &mut stop_rx => break,
                        };
                        let (root, log) = (root.clone(), served.clone());
                        let counter = counter.clone();
                        let service = service_fn(move |req| {
                            let (root, log) = (root.clone(), log.clone());
                            let counter = counter.clone();
                            async move { Ok::<_, Infallible>(answer(&root, &log, &counter, &req)) }
                        });
                        tokio::spawn(async move {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(socket), service)
                                .await;
                        });
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(Self {
            addr,
            log,
            served: sent,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The paths asked for so far, in order (`/bucket/store.zarr/.zmetadata`).
    pub fn requests(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl HttpFileServer {
    /// Body bytes sent so far (whole files and ranges), headers not counted.
    pub fn served_bytes(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for HttpFileServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = code;
    response
}

fn answer(
    root: &Path,
    log: &Mutex<Vec<String>>,
    served: &AtomicU64,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    log.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(path.clone());
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let relative = path.trim_start_matches('/');
    if relative.split('/').any(|part| part == "..") {
        return status(StatusCode::NOT_FOUND);
    }
    let file: PathBuf = root.join(relative);
    let Ok(bytes) = std::fs::read(&file) else {
        return status(StatusCode::NOT_FOUND);
    };
    let len = bytes.len();
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|r| r.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| match (a, b) {
            ("", n) => n
                .parse::<usize>()
                .ok()
                .map(|n| (len.saturating_sub(n), len)),
            (a, "") => a.parse::<usize>().ok().map(|a| (a, len)),
            (a, b) => Some((a.parse().ok()?, b.parse::<usize>().ok()? + 1)),
        });
    let (code, body, content_range) = match range {
        Some((start, end)) if start < len && start < end => {
            let end = end.min(len);
            (
                StatusCode::PARTIAL_CONTENT,
                bytes[start..end].to_vec(),
                Some(format!("bytes {start}-{}/{len}", end - 1)),
            )
        }
        Some(_) => return status(StatusCode::RANGE_NOT_SATISFIABLE),
        None => (StatusCode::OK, bytes, None),
    };
    let body_len = body.len();
    let body = if req.method() == Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from(body)
    };
    served.fetch_add(body.len() as u64, Ordering::Relaxed);
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = code;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, body_len.into());
    headers.insert(
        header::ACCEPT_RANGES,
        "bytes".parse().expect("valid header"),
    );
    if let Some(range) = content_range {
        headers.insert(header::CONTENT_RANGE, range.parse().expect("valid header"));
    }
    response
}
