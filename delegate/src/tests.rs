//! Plugins as shell scripts in a temp dir: timeouts, errors, chaining.

use crate::exec::*;
use serde_json::Map;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use trellis_cni::env::Command as CniCommand;
use trellis_cni::NetConfList;

fn script(dir: &std::path::Path, name: &str, body: &str) {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn invoker(dir: &std::path::Path, timeout_ms: u64) -> Invoker {
    Invoker {
        bin_dirs: vec![PathBuf::from("/nonexistent"), dir.to_path_buf()],
        timeout: Duration::from_millis(timeout_ms),
        in_process: None,
        host_process: None,
    }
}

#[test]
fn chains_prev_result_and_env() {
    let d = tempfile::tempdir().unwrap();
    // First plugin echoes a result; second proves it saw prevResult and the env.
    script(
        d.path(),
        "one",
        r#"cat >/dev/null; echo '{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.2/24"}]}'"#,
    );
    script(
        d.path(),
        "two",
        r#"in=$(cat); case "$in" in *prevResult*10.0.0.2*) ;; *) echo '{"code":7,"msg":"no prev"}'; exit 1;; esac
           echo "{\"cniVersion\":\"1.0.0\",\"interfaces\":[{\"name\":\"$CNI_IFNAME\",\"sandbox\":\"$CNI_NETNS\"}]}""#,
    );
    let list = NetConfList::parse(
        br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"one"},{"type":"two"}]}"#,
        None,
    )
    .unwrap();
    let t = Target {
        container_id: "c1",
        netns: "/run/netns/p",
        ifname: "net1",
        args: "",
    };
    let r = invoker(d.path(), 5000)
        .add_list(&list, &t, &Map::new())
        .unwrap();
    assert_eq!(r["interfaces"][0]["name"], "net1");
    assert_eq!(r["interfaces"][0]["sandbox"], "/run/netns/p");
}

#[test]
fn plugin_error_json_is_kept() {
    let d = tempfile::tempdir().unwrap();
    script(
        d.path(),
        "bad",
        r#"echo '{"cniVersion":"1.0.0","code":7,"msg":"bridge name too long"}'; exit 1"#,
    );
    let e = invoker(d.path(), 5000)
        .exec("bad", CniCommand::Add, &Target::default(), b"{}")
        .unwrap_err();
    let c = e.to_cni_error("network a");
    assert_eq!(c.code, 7);
    assert!(c.msg.contains("bridge name too long"), "{c}");
}

#[test]
fn crash_without_json_reports_stderr() {
    let d = tempfile::tempdir().unwrap();
    script(d.path(), "crash", "echo boom >&2; exit 3");
    let e = invoker(d.path(), 5000)
        .exec("crash", CniCommand::Add, &Target::default(), b"{}")
        .unwrap_err()
        .to_string();
    assert!(e.contains("boom") && e.contains("exit status: 3"), "{e}");
}

#[test]
fn timeout_kills_the_process_group() {
    let d = tempfile::tempdir().unwrap();
    let marker = d.path().join("child.pid");
    script(
        d.path(),
        "slow",
        &format!("sleep 30 & echo $! > {}; wait", marker.display()),
    );
    let start = std::time::Instant::now();
    let e = invoker(d.path(), 300)
        .exec("slow", CniCommand::Add, &Target::default(), b"{}")
        .unwrap_err();
    assert!(matches!(e, InvokeError::Timeout { .. }), "{e}");
    assert!(start.elapsed() < Duration::from_secs(10));
    let pid: i32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The grandchild was killed with the group (it may linger as a zombie briefly).
    std::thread::sleep(Duration::from_millis(100));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "sleep still running: {stat}"
    );
}

