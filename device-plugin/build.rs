// The kubelet APIs' .proto files (written from the published definitions) compiled
// with the system protoc, which the setup installs (protobuf-compiler).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/deviceplugin_v1beta1.proto",
            "proto/podresources_v1.proto",
        ],
        &["proto/"],
    )?;
    Ok(())
}
