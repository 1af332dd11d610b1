//! The `vhostuser` network type, run in-process: a DPDK vhost-user socket from a
//! resource pool (its `deviceID` is the socket's host path) handed to the pod. Nothing
//! moves: the device plugin has mounted the socket's directory into the pod; the result
//! carries `socketPath` and network-status the vhost-user device-info, so the pod's
//! DPDK app (virtio_user) finds it. IPAM, when configured, is run and reported for the
//! app to use.

use serde_json::{Map, Value};
use std::path::Path;
use trellis_cni::result::{Interface, IpConfig};
use trellis_cni::{CniError, CniResult, Command, ErrorCode};
use trellis_delegate::{InProcessPlugins, InvokeError, Invoker, Target};

pub const TYPE: &str = "vhostuser";

/// Keys of its own, besides the CNI ones every conf may have.
const VHOST_KEYS: &[&str] = &["deviceID", "containerSocketDir"];

#[derive(Debug)]
pub struct VhostUserPlugin {
    ipam: Invoker,
}

/// How an ADD failed: cleanly, or leaving an IPAM address a DEL must release.
enum Failed {
    Clean(CniError),
    Unfinished(CniError),
}

fn conf_err(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidNetworkConfig, msg)
}

impl VhostUserPlugin {
    pub fn new(ipam: Invoker) -> VhostUserPlugin {
        VhostUserPlugin {
            ipam: Invoker {
                in_process: None,
                ..ipam
            },
        }
    }

    fn ipam(
        &self,
        raw: &Map<String, Value>,
        cmd: Command,
        target: &Target,
    ) -> Result<Option<CniResult>, CniError> {
        crate::kinds::ipam(&self.ipam, raw, cmd, target)
    }

    fn add(&self, target: &Target, raw: &Map<String, Value>) -> Result<Value, Failed> {
        let known = |k: &str| crate::kinds::CNI_CONF_KEYS.contains(&k) || VHOST_KEYS.contains(&k);
        if let Some(k) = raw.keys().find(|k| !known(k)) {
            return Err(Failed::Clean(conf_err(format!(
                "{k}: unknown field for type vhostuser"
            ))));
        }
        let socket = raw
            .get("deviceID")
            .and_then(Value::as_str)
            .ok_or_else(|| Failed::Clean(conf_err("deviceID: missing (give the NAD a k8s.v1.cni.cncf.io/resourceName of a vhostUser pool)")))?;
        let meta = std::fs::symlink_metadata(socket).map_err(|e| {
            Failed::Clean(conf_err(format!(
                "deviceID: vhost-user socket {socket}: {e}"
            )))
        })?;
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            return Err(Failed::Clean(conf_err(format!(
                "deviceID: {socket} is not a socket"
            ))));
        }
        let version = raw
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("1.1.0")
            .to_string();
        let mut result = CniResult {
            cni_version: version.clone(),
            interfaces: vec![Interface {
                name: target.ifname.to_string(),
                sandbox: Some(target.netns.to_string()),
                socket_path: Some(socket.to_string()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let ipam = match crate::kinds::ipam_add(&self.ipam, raw, target) {
            Ok(ipam) => ipam,
            // It reported its failure: it holds nothing.
            Err(f) if !f.owes_del => return Err(Failed::Clean(f.error)),
            Err(f) => return Err(self.release(raw, target, f.error)),
        };
        let added = {
            if let Some(ipam) = ipam {
                result.ips = ipam
                    .ips
                    .into_iter()
                    .map(|ip| IpConfig {
                        interface: Some(0),
                        ..ip
                    })
                    .collect();
                result.routes = ipam.routes;
                result.dns = ipam.dns;
            }
            result
                .to_value(&version)
                .map_err(|e| CniError::new(ErrorCode::Io, format!("result: {e}")))
        };
        added.map_err(|e| self.release(raw, target, e))
    }

    /// After `e`, IPAM may hold an address: its DEL now, or owed by the caller.
    fn release(&self, raw: &Map<String, Value>, target: &Target, e: CniError) -> Failed {
        match self.ipam(raw, Command::Del, target) {
            Ok(_) => Failed::Clean(e),
            Err(d) => Failed::Unfinished(
                e.with_details(format!("releasing the IPAM address also failed: {}", d.msg)),
            ),
        }
    }
}

/// Where the pod sees `socket`: the NAD's `containerSocketDir` (default the device
/// plugin's default mount path) and the socket's name.
pub fn container_path(conf: &Value, socket: &str) -> String {
    let dir = conf
        .get("containerSocketDir")
        .and_then(Value::as_str)
        .unwrap_or(trellis_device_plugin::config::DEFAULT_VHOST_MOUNT);
    let name = Path::new(socket)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{}/{name}", dir.trim_end_matches('/'))
}

impl InProcessPlugins for VhostUserPlugin {
    fn handles(&self, plugin: &str) -> bool {
        plugin == TYPE
    }

    fn exec(
        &self,
        plugin: &str,
        command: Command,
        target: &Target,
        stdin: &[u8],
    ) -> Result<Vec<u8>, InvokeError> {
        let fail = |error: CniError| crate::kinds::plugin_error(plugin, command, error);
        let raw: Map<String, Value> = serde_json::from_slice(stdin)
            .map_err(|e| fail(CniError::new(ErrorCode::Decode, format!("config: {e}"))))?;
        match command {
            Command::Add => match self.add(target, &raw) {
                Ok(v) => Ok(v.to_string().into_bytes()),
                Err(Failed::Clean(e)) => Err(fail(e)),
                Err(Failed::Unfinished(error)) => Err(InvokeError::Unfinished {
                    plugin: plugin.to_string(),
                    command: command.as_str(),
                    error: Box::new(error),
                }),
            },
            Command::Del => {
                self.ipam(&raw, Command::Del, target).map_err(fail)?;
                Ok(Vec::new())
            }
            _ => Ok(Vec::new()),
        }
    }
}
