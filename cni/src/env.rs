//! The CNI_* environment a plugin is run with, parsed and checked per command.

use crate::error::{CniError, ErrorCode};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Gc => "GC",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }
}

/// `CNI_ARGS`: "K=V;K=V", order kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs(pub Vec<(String, String)>);

impl CniArgs {
    pub fn parse(s: &str) -> Result<CniArgs, CniError> {
        let mut out = Vec::new();
        for part in s.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("CNI_ARGS entry {part:?} is not KEY=VALUE"),
                )
            })?;
            out.push((k.to_string(), v.to_string()));
        }
        Ok(CniArgs(out))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl std::fmt::Display for CniArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&parts.join(";"))
    }
}

/// The environment of one CNI call, validated for its command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: String,
    /// Empty when the runtime gave none (allowed for DEL).
    pub netns: String,
    pub ifname: String,
    pub args: CniArgs,
    pub path: Vec<PathBuf>,
}

fn env_err(msg: String) -> CniError {
    CniError::new(ErrorCode::InvalidEnvironment, msg)
}

impl CniEnv {
    pub fn from_vars(vars: &BTreeMap<String, String>) -> Result<CniEnv, CniError> {
        let get = |k: &str| vars.get(k).map(String::as_str).unwrap_or("");
        let command = match vars.get("CNI_COMMAND") {
            None => return Err(env_err("CNI_COMMAND is not set".into())),
            Some(c) => Command::parse(c).ok_or_else(|| {
                env_err(format!(
                    "CNI_COMMAND {c:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"
                ))
            })?,
        };
        let needs_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let needs_netns = matches!(command, Command::Add | Command::Check);
        // GC, STATUS and VERSION act on no container: whatever a runtime left in these
        // variables is dropped unread rather than carried on unvalidated.
        let (container_id, netns, ifname) = if needs_container {
            (
                get("CNI_CONTAINERID").to_string(),
                get("CNI_NETNS").to_string(),
                get("CNI_IFNAME").to_string(),
            )
        } else {
            Default::default()
        };
        if needs_container {
            if container_id.is_empty() {
                return Err(env_err(format!(
                    "CNI_CONTAINERID is required for {}",
                    command.as_str()
                )));
            }
            validate_container_id(&container_id)?;
            if ifname.is_empty() {
                return Err(env_err(format!(
                    "CNI_IFNAME is required for {}",
                    command.as_str()
                )));
            }
            validate_ifname(&ifname).map_err(|m| env_err(format!("CNI_IFNAME {ifname:?}: {m}")))?;
        }
        if needs_netns && netns.is_empty() {
            return Err(env_err(format!(
                "CNI_NETNS is required for {}",
                command.as_str()
            )));
        }
        let args = CniArgs::parse(get("CNI_ARGS"))?;
        let path = get("CNI_PATH")
            .split(':')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect();
        Ok(CniEnv {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }
}

/// Container IDs: alphanumeric first, then alphanumerics, `_`, `.`, `-` (spec 1.1).
/// The longest container ID taken: the agent keeps a file named after it (255 bytes
/// with its suffix). Runtimes use 64.
pub const MAX_CONTAINER_ID: usize = 250;

pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    if id.len() > MAX_CONTAINER_ID {
        return Err(env_err(format!(
            "CNI_CONTAINERID is {} bytes; at most {MAX_CONTAINER_ID} are taken",
            id.len()
        )));
    }
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(env_err(format!(
            "CNI_CONTAINERID {id:?} must start with a letter or digit and hold only letters, digits, '_', '.', '-'"
        )))
    }
}

/// Linux interface names: 1-15 bytes, not "." or "..", no '/', ':' or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > 15 {
        return Err(format!(
            "is {} bytes long; interface names hold at most 15",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err("is not a valid interface name".into());
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err("must not contain '/', ':' or whitespace".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn add_requires_container_netns_ifname() {
        let e = CniEnv::from_vars(&vars(&[("CNI_COMMAND", "ADD")])).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_CONTAINERID"));
        let e = CniEnv::from_vars(&vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap_err();
        assert!(e.msg.contains("CNI_NETNS"), "{e}");
        let ok = CniEnv::from_vars(&vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=p"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ]))
        .unwrap();
        assert_eq!(ok.args.get("K8S_POD_NAME"), Some("p"));
        assert_eq!(ok.path.len(), 2);
    }

    #[test]
    fn del_allows_empty_netns() {
        let ok = CniEnv::from_vars(&vars(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]));
        assert!(ok.is_ok());
    }

    #[test]
    fn gc_and_status_drop_container_vars_unread() {
        // Found by the cni_conf_env fuzz target: GC kept an ID it never validated.
        for cmd in ["GC", "STATUS", "VERSION"] {
            let ok = CniEnv::from_vars(&vars(&[
                ("CNI_COMMAND", cmd),
                ("CNI_CONTAINERID", "abc=../x"),
                ("CNI_IFNAME", "a/b"),
                ("CNI_NETNS", "/etc"),
            ]))
            .unwrap();
            assert_eq!(ok.container_id, "", "{cmd}");
            assert_eq!(ok.ifname, "", "{cmd}");
            assert_eq!(ok.netns, "", "{cmd}");
        }
    }

    #[test]
    fn rejects_bad_values() {
        for (k, v, want) in [
            ("CNI_COMMAND", "FOO", "CNI_COMMAND"),
            ("CNI_CONTAINERID", "-bad", "CNI_CONTAINERID"),
            ("CNI_IFNAME", "a-very-long-interface", "15"),
            ("CNI_ARGS", "novalue", "KEY=VALUE"),
        ] {
            let mut m = vars(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "abc"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ]);
            m.insert(k.into(), v.into());
            let e = CniEnv::from_vars(&m).unwrap_err();
            assert!(e.msg.contains(want), "{k}={v}: {e}");
        }
        assert!(validate_ifname("eth:0").is_err());
        assert!(validate_ifname("..").is_err());
    }

    #[test]
    fn args_round_trip() {
        let a = CniArgs::parse("A=1;B=x=y").unwrap();
        assert_eq!(a.get("B"), Some("x=y"));
        assert_eq!(a.to_string(), "A=1;B=x=y");
    }
}
