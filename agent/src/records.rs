//! Per-container attachment records in the state dir: what was attached, with which
//! config and result, so DEL, CHECK and GC work after an agent restart.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
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

impl RecordError {
    /// The container whose record this is about.
    pub fn container(&self) -> Option<String> {
        let path = match self {
            RecordError::Io { path, .. } | RecordError::Corrupt { path, .. } => path,
        };
        path.file_name()?
            .to_str()?
            .strip_suffix(".json")
            .map(str::to_string)
    }
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
    /// Bandwidth limits the dataplane keeps (not a chained plugin's).
    #[serde(default, skip_serializing_if = "crate::bandwidth::Limits::is_none")]
    pub bandwidth: crate::bandwidth::Limits,
    /// The logical network it is on (its NAD's `trellis.dev/logical-network`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical: Option<crate::logical::Logical>,
    /// The physical network it attaches to, if logical networks could share it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical: Option<String>,
    /// The pod's selection it was made from, with the interface name as the pod gave
    /// it (empty: named by the agent); None for the cluster network and in records of
    /// agents before hot-plug.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<crate::selection::NetworkSelection>,
    /// When it was added to the running pod (RFC 3339), for an attachment hot-plugged
    /// after the pod's ADD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_at: Option<String>,
    /// The pod's choice (`trellis.dev/network-choice`) this network was chosen by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen: Option<crate::choice::spec::Chosen>,
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
    /// When its ADD finished (ms since the Unix epoch): GC leaves alone a container
    /// added after the runtime made its list of valid attachments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added_at_ms: Option<u64>,
    /// The pod's networks annotation its attachments were last made from (hot-plug
    /// compares the pod's current one against it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<String>,
    /// The pod's `trellis.dev/network-choice` annotation its choices were last made
    /// from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choices: Option<String>,
    /// The pod opted out of networks that change while it runs
    /// (`trellis.dev/dynamic: "false"` at ADD).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub static_networks: bool,
    /// The inode of the pod's netns at ADD: the stale sweep tears a record down only
    /// when its netns path is gone and no process or mount still holds that netns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_inode: Option<u64>,
}

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Records as files, one per container. Each file is a journal of JSON snapshots, one
/// per line, newest last: a save appends a line (creating an inode per save costs ten
/// times more than an append on ext4, and ADD saves before every delegate). A line
/// counts only once its newline is written: an agent killed mid-write leaves an
/// unterminated tail, which is ignored, and the next save starts on a line of its
/// own. Every save is on disk (fdatasync) before it returns, because it is written
/// before the change it describes. A file that has grown past `COMPACT_AT` is
/// rewritten with only the newest snapshot. Files are 0600, the dir 0700.
#[derive(Debug, Clone)]
pub struct RecordStore {
    dir: PathBuf,
    /// What `list` parsed, by container, with the file's (inode, length, mtime) then:
    /// the mover, the choice figures and the sweep list every record each second or
    /// so, and most files have not changed since.
    parsed: std::sync::Arc<std::sync::Mutex<HashMap<String, (FileStamp, Record)>>>,
}

/// A record file's (inode, length, mtime in ns): every save appends to the file or
/// renames a new one over it, so any save changes it.
type FileStamp = (u64, u64, i128);

fn stamp(m: &std::fs::Metadata) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    (
        m.ino(),
        m.len(),
        m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
    )
}

const COMPACT_AT: u64 = 256 << 10;

