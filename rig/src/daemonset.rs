//! The shipped DaemonSet's pod, translated to CRI as kubelet would: sandbox namespaces
//! and privileges, each container's command, env, mounts (hostPath and ConfigMap
//! volumes), privileges and resources. Anything in the pod spec this translation does
//! not know fails the test, so the manifest cannot drift from what is proven here.

use k8s_cri::v1::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The objects of a multi-document manifest file.
pub fn load(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// The one object of `kind` in `objects`.
pub fn find<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let mut it = objects.iter().filter(|o| o["kind"] == kind);
    let found = it
        .next()
        .unwrap_or_else(|| panic!("no {kind} in the manifests"));
    assert!(it.next().is_none(), "more than one {kind} in the manifests");
    found
}

fn known(obj: &Value, what: &str, keys: &[&str]) {
    for k in obj.as_object().into_iter().flatten().map(|(k, _)| k) {
        assert!(
            keys.contains(&k.as_str()),
            "{what}.{k}: the rig does not translate it to CRI; teach rig/src/daemonset.rs"
        );
    }
}

/// The DaemonSet's pod, ready to run on the rig's containerd.
pub struct DaemonPod {
    pub namespace: String,
    pub name: String,
    spec: Value,
    /// Where ConfigMap volumes' files are written (one dir per volume).
    configmaps: BTreeMap<String, PathBuf>,
    node_name: String,
    pub log_dir: PathBuf,
}

impl DaemonPod {
    /// `configmaps`: every ConfigMap the pod mounts, by name, with its files' contents
    /// (the caller may have changed them); written under `dir`.
    pub fn new(
        daemonset: &Value,
        configmaps: &BTreeMap<String, BTreeMap<String, String>>,
        node_name: &str,
        dir: &Path,
    ) -> DaemonPod {
        let spec = daemonset["spec"]["template"]["spec"].clone();
        known(
            &spec,
            "spec.template.spec",
            &[
                "hostNetwork",
                "hostPID",
                "dnsPolicy",
                "serviceAccountName",
                "priorityClassName",
                "tolerations",
                "terminationGracePeriodSeconds",
                "initContainers",
                "containers",
                "volumes",
                "nodeSelector",
            ],
        );
        let mut cms = BTreeMap::new();
        for v in spec["volumes"].as_array().into_iter().flatten() {
            known(v, "volumes[]", &["name", "hostPath", "configMap"]);
            known(&v["hostPath"], "volumes[].hostPath", &["path", "type"]);
            known(&v["configMap"], "volumes[].configMap", &["name"]);
            if let Some(t) = v["hostPath"]["type"].as_str() {
                // What kubelet checks before it mounts; the test makes the
                // DirectoryOrCreate ones, the others must be there.
                assert!(
                    ["Directory", "DirectoryOrCreate", "Socket", "File"].contains(&t),
                    "volumes[].hostPath.type {t}: the rig does not check it"
                );
            }
            if let Some(cm) = v["configMap"]["name"].as_str() {
                let files = configmaps
                    .get(cm)
                    .unwrap_or_else(|| panic!("ConfigMap {cm} not given"));
                let d = dir.join("configmaps").join(v["name"].as_str().unwrap());
                std::fs::create_dir_all(&d).unwrap();
                for (f, text) in files {
                    std::fs::write(d.join(f), text).unwrap();
                }
                cms.insert(v["name"].as_str().unwrap().to_string(), d);
            }
        }
        let log_dir = dir.join("pod-logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        DaemonPod {
            namespace: daemonset["metadata"]["namespace"]
                .as_str()
                .expect("namespace")
                .into(),
            name: format!("{}-rig", daemonset["metadata"]["name"].as_str().unwrap()),
            spec,
            configmaps: cms,
            node_name: node_name.into(),
            log_dir,
        }
    }

    fn namespaces(&self) -> NamespaceOption {
        let host = |k: &str| self.spec[k].as_bool() == Some(true);
        NamespaceOption {
            network: if host("hostNetwork") {
                NamespaceMode::Node
            } else {
                NamespaceMode::Pod
            } as i32,
            pid: if host("hostPID") {
                NamespaceMode::Node
            } else {
                NamespaceMode::Container
            } as i32,
            ipc: NamespaceMode::Pod as i32,
            ..Default::default()
        }
    }

    fn containers(&self, key: &str) -> Vec<&Value> {
        self.spec[key].as_array().into_iter().flatten().collect()
    }

    fn privileged(&self) -> bool {
        self.containers("initContainers")
            .into_iter()
            .chain(self.containers("containers"))
            .any(|c| c["securityContext"]["privileged"] == true)
    }

    pub fn sandbox(&self) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: self.name.clone(),
                uid: format!("uid-{}", self.name),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            hostname: String::new(),
            log_directory: self.log_dir.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(self.namespaces()),
                    // kubelet asks for a privileged sandbox when any container is.
                    privileged: self.privileged(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The init container or container called `name`.
    pub fn container_spec(&self, name: &str) -> &Value {
        self.containers("initContainers")
            .into_iter()
            .chain(self.containers("containers"))
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name} in the DaemonSet"))
    }

