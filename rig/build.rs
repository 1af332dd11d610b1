// The benchmark baseline's eBPF object (ebpf/programs, bin trellis-bench-lpm), built for
// the BPF target as the agent's programs are (by agent/build.rs, which builds only
// trellis-tc: the baseline never reaches the agent).
fn main() -> aya_build::Result<()> {
    println!("cargo:rerun-if-changed=../ebpf/common");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1") {
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
        std::fs::write(out.join("trellis-bench-lpm"), [])?;
        return Ok(());
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "trellis-ebpf-programs",
            root_dir: "../ebpf/programs",
            // Only the baseline: the agent's build script builds trellis-tc.
            no_default_features: true,
            features: &["bench"],
        }],
        aya_build::Toolchain::Nightly,
    )
}
