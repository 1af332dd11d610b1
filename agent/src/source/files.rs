//! NAD files (YAML or JSON, one or more documents each) in a directory, re-read when
//! they change; pod annotations from the container runtime.

use super::{NetworkSource, PodRef, SourceError};
use crate::nad::NetworkAttachmentDefinition;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

pub struct FileSource {
    dir: PathBuf,
    cache: Mutex<HashMap<PathBuf, CachedFile>>,
}

struct CachedFile {
    stamp: (SystemTime, u64),
    parsed: Result<Vec<NetworkAttachmentDefinition>, String>,
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>) -> FileSource {
        FileSource {
            dir: dir.into(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Every NAD file in the directory, parsed (cached while unchanged); unreadable
    /// files are reported by name.
    fn scan(&self) -> Result<(Vec<NetworkAttachmentDefinition>, Vec<String>), SourceError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| SourceError::Unavailable {
            what: format!("NAD directory {}", self.dir.display()),
            message: e.to_string(),
        })?;
        let mut cache = self.cache.lock().expect("cache lock");
        let mut nads = Vec::new();
        let mut broken = Vec::new();
        let mut present = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let is_nad_file = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            );
            let Ok(meta) = entry.metadata() else { continue };
            if !is_nad_file || !meta.is_file() {
                continue;
            }
            let stamp = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            present.push(path.clone());
            let fresh = cache.get(&path).is_some_and(|c| c.stamp == stamp);
            if !fresh {
                cache.insert(
                    path.clone(),
                    CachedFile {
                        stamp,
                        parsed: parse_file(&path),
                    },
                );
            }
            match &cache[&path].parsed {
                Ok(list) => nads.extend(list.iter().cloned()),
                Err(e) => broken.push(format!("{}: {e}", path.display())),
            }
        }
        cache.retain(|p, _| present.contains(p));
        Ok((nads, broken))
    }
}

fn parse_file(path: &Path) -> Result<Vec<NetworkAttachmentDefinition>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    // Empty and null documents are skipped by the parser.
    let out: Vec<NetworkAttachmentDefinition> =
        serde_saphyr::from_multiple(&text).map_err(|e| e.to_string())?;
    if let Some(n) = out
        .iter()
        .find(|n| !n.kind.is_empty() && n.kind != "NetworkAttachmentDefinition")
    {
        return Err(format!(
            "kind {:?} is not NetworkAttachmentDefinition",
            n.kind
        ));
    }
    Ok(out)
}

impl NetworkSource for FileSource {
    fn get_nad(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<NetworkAttachmentDefinition, SourceError> {
        let (nads, broken) = self.scan()?;
        if let Some(n) = nads
            .into_iter()
            .find(|n| n.metadata.name == name && n.namespace() == namespace)
        {
            return Ok(n);
        }
        let mut hint = format!(" in {}", self.dir.display());
        if !broken.is_empty() {
            hint.push_str(&format!(" (unreadable files: {})", broken.join("; ")));
        }
        Err(SourceError::NadNotFound {
            name: format!("{namespace}/{name}"),
            hint,
        })
    }

    fn logical_nads(&self) -> Result<Vec<NetworkAttachmentDefinition>, SourceError> {
        let (nads, _) = self.scan()?;
        Ok(nads
            .into_iter()
            .filter(|n| {
                n.metadata
                    .annotations
                    .contains_key(crate::logical::LOGICAL_ANNOTATION)
            })
            .collect())
    }

    fn pod_annotations(
        &self,
        _pod: &PodRef,
        from_runtime: Option<&BTreeMap<String, String>>,
    ) -> Result<BTreeMap<String, String>, SourceError> {
        Ok(from_runtime.cloned().unwrap_or_default())
    }

    fn publish_network_status(&self, _pod: &PodRef, _status: &str) -> Result<(), SourceError> {
        // No API object to write to; the status stays in the attachment record.
        Ok(())
    }

    fn ready(&self) -> Result<(), SourceError> {
        self.scan().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAD_A: &str = "apiVersion: k8s.cni.cncf.io/v1\nkind: NetworkAttachmentDefinition\nmetadata:\n  name: a\n  namespace: pods\nspec:\n  config: '{\"cniVersion\":\"1.0.0\",\"type\":\"bridge\"}'\n";

    #[test]
    fn finds_multi_document_and_json_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("two.yaml"),
            format!("{NAD_A}---\n{}", NAD_A.replace("name: a", "name: b")),
        )
        .unwrap();
        std::fs::write(
            d.path().join("c.json"),
            r#"{"apiVersion":"k8s.cni.cncf.io/v1","kind":"NetworkAttachmentDefinition","metadata":{"name":"c"},"spec":{"config":"{}"}}"#,
        )
        .unwrap();
        std::fs::write(d.path().join("notes.txt"), "ignored").unwrap();
        let s = FileSource::new(d.path());
        assert_eq!(s.get_nad("pods", "b").unwrap().metadata.name, "b");
        assert_eq!(
            s.get_nad("default", "c").unwrap().qualified_name(),
            "default/c"
        );
        assert!(matches!(
            s.get_nad("default", "a"),
            Err(SourceError::NadNotFound { .. })
        ));
    }

    #[test]
    fn broken_files_are_named_and_changes_picked_up() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("bad.yaml"), "metadata: [").unwrap();
        let s = FileSource::new(d.path());
        let e = s.get_nad("pods", "a").unwrap_err().to_string();
        assert!(e.contains("pods/a") && e.contains("bad.yaml"), "{e}");
        std::fs::write(d.path().join("bad.yaml"), NAD_A).unwrap();
        assert!(s.get_nad("pods", "a").is_ok());
    }

    #[test]
    fn missing_dir_is_unavailable() {
        let s = FileSource::new("/nonexistent/trellis");
        assert!(s
            .ready()
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/trellis"));
    }
}
