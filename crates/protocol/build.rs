//! Generates the task and verdict messages from `proto/` without a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir).join("../../proto");
    let file = root.join("virusscanner/v1/scan.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let descriptors = protox::compile([&file], [&root])?;
    // A task's body is shared with the request it came from, not copied into the task.
    prost_build::Config::new()
        .bytes([".virusscanner.v1.ScanTask.body"])
        .compile_fds(descriptors)?;
    Ok(())
}
