// The TCX programs (ebpf/programs) built for the BPF target with the nightly toolchain
// and bpf-linker (scripts/setup.sh installs both), embedded in the agent.
fn main() -> aya_build::Result<()> {
    println!("cargo:rerun-if-changed=../ebpf/common");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "trellis-ebpf-programs",
            root_dir: "../ebpf/programs",
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
