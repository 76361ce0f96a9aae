//! Compiles strata's copies of containerd's API protos with tonic.
//! `protoc` comes from $PROTOC or the PATH (Debian: protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "containerd/mount.proto",
        "containerd/snapshots.proto",
        "containerd/content.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&protos, &["containerd"])?;
    Ok(())
}
