//! The unix socket the shim talks to: one request per connection. Connections are
//! tasks on the agent's runtime (an idle one costs no thread), each must deliver its
//! request within a deadline, and requests run on a fixed pool of worker threads, so
//! no number of clients can pin the agent's threads or memory.

use crate::verbs::Handler;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_cni::{CniError, ErrorCode};
use trellis_shim::wire::{Request, Response, MAX_REQUEST};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("socket {path}: {source}")]
    Socket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("socket {0} is in use by a running agent")]
    InUse(String),
}

/// Connections held at once (each a task and a socket); more wait in the backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// Requests handled at once: the worker threads (each may wait on a delegate).
pub const WORKERS: usize = 32;
/// A client must have sent its whole request (and half-closed) within this.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// And must take the answer within this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the socket: root-only (0600, in a 0700 directory it creates); a stale socket
/// from a dead agent is replaced, a live one is not.
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, ServerError> {
    let err = |source| ServerError::Socket {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        }
    }
    if path.exists() {
        if StdUnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let l = std::os::unix::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

/// A request, when it arrived, and where its answer goes.
type Job = (Request, u64, tokio::sync::oneshot::Sender<Response>);

/// The worker threads; a request waits in the queue for one.
fn start_workers(
    handler: Arc<Handler>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
) -> std::sync::mpsc::Sender<Job> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..WORKERS {
        let (rx, h, stopping) = (rx.clone(), handler.clone(), stopping.clone());
        std::thread::Builder::new()
            .name(format!("trellis-cni-{i}"))
            .spawn(move || loop {
                let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok((req, received, answer)) = job else {
                    return;
                };
                // A stopping agent starts nothing new: the runtime tries again with
                // the next agent.
                if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    let _ = answer.send(error_response(
                        ErrorCode::TryAgainLater,
                        "the trellis agent is stopping; try again".into(),
                    ));
                    continue;
                }
                let _ = answer.send(h.handle_received(&req, received));
            })
            .expect("worker thread");
    }
    tx
}

/// How long a stopping agent lets requests in flight finish (a pod's ADD may wait on
/// delegates; the DaemonSet's grace period is longer than this). Once stopping,
/// requests not yet started are answered "try again" (11); a delegate still running
/// past it is left to the next agent, whose DEL of the unfinished record undoes it.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves the shim until `shutdown` completes; then takes no new connection and
/// waits (at most DRAIN_TIMEOUT) for the requests in flight to be answered.
pub async fn serve(
    listener: std::os::unix::net::UnixListener,
    handler: Arc<Handler>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("agent socket: {e}");
            return;
        }
    };
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    handler
        .serving
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let serving = handler.clone();
    let jobs = start_workers(handler, stopping.clone());
    if let Ok(addr) = listener.local_addr() {
        if let Some(path) = addr.as_pathname() {
            tracing::info!(socket = %path.display(), "trellis agent ready");
        }
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = accept(&listener, &slots) => a,
        };
        let Some((stream, permit)) = accepted else {
            continue;
        };
        let jobs = jobs.clone();
        tokio::spawn(async move {
            serve_one(stream, jobs).await;
            drop(permit);
        });
    }
    drop(listener);
    stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    serving
        .serving
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let busy = MAX_CONNECTIONS - slots.available_permits();
    if busy > 0 {
        tracing::info!(
            connections = busy,
            "stopping: letting requests in flight finish"
        );
    }
    let all = slots.acquire_many(MAX_CONNECTIONS as u32);
    if tokio::time::timeout(DRAIN_TIMEOUT, all).await.is_err() {
        tracing::warn!(
            "stopping with requests still in flight after {DRAIN_TIMEOUT:?} (their records let the next agent finish them)"
        );
    }
}

/// One connection, once a slot for it is free.
async fn accept(
    listener: &tokio::net::UnixListener,
    slots: &Arc<tokio::sync::Semaphore>,
) -> Option<(tokio::net::UnixStream, tokio::sync::OwnedSemaphorePermit)> {
    let permit = slots.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((s, _)) => Some((s, permit)),
        Err(e) => {
            tracing::warn!("accept: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

async fn serve_one(mut stream: tokio::net::UnixStream, jobs: std::sync::mpsc::Sender<Job>) {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        READ_TIMEOUT,
        (&mut stream)
            .take(MAX_REQUEST as u64 + 1)
            .read_to_end(&mut buf),
    )
    .await;
    let resp = match read {
        Err(_) => {
            tracing::warn!(
                "agent socket: a client sent no whole request within {} s; closed",
                READ_TIMEOUT.as_secs()
            );
            return;
        }
        Ok(Err(e)) => error_response(ErrorCode::Io, format!("cannot read request: {e}")),
        Ok(Ok(_)) if buf.len() > MAX_REQUEST => error_response(
            ErrorCode::Decode,
            format!("request is larger than {MAX_REQUEST} bytes"),
        ),
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&buf) {
            Ok(req) => {
                drop(buf);
                let (tx, rx) = tokio::sync::oneshot::channel();
                if jobs.send((req, crate::records::now_ms(), tx)).is_err() {
                    return;
                }
                match rx.await {
                    Ok(r) => r,
                    Err(_) => error_response(ErrorCode::Io, "the request's worker died".into()),
                }
            }
            Err(e) => error_response(
                ErrorCode::Decode,
                format!("malformed request from shim: {e}"),
            ),
        },
    };
    let bytes = serde_json::to_vec(&resp).expect("response serialises");
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&bytes)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("cannot answer shim: {e}"),
        Err(_) => tracing::warn!("cannot answer shim: it did not read the answer"),
    }
}

fn error_response(code: ErrorCode, msg: String) -> Response {
    Response {
        ok: false,
        stdout: CniError::new(code, msg).to_json(),
    }
}
