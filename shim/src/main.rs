//! `trellis-cni`: the CNI plugin the runtime execs. It answers VERSION itself and hands
//! every other call to the trellis agent over its unix socket, printing the answer.
//! Kept small on purpose: no async runtime, no Kubernetes client.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use trellis_cni::{CniError, ErrorCode};
use trellis_shim::wire::{self, Request, DEFAULT_SOCKET, MAX_STDIN};

/// Longer than any sane delegate timeout; the runtime has its own deadline anyway.
const AGENT_TIMEOUT: Duration = Duration::from_secs(300);

fn main() -> ExitCode {
    let (ok, out) = match run() {
        Ok(resp) => (resp.ok, resp.stdout),
        Err(e) => (false, e.to_json()),
    };
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.write_all(b"\n");
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run() -> Result<wire::Response, CniError> {
    let mut stdin = Vec::new();
    std::io::stdin()
        .take(MAX_STDIN as u64 + 1)
        .read_to_end(&mut stdin)
        .map_err(|e| CniError::new(ErrorCode::Io, format!("cannot read stdin: {e}")))?;
    if stdin.len() > MAX_STDIN {
        return Err(CniError::new(
            ErrorCode::Decode,
            format!("network configuration on stdin is larger than {MAX_STDIN} bytes"),
        ));
    }
    let stdin = String::from_utf8(stdin).map_err(|_| {
        CniError::new(
            ErrorCode::Decode,
            "network configuration on stdin is not UTF-8",
        )
    })?;
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let conf: Option<serde_json::Value> = serde_json::from_str(&stdin).ok();
    if conf.is_none() && command != "VERSION" {
        // Without a conf there is no socket to ask.
        return Err(CniError::new(
            ErrorCode::Decode,
            "network configuration on stdin is not valid JSON",
        ));
    }
    let requested = conf
        .as_ref()
        .and_then(|c| c.get("cniVersion"))
        .and_then(|v| v.as_str())
        .map(str::to_string);
    if command == "VERSION" {
        return Ok(wire::Response {
            ok: true,
            stdout: trellis_cni::version::version_info(requested.as_deref()).to_string(),
        });
    }
    let socket: PathBuf = conf
        .as_ref()
        .and_then(|c| c.get("socket"))
        .and_then(|v| v.as_str())
        .unwrap_or(DEFAULT_SOCKET)
        .into();
    let env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("CNI_"))
        .collect();
    let req = Request { env, stdin };
    wire::call(&socket, &req, AGENT_TIMEOUT).map_err(|e| {
        CniError::new(
            ErrorCode::TryAgainLater,
            format!("trellis agent not reachable at {}: {e}", socket.display()),
        )
        .with_version(requested.as_deref().unwrap_or(""))
    })
}
