//! A pause image built here (no registry is reachable): a static C `pause`, packed by
//! hand as an OCI image-layout tar that `ctr images import` takes.

use std::path::{Path, PathBuf};
use std::process::Command;

pub const PAUSE_IMAGE: &str = "docker.io/library/trellis-pause:local";

const PAUSE_C: &str = r#"
#include <signal.h>
#include <unistd.h>
static void done(int s) { (void)s; _exit(0); }
int main(void) {
    signal(SIGINT, done);
    signal(SIGTERM, done);
    for (;;) pause();
}
"#;

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(path: &Path) -> (String, u64) {
    let out = sh(Command::new("sha256sum").arg(path));
    let hex = out
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string();
    (hex, std::fs::metadata(path).expect("blob").len())
}

fn put_blob(blobs: &Path, file: &Path) -> (String, u64) {
    let (hex, size) = sha256(file);
    std::fs::copy(file, blobs.join(&hex)).expect("blob copy");
    (format!("sha256:{hex}"), size)
}

/// Builds the image tar under `work` and returns its path.
pub fn build_image_tar(work: &Path) -> PathBuf {
    let rootfs = work.join("rootfs");
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&rootfs).unwrap();
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(work.join("pause.c"), PAUSE_C).unwrap();
    sh(Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(rootfs.join("pause"))
        .arg(work.join("pause.c")));
    let layer = work.join("layer.tar");
    sh(Command::new("tar")
        .args([
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-C",
        ])
        .arg(&rootfs)
        .args(["-cf"])
        .arg(&layer)
        .arg("pause"));
    let (layer_digest, layer_size) = put_blob(&blobs, &layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/pause"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let config_path = work.join("config.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let (config_digest, config_size) = put_blob(&blobs, &config_path);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
    });
    let manifest_path = work.join("manifest.json");
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    let (manifest_digest, manifest_size) = put_blob(&blobs, &manifest_path);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": PAUSE_IMAGE, "org.opencontainers.image.ref.name": "local"},
        }],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let tar = work.join("pause-image.tar");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tar)
        .args(["oci-layout", "index.json", "blobs"]));
    tar
}