    /// CreateContainer's config for container `name`, its command replaced by
    /// `command` if given (the same container running another subcommand).
    pub fn container(
        &self,
        name: &str,
        attempt: u32,
        command: Option<Vec<String>>,
    ) -> ContainerConfig {
        let c = self.container_spec(name);
        known(
            c,
            &format!("container {name}"),
            &[
                "name",
                "image",
                "imagePullPolicy",
                "command",
                "args",
                "env",
                "volumeMounts",
                "securityContext",
                "resources",
                "readinessProbe",
                "livenessProbe",
                "startupProbe",
                "terminationMessagePolicy",
            ],
        );
        known(
            &c["securityContext"],
            &format!("container {name} securityContext"),
            &["privileged"],
        );
        known(
            &c["resources"],
            &format!("container {name} resources"),
            &["requests", "limits"],
        );
        known(
            &c["resources"]["requests"],
            &format!("container {name} resources.requests"),
            &["cpu", "memory"],
        );
        known(
            &c["resources"]["limits"],
            &format!("container {name} resources.limits"),
            &["memory"],
        );
        for p in ["readinessProbe", "livenessProbe", "startupProbe"] {
            // The test runs the probes' httpGet itself (host, port, path).
            known(
                &c[p],
                &format!("container {name} {p}"),
                &[
                    "httpGet",
                    "periodSeconds",
                    "failureThreshold",
                    "initialDelaySeconds",
                    "timeoutSeconds",
                ],
            );
            known(
                &c[p]["httpGet"],
                &format!("container {name} {p}.httpGet"),
                &["host", "port", "path"],
            );
        }
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .map(|s| s.as_str().expect("string").to_string())
                .collect()
        };
        let envs = c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                known(e, "env[]", &["name", "value", "valueFrom"]);
                let value = match (&e["value"], &e["valueFrom"]["fieldRef"]["fieldPath"]) {
                    (Value::String(v), _) => v.clone(),
                    (_, Value::String(f)) if f == "spec.nodeName" => self.node_name.clone(),
                    _ => panic!("env {e}: the rig translates values and spec.nodeName only"),
                };
                KeyValue {
                    key: e["name"].as_str().unwrap().into(),
                    value,
                }
            })
            .collect();
        let volumes = self.spec["volumes"].as_array().cloned().unwrap_or_default();
        let mounts = c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                known(
                    m,
                    "volumeMounts[]",
                    &["name", "mountPath", "readOnly", "mountPropagation"],
                );
                let vol = volumes
                    .iter()
                    .find(|v| v["name"] == m["name"])
                    .unwrap_or_else(|| panic!("volumeMount {m}: no such volume"));
                let host_path = match vol["hostPath"]["path"].as_str() {
                    Some(p) => p.to_string(),
                    None => self.configmaps[vol["name"].as_str().unwrap()]
                        .display()
                        .to_string(),
                };
                let propagation = match m["mountPropagation"].as_str() {
                    None | Some("None") => MountPropagation::PropagationPrivate,
                    Some("HostToContainer") => MountPropagation::PropagationHostToContainer,
                    Some("Bidirectional") => MountPropagation::PropagationBidirectional,
                    Some(o) => panic!("mountPropagation {o}"),
                };
                Mount {
                    container_path: m["mountPath"].as_str().unwrap().into(),
                    host_path,
                    readonly: m["readOnly"] == true,
                    propagation: propagation as i32,
                    ..Default::default()
                }
            })
            .collect();
        let memory_limit = c["resources"]["limits"]["memory"]
            .as_str()
            .map(quantity_bytes)
            .unwrap_or(0);
        let cpu_shares = c["resources"]["requests"]["cpu"]
            .as_str()
            .map(|q| {
                let milli: i64 = q
                    .strip_suffix('m')
                    .map_or_else(|| q.parse::<i64>().unwrap() * 1000, |m| m.parse().unwrap());
                (milli * 1024 / 1000).max(2)
            })
            .unwrap_or(2);
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt,
            }),
            image: Some(ImageSpec {
                image: c["image"].as_str().expect("image").into(),
                ..Default::default()
            }),
            command: command.unwrap_or_else(|| strings(&c["command"])),
            args: strings(&c["args"]),
            envs,
            mounts,
            log_path: format!("{name}-{attempt}.log"),
            linux: Some(LinuxContainerConfig {
                resources: Some(LinuxContainerResources {
                    memory_limit_in_bytes: memory_limit,
                    cpu_shares,
                    ..Default::default()
                }),
                security_context: Some(LinuxContainerSecurityContext {
                    privileged: c["securityContext"]["privileged"] == true,
                    namespace_options: Some(self.namespaces()),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    /// What container `name` printed (its CRI log file).
    pub fn log(&self, name: &str, attempt: u32) -> String {
        std::fs::read_to_string(self.log_dir.join(format!("{name}-{attempt}.log")))
            .unwrap_or_default()
    }
}

/// `512Mi`, `64M`, `1Gi`, or plain bytes.
fn quantity_bytes(q: &str) -> i64 {
    for (suffix, mult) in [
        ("Ki", 1i64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ] {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<i64>().expect("quantity") * mult;
        }
    }
    q.parse().expect("quantity")
}
