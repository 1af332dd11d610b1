//! The test kubelet as a program, for guests and other places a test cannot run
//! in-process: `trellis-kubelet-probe DIR RESOURCE SECONDS` serves Registration in
//! DIR, waits for RESOURCE to register, follows its ListAndWatch for SECONDS and
//! prints each list as a JSON line: {"ms": since start, "devices": [[id, health]...]}.

use std::time::{Duration, Instant};
use trellis_device_plugin::api::deviceplugin as dp;
use trellis_rig::fake_kubelet::FakeKubelet;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, resource, secs] = &args[..] else {
        eprintln!("usage: trellis-kubelet-probe DIR RESOURCE SECONDS");
        std::process::exit(2);
    };
    let secs: u64 = secs.parse().expect("SECONDS");
    let start = Instant::now();
    let kubelet = FakeKubelet::start(std::path::Path::new(dir));
    let deadline = start + Duration::from_secs(secs);
    let endpoint = loop {
        if let Some(r) = kubelet
            .registrations()
            .iter()
            .find(|r| &r.request.resource_name == resource)
        {
            break r.request.endpoint.clone();
        }
        if Instant::now() > deadline {
            eprintln!("{resource} never registered");
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "{{\"ms\":{},\"registered\":{:?}}}",
        start.elapsed().as_millis(),
        resource
    );
    let mut client = kubelet.plugin(&endpoint).await;
    let mut stream = client
        .list_and_watch(dp::Empty {})
        .await
        .expect("ListAndWatch")
        .into_inner();
    while let Ok(Ok(Some(m))) = tokio::time::timeout_at(deadline.into(), stream.message()).await {
        let devices: Vec<[String; 2]> = m
            .devices
            .iter()
            .map(|d| [d.id.clone(), d.health.clone()])
            .collect();
        println!(
            "{}",
            serde_json::json!({"ms": start.elapsed().as_millis() as u64, "devices": devices})
        );
    }
}
