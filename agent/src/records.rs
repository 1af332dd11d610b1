//! Per-container attachment records in the state dir: what was attached, with which
//! config and result, so DEL, CHECK and GC work after an agent restart.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("attachment record {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attachment record {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
}

/// One network attached to a container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    /// `namespace/name` of the NAD, or the default network's conf name.
    pub network: String,
    pub ifname: String,
    /// The cluster default network (the runtime's CNI_IFNAME).
    #[serde(default)]
    pub cluster_default: bool,
    /// The delegate conflist exactly as run.
    pub conf: Value,
    #[serde(default)]
    pub runtime_config: Map<String, Value>,
    /// The delegate's result; `None` while its ADD has not finished.
    #[serde(default)]
    pub result: Option<Value>,
    /// Gateways the pod's default route goes through on this interface.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default_route: Vec<std::net::IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub container_id: String,
    pub netns: String,
    /// The runtime's CNI_IFNAME (the cluster network's interface).
    pub ifname: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub cni_args: String,
    pub attachments: Vec<Attachment>,
    /// The network-status annotation value, once ADD finished.
    #[serde(default)]
    pub network_status: Option<Value>,
}

/// Records as JSON files, one per container, replaced atomically.
#[derive(Debug, Clone)]
pub struct RecordStore {
    dir: PathBuf,
}

impl RecordStore {
    pub fn open(state_dir: &Path) -> Result<RecordStore, RecordError> {
        let dir = state_dir.join("containers");
        std::fs::create_dir_all(&dir).map_err(|source| RecordError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(RecordStore { dir })
    }

    fn path(&self, container_id: &str) -> PathBuf {
        // Container IDs are validated (alphanumerics, '_', '.', '-', not leading '.').
        self.dir.join(format!("{container_id}.json"))
    }

    pub fn load(&self, container_id: &str) -> Result<Option<Record>, RecordError> {
        let path = self.path(container_id);
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| RecordError::Corrupt {
                        path,
                        message: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RecordError::Io { path, source }),
        }
    }

    pub fn save(&self, record: &Record) -> Result<(), RecordError> {
        let path = self.path(&record.container_id);
        let tmp = self.dir.join(format!(".{}.tmp", record.container_id));
        let io = |source| RecordError::Io {
            path: path.clone(),
            source,
        };
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(record).expect("record serialises"),
        )
        .map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }

    pub fn remove(&self, container_id: &str) -> Result<(), RecordError> {
        let path = self.path(container_id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(RecordError::Io { path, source: e })
            }
            _ => Ok(()),
        }
    }

    /// Every record; corrupt files are returned as errors beside the good ones.
    pub fn list(&self) -> Result<(Vec<Record>, Vec<RecordError>), RecordError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| RecordError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let mut records = Vec::new();
        let mut errors = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name
                .strip_suffix(".json")
                .filter(|_| !name.starts_with('.'))
            else {
                continue;
            };
            match self.load(id) {
                Ok(Some(r)) => records.push(r),
                Ok(None) => {}
                Err(err) => errors.push(err),
            }
        }
        records.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        Ok((records, errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_list_remove() {
        let d = tempfile::tempdir().unwrap();
        let s = RecordStore::open(d.path()).unwrap();
        let r = Record {
            container_id: "c1".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            pod_namespace: "p".into(),
            pod_name: "n".into(),
            pod_uid: "u".into(),
            cni_args: String::new(),
            attachments: vec![],
            network_status: None,
        };
        assert!(s.load("c1").unwrap().is_none());
        s.save(&r).unwrap();
        assert_eq!(s.load("c1").unwrap().unwrap(), r);
        std::fs::write(d.path().join("containers/bad.json"), "{").unwrap();
        let (good, bad) = s.list().unwrap();
        assert_eq!(good.len(), 1);
        assert_eq!(bad.len(), 1);
        s.remove("c1").unwrap();
        s.remove("c1").unwrap();
        assert!(s.load("c1").unwrap().is_none());
    }
}
