//! The request/response between the `trellis-cni` shim and the agent: one JSON document
//! each way over a unix stream socket; the shim half-closes after its request.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Where the shim looks when its conf names no `socket`.
pub const DEFAULT_SOCKET: &str = "/run/trellis/cni.sock";

/// The largest CNI stdin accepted (a conf with a prevResult is a few KiB).
pub const MAX_STDIN: usize = 1 << 20;

/// The largest request on the wire: stdin plus the environment.
pub const MAX_REQUEST: usize = MAX_STDIN + (64 << 10);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Request {
    /// The CNI_* variables the runtime set.
    pub env: BTreeMap<String, String>,
    /// The network configuration as the runtime gave it.
    pub stdin: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Response {
    /// Whether the shim exits 0; when false `stdout` is CNI error JSON.
    pub ok: bool,
    pub stdout: String,
}

/// Sends one request and waits for the answer.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> std::io::Result<Response> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(&serde_json::to_vec(req)?)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    Ok(serde_json::from_slice(&buf)?)
}
