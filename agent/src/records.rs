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
    /// The device (PCI address or vhost-user socket) from the network's resource
    /// pool, as given to the delegate in `deviceID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The dataplane slot of its pod interface, once the programs are attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
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

/// Records as files, one per container. Each file is a journal of JSON snapshots, one
/// per line, newest last: a save appends a line (creating an inode per save costs ten
/// times more than an append on ext4, and ADD saves before every delegate), and a
/// torn last line (power loss mid-write) leaves the snapshot before it in force. A
/// file that has grown past `COMPACT_AT` is rewritten with only the newest snapshot.
#[derive(Debug, Clone)]
pub struct RecordStore {
    dir: PathBuf,
}

const COMPACT_AT: u64 = 256 << 10;

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

    /// The newest complete snapshot. A file with none (created, then the agent died
    /// before the first write finished) holds no attachments.
    pub fn load(&self, container_id: &str) -> Result<Option<Record>, RecordError> {
        let path = self.path(container_id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(RecordError::Io { path, source }),
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        let mut last_err = None;
        for line in bytes.split(|b| *b == b'\n').rev() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice(line) {
                Ok(r) => return Ok(Some(r)),
                Err(e) => {
                    last_err.get_or_insert(e);
                }
            }
        }
        Err(RecordError::Corrupt {
            path,
            message: last_err.map(|e| e.to_string()).unwrap_or_default(),
        })
    }

    pub fn save(&self, record: &Record) -> Result<(), RecordError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path(&record.container_id);
        let io = |source| RecordError::Io {
            path: path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(record).expect("record serialises");
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        if f.metadata().map_err(io)?.len() < COMPACT_AT {
            // One write(2): a process killed mid-save never leaves half a line.
            return f.write_all(&line).map_err(io);
        }
        drop(f);
        let tmp = self.dir.join(format!(".{}.tmp", record.container_id));
        std::fs::write(&tmp, &line).map_err(io)?;
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
        // Newer snapshots win; a torn last line leaves the one before in force.
        let mut r2 = r.clone();
        r2.pod_name = "n2".into();
        s.save(&r2).unwrap();
        assert_eq!(s.load("c1").unwrap().unwrap(), r2);
        let p = d.path().join("containers/c1.json");
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.extend_from_slice(b"{\"container_id\":\"c1\",\"net");
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(s.load("c1").unwrap().unwrap(), r2);
        // A file with no snapshot at all holds nothing.
        std::fs::write(d.path().join("containers/empty.json"), "").unwrap();
        assert!(s.load("empty").unwrap().is_none());
        std::fs::write(d.path().join("containers/bad.json"), "{").unwrap();
        let (good, bad) = s.list().unwrap();
        assert_eq!(good, [r2.clone()]);
        assert_eq!(bad.len(), 1);
        s.remove("c1").unwrap();
        s.remove("c1").unwrap();
        assert!(s.load("c1").unwrap().is_none());
    }

    #[test]
    fn a_long_journal_is_compacted() {
        let d = tempfile::tempdir().unwrap();
        let s = RecordStore::open(d.path()).unwrap();
        let mut r = Record {
            container_id: "big".into(),
            netns: String::new(),
            ifname: "eth0".into(),
            pod_namespace: String::new(),
            pod_name: String::new(),
            pod_uid: String::new(),
            cni_args: "x".repeat(100 << 10),
            attachments: vec![],
            network_status: None,
        };
        let p = d.path().join("containers/big.json");
        let mut sizes = Vec::new();
        for i in 0..4 {
            r.pod_name = format!("n{i}");
            s.save(&r).unwrap();
            sizes.push(std::fs::metadata(&p).unwrap().len());
        }
        // 1, 2, 3 snapshots, then past 256 KiB: back to 1.
        assert!(sizes[2] > sizes[1] && sizes[1] > sizes[0], "{sizes:?}");
        assert_eq!(sizes[3], sizes[0], "{sizes:?}");
        assert_eq!(s.load("big").unwrap().unwrap().pod_name, "n3");
    }
}
