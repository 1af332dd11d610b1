//! gRPC over unix sockets, both ways: kubelet's sockets and ours.

use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use tonic::transport::{Channel, Endpoint};

/// A channel to the gRPC server on `socket`. Connects lazily on first use, so an
/// absent socket shows up as the call's error.
pub async fn channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket: PathBuf = socket.to_path_buf();
    // The URI is required by tonic and ignored by the connector.
    Endpoint::try_from("http://[::1]:0")?
        .connect_with_connector(tower::service_fn(move |_| {
            let s = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(s).await?))
            }
        }))
        .await
}

/// Binds `socket` afresh (a stale file from an earlier run is removed).
pub fn bind(socket: &Path) -> std::io::Result<tokio_stream::wrappers::UnixListenerStream> {
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = tokio::net::UnixListener::bind(socket)?;
    Ok(tokio_stream::wrappers::UnixListenerStream::new(l))
}