/// The plugin of an agent that dies mid-call dies too (PR_SET_PDEATHSIG): this
/// test runs itself as the "agent", in a process of its own, and SIGKILLs it.
#[test]
fn a_plugin_dies_with_the_agent() {
    if let Ok(dir) = std::env::var("TRELLIS_TEST_AGENT_DIR") {
        // The "agent": blocks in a plugin that sleeps, until it is killed.
        let d = std::path::PathBuf::from(dir);
        let _ = invoker(&d, 60_000).exec("slow", CniCommand::Add, &Target::default(), b"{}");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let marker = d.path().join("plugin.pid");
    script(
        d.path(),
        "slow",
        &format!("echo $$ > {}; exec sleep 30", marker.display()),
    );
    /// The "agent" killed even when an assert below fails.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut agent = Killed(
        std::process::Command::new(std::env::current_exe().unwrap())
            // This test by its harness name (the module path without the crate).
            .args([
                "--exact",
                &format!(
                    "{}::a_plugin_dies_with_the_agent",
                    module_path!().split_once("::").unwrap().1
                ),
            ])
            .env("TRELLIS_TEST_AGENT_DIR", d.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let pid: i32 = loop {
        if let Some(p) = std::fs::read_to_string(&marker)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break p;
        }
        assert!(std::time::Instant::now() < deadline, "the plugin never ran");
        std::thread::sleep(Duration::from_millis(20));
    };
    agent.0.kill().unwrap();
    agent.0.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the plugin outlived its agent: {stat}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn names_that_are_paths_never_run() {
    let d = tempfile::tempdir().unwrap();
    let marker = d.path().join("ran");
    script(d.path(), "x.sh", &format!("touch {}", marker.display()));
    let abs = d.path().join("x.sh").display().to_string();
    let dotdot = format!(
        "../{}/x.sh",
        d.path().file_name().unwrap().to_string_lossy()
    );
    for name in [abs.as_str(), dotdot.as_str(), "", ".", "..", "a\0b"] {
        let e = invoker(d.path(), 1000)
            .exec(name, CniCommand::Add, &Target::default(), b"{}")
            .unwrap_err();
        assert!(matches!(e, InvokeError::BadName { .. }), "{name:?}: {e}");
        assert_eq!(e.to_cni_error("x").code, 7);
        assert!(!e.needs_del());
    }
    assert!(!marker.exists(), "a path was exec'd");
}

#[test]
fn multibyte_output_is_cut_on_a_char_boundary() {
    let d = tempfile::tempdir().unwrap();
    script(
        d.path(),
        "utf8",
        &format!("printf '{}\\303\\251'; exit 3", "a".repeat(1999)),
    );
    let e = invoker(d.path(), 5000)
        .exec("utf8", CniCommand::Add, &Target::default(), b"{}")
        .unwrap_err();
    assert!(matches!(e, InvokeError::Crashed { .. }), "{e}");
}

#[test]
fn a_plugin_that_ran_is_counted_for_del() {
    let d = tempfile::tempdir().unwrap();
    script(d.path(), "crash", "cat >/dev/null; exit 3");
    script(d.path(), "slow", "sleep 30");
    script(
        d.path(),
        "fails",
        r#"cat >/dev/null; echo '{"code":7,"msg":"no"}'; exit 1"#,
    );
    let t = Target::default();
    for (ty, done) in [("crash", 1), ("slow", 1), ("fails", 0), ("missing", 0)] {
        let list = NetConfList::parse(
            format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"{ty}"}}"#).as_bytes(),
            None,
        )
        .unwrap();
        let (n, e) = invoker(d.path(), 300)
            .add_list(&list, &t, &Map::new())
            .unwrap_err();
        assert_eq!(n, done, "{ty}: {e}");
    }
}

#[test]
fn a_hung_grandchild_holding_the_pipes_does_not_hang_the_call() {
    let d = tempfile::tempdir().unwrap();
    // setsid: the grandchild leaves the plugin's process group, so the kill
    // misses it, and it keeps stdout and stderr open.
    script(d.path(), "escape", "setsid sleep 20 & sleep 30");
    let start = std::time::Instant::now();
    let e = invoker(d.path(), 300)
        .exec("escape", CniCommand::Add, &Target::default(), b"{}")
        .unwrap_err();
    assert!(matches!(e, InvokeError::Timeout { .. }), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn missing_plugin_names_dirs() {
    let d = tempfile::tempdir().unwrap();
    let e = invoker(d.path(), 100).find("nope").unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("/nonexistent"), "{e}");
}

#[test]
fn del_asks_every_plugin_in_reverse() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("log");
    for name in ["a", "b", "c"] {
        script(
            d.path(),
            name,
            &format!("cat >/dev/null; echo {name} >> {}; [ {name} = b ] && {{ echo '{{\"code\":5,\"msg\":\"b\"}}'; exit 1; }}; exit 0", log.display()),
        );
    }
    let list = NetConfList::parse(
        br#"{"cniVersion":"0.4.0","name":"n","plugins":[{"type":"a"},{"type":"b"},{"type":"c"}]}"#,
        None,
    )
    .unwrap();
    let errs = invoker(d.path(), 5000).del_list(&list, &Target::default(), &Map::new(), None);
    assert_eq!(errs.len(), 1);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "c\nb\na\n");
}