/// Creates `dir` (and its parents) and makes it 0700: records name every pod on the
/// node and hold its delegates' configs.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Writes `bytes` to `path` whole or not at all: a 0600 temp file, synced, renamed
/// over `path`, and the dir synced so the rename survives a crash.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    // `.<stem>.tmp`: as long as the longest name (a 250-byte container ID + ".json").
    let stem = path
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{stem}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The newest complete snapshot in a journal: lines without their newline are not
/// there yet; a complete line that does not parse is skipped for the one before.
fn newest<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<Option<T>, String> {
    let complete = match bytes.iter().rposition(|b| *b == b'\n') {
        Some(end) => &bytes[..end],
        None => return Ok(None),
    };
    let mut last_err = None;
    for line in complete.split(|b| *b == b'\n').rev() {
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
    match last_err {
        Some(e) => Err(e.to_string()),
        None => Ok(None),
    }
}

impl RecordStore {
    pub fn open(state_dir: &Path) -> Result<RecordStore, RecordError> {
        let dir = state_dir.join("containers");
        let io = |d: &Path| {
            let d = d.to_path_buf();
            move |source| RecordError::Io { path: d, source }
        };
        // The state dir is the admin's choice (it may be shared): made 0700 only if
        // trellis creates it. Its own subdirs are always 0700.
        if !state_dir.exists() {
            private_dir(state_dir).map_err(io(state_dir))?;
        }
        private_dir(&dir).map_err(io(&dir))?;
        Ok(RecordStore {
            dir,
            parsed: Default::default(),
        })
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
        newest(&bytes).map_err(|message| RecordError::Corrupt { path, message })
    }

    /// Appends `record`, on disk (fdatasync) before it returns: for a snapshot written
    /// before the change it describes.
    pub fn save(&self, record: &Record) -> Result<(), RecordError> {
        self.append(record, true)
    }

    /// Appends `record` without waiting for the disk: for what already happened (a
    /// crash may lose it; the synced snapshot before it is then in force).
    pub fn save_unsynced(&self, record: &Record) -> Result<(), RecordError> {
        self.append(record, false)
    }

    fn append(&self, record: &Record, sync: bool) -> Result<(), RecordError> {
        use std::io::Write;
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let path = self.path(&record.container_id);
        let io = |source| RecordError::Io {
            path: path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(record).expect("record serialises");
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        if len >= COMPACT_AT {
            drop(f);
            return write_atomic(&path, &line).map_err(io);
        }
        if len > 0 {
            // A torn tail (agent killed mid-write) must not swallow this snapshot.
            let mut last = [0u8];
            f.read_exact_at(&mut last, len - 1).map_err(io)?;
            if last[0] != b'\n' {
                line.insert(0, b'\n');
            }
        }
        // One write(2), on disk before the change it describes is made.
        f.write_all(&line).map_err(io)?;
        if sync {
            f.sync_data().map_err(io)?;
        }
        Ok(())
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
        let mut parsed = self.parsed.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = HashSet::new();
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
            seen.insert(id.to_string());
            // Stamped before the read: a save in between changes the stamp again,
            // so what was read is looked at once more next time.
            let now = std::fs::symlink_metadata(e.path()).ok().map(|m| stamp(&m));
            if let (Some(now), Some((then, r))) = (now, parsed.get(id)) {
                if now == *then {
                    records.push(r.clone());
                    continue;
                }
            }
            match self.load(id) {
                Ok(Some(r)) => {
                    if let Some(now) = now {
                        parsed.insert(id.to_string(), (now, r.clone()));
                    }
                    records.push(r);
                }
                Ok(None) => {
                    parsed.remove(id);
                }
                Err(err) => {
                    parsed.remove(id);
                    errors.push(err);
                }
            }
        }
        parsed.retain(|id, _| seen.contains(id));
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
            added_at_ms: None,
            networks: None,
            choices: None,
            static_networks: false,
            netns_inode: None,
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
        // A torn tail that happens to parse is not there yet either.
        let torn = serde_json::to_vec(&r).unwrap();
        std::fs::write(
            &p,
            [std::fs::read(&p).unwrap(), b"\n".to_vec(), torn].concat(),
        )
        .unwrap();
        assert_eq!(s.load("c1").unwrap().unwrap(), r2);
        // The next save starts on a line of its own, not glued to the torn bytes.
        let mut r3 = r.clone();
        r3.pod_name = "n3".into();
        std::fs::write(
            &p,
            [std::fs::read(&p).unwrap(), b"{\"contai".to_vec()].concat(),
        )
        .unwrap();
        s.save(&r3).unwrap();
        assert_eq!(s.load("c1").unwrap().unwrap(), r3);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(&d.path().join("containers")), 0o700);
        // Only a torn first snapshot: nothing recorded yet.
        std::fs::write(d.path().join("containers/torn.json"), b"{\"container_id\"").unwrap();
        assert!(s.load("torn").unwrap().is_none());
        // A file with no snapshot at all holds nothing.
        std::fs::write(d.path().join("containers/empty.json"), "").unwrap();
        assert!(s.load("empty").unwrap().is_none());
        std::fs::write(d.path().join("containers/bad.json"), "{\n").unwrap();
        let (good, bad) = s.list().unwrap();
        assert_eq!(good, [r3.clone()]);
        assert_eq!(bad.len(), 1);
        // What `list` keeps parsed follows every save, through this store or a clone.
        let mut r4 = r3.clone();
        r4.pod_name = "n4".into();
        s.clone().save(&r4).unwrap();
        assert_eq!(s.list().unwrap().0, [r4.clone()]);
        assert_eq!(s.list().unwrap().0, [r4.clone()]);
        s.remove("c1").unwrap();
        s.remove("c1").unwrap();
        assert!(s.load("c1").unwrap().is_none());
        assert!(s.list().unwrap().0.is_empty());
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
            added_at_ms: None,
            networks: None,
            choices: None,
            static_networks: false,
            netns_inode: None,
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
