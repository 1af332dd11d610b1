//! The agent's servers against clients that misbehave (issue 10, items 7 and 8): idle
//! and flooding clients on the agent socket and on /metrics pin no threads and no
//! memory, the shim is still answered, and /metrics is on loopback by default.

use std::io::{Read, Write};
use std::time::{Duration, Instant};
use trellis_rig::netns::Netns;
use trellis_rig::node::{networks_annotation, TestNode};
use trellis_rig::require_root;

/// (threads, RSS in KiB) of a process.
fn threads_and_rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {status}"))
    };
    (field("Threads:"), field("VmRSS:"))
}

#[test]
fn idle_clients_on_the_agent_socket_pin_nothing() {
    require_root!();
    let mut node = TestNode::new();
    node.add_nad("pods", "mv-a", &node.macvlan_conf("10.74.1.0/24"));
    node.start_agent();
    let pid = node.agent.as_ref().unwrap().pid();
    // 300 clients that connect and send nothing (on main: a thread each, for ever).
    let idle: Vec<_> = (0..300)
        .map(|_| std::os::unix::net::UnixStream::connect(node.socket()).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (threads1, _) = threads_and_rss(pid);
    // 32 request workers, the runtime's and the agent's own: not a thread a client.
    assert!(threads1 < 100, "{threads1} threads with 300 idle clients");
    // The runtime is still answered, at once.
    let pod = Netns::new("trp");
    let started = Instant::now();
    node.shim(
        "ADD",
        "c1",
        &pod.path().to_string_lossy(),
        ("pods", "p"),
        &node.shim_conf(Some(&networks_annotation("mv-a"))),
    )
    .expect_ok("ADD with idle clients around");
    // Were idle clients given the 32 workers (each cut off after 10 s), it would wait
    // over a minute behind them.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    node.shim(
        "DEL",
        "c1",
        &pod.path().to_string_lossy(),
        ("pods", "p"),
        &node.shim_conf(None),
    )
    .expect_ok("DEL");
    // The idle ones are closed by the agent once their time to send is up.
    let mut first = idle.into_iter().next().unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(first.read(&mut buf).expect("closed, not timed out"), 0);
}

/// Connects to `addr` from inside `ns` (on a thread of its own).
fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter_this_thread();
            f()
        })
        .join()
        .unwrap()
    })
}

fn scrape() -> Result<String, std::io::Error> {
    let mut c = std::net::TcpStream::connect("127.0.0.1:9105")?;
    // Behind 200 idle clients a scrape waits for three rounds of 64 of them to time
    // out (5 s each): within a minute on any machine, never if they were not cut off.
    c.set_read_timeout(Some(Duration::from_secs(60)))?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn metrics_are_on_loopback_and_bounded() {
    require_root!();
    let mut node = TestNode::new();
    node.start_agent();
    let pid = node.agent.as_ref().unwrap().pid();
    // The node's bridge has 10.77.0.1 (the cluster network's gateway): not served.
    let outside = in_ns(&node.host, || {
        std::net::TcpStream::connect_timeout(
            &"10.77.0.1:9105".parse().unwrap(),
            Duration::from_secs(2),
        )
    });
    assert!(
        outside.is_err(),
        "/metrics answers on the node's network address"
    );
    let ok = in_ns(&node.host, scrape).expect("scrape");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("trellis_attachments 0"), "{ok}");
    let (_, rss0) = threads_and_rss(pid);
    // 64 MiB of zeros and no end of line (`cat /dev/zero | nc`): cut off long before
    // (what fits the two sockets' buffers may be written first).
    let flood = in_ns(&node.host, || {
        let mut c = std::net::TcpStream::connect("127.0.0.1:9105").unwrap();
        c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let zeros = vec![0u8; 64 << 10];
        let mut sent = 0usize;
        while sent < 64 << 20 {
            match c.write(&zeros) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        sent
    });
    assert!(flood < 64 << 20, "the agent read 64 MiB of a request head");
    // 200 clients that connect and send nothing, then a scrape: served once the
    // idle ones time out, without a thread each.
    let idle: Vec<_> = in_ns(&node.host, || {
        (0..200)
            .map(|_| std::net::TcpStream::connect("127.0.0.1:9105").unwrap())
            .collect()
    });
    let (threads, rss1) = threads_and_rss(pid);
    assert!(
        threads < 64,
        "{threads} threads with 200 idle metrics clients"
    );
    let started = Instant::now();
    let ok = in_ns(&node.host, scrape).expect("scrape with idle clients");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    // Three rounds of 64 idle clients cut off at the 5 s head timeout: ~15 s; over
    // 40 s would mean only the 30 s connection cap cut them.
    eprintln!(
        "scrape behind 200 idle clients served after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "{:?}",
        started.elapsed()
    );
    assert!(rss1 < rss0 + (8 << 10), "RSS {rss0} KiB -> {rss1} KiB");
    drop(idle);
}
