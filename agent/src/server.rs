//! The unix socket the shim talks to: one request per connection, a thread each.

use crate::handler::Handler;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use trellis_cni::wire::{Request, Response, MAX_REQUEST};
use trellis_cni::{CniError, ErrorCode};

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

/// Binds the socket: root-only (0600, in a 0700 directory it creates); a stale socket
/// from a dead agent is replaced, a live one is not.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
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
        if UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let l = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(l)
}

pub fn serve(listener: UnixListener, handler: Arc<Handler>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let h = handler.clone();
                std::thread::spawn(move || serve_one(stream, &h));
            }
            Err(e) => tracing::warn!("accept: {e}"),
        }
    }
}

fn serve_one(mut stream: UnixStream, handler: &Handler) {
    let mut buf = Vec::new();
    let read = (&mut stream)
        .take(MAX_REQUEST as u64 + 1)
        .read_to_end(&mut buf);
    let resp = match read {
        Err(e) => error_response(ErrorCode::Io, format!("cannot read request: {e}")),
        Ok(_) if buf.len() > MAX_REQUEST => error_response(
            ErrorCode::Decode,
            format!("request is larger than {MAX_REQUEST} bytes"),
        ),
        Ok(_) => match serde_json::from_slice::<Request>(&buf) {
            Ok(req) => handler.handle(&req),
            Err(e) => error_response(
                ErrorCode::Decode,
                format!("malformed request from shim: {e}"),
            ),
        },
    };
    let bytes = serde_json::to_vec(&resp).expect("response serialises");
    if let Err(e) = stream.write_all(&bytes) {
        tracing::warn!("cannot answer shim: {e}");
    }
}

fn error_response(code: ErrorCode, msg: String) -> Response {
    Response {
        ok: false,
        stdout: CniError::new(code, msg).to_json(),
    }
}
