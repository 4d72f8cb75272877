//! Generates the gRPC code of every convoy service from `proto/convoy/v1` and writes the
//! file descriptor set that server reflection serves.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let protos: Vec<PathBuf> = std::fs::read_dir(root.join("convoy/v1"))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    let descriptor = PathBuf::from(env::var("OUT_DIR")?).join("convoy_descriptor.bin");

    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor)
        // Deterministic encoding of map fields, so a message can be fingerprinted.
        .btree_map(".")
        .compile_protos(&protos, std::slice::from_ref(&root))?;

    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
