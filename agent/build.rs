// The tc programs (ebpf/programs, bin trellis-tc: default features, so not the
// benchmark baseline) built for the BPF target with the nightly toolchain and
// bpf-linker (scripts/setup.sh installs both), embedded in the agent
// (src/dataplane/loader.rs OBJECT). Not a Cargo dependency: see docs/architecture.md.
fn main() -> aya_build::Result<()> {
    println!("cargo:rerun-if-changed=../ebpf/common");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    // Builds that never load the programs (the fuzz targets, built with sanitizer flags
    // the BPF target cannot take) skip them: the agent then embeds an empty object,
    // which its dataplane refuses to load.
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1") {
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
        std::fs::write(out.join("trellis-tc"), [])?;
        return Ok(());
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "trellis-ebpf-programs",
            root_dir: "../ebpf/programs",
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
