//! `make image`'s archive, inspected as a registry would see it: entrypoint, non-root user, OCI
//! labels, and both binaries present and static (no ELF interpreter), on an empty base.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use ep_testkit::workspace_root;
use serde_json::Value;

fn blob(dir: &Path, digest: &str) -> Vec<u8> {
    let (algo, hex) = digest.split_once(':').unwrap();
    std::fs::read(dir.join("blobs").join(algo).join(hex)).unwrap()
}

/// Whether an ELF file asks for a dynamic loader (a PT_INTERP program header).
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "64-bit ELF expected");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| u32::from_le_bytes(elf[phoff + i * phentsize..][..4].try_into().unwrap()) == 3)
}

#[test]
fn the_image_is_static_non_root_and_labelled() {
    let root = workspace_root();
    // The same script as `make image`, with the dev profile so only two final links are added to CI.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new("bash")
        .arg(root.join("scripts/image.sh"))
        .args(["build", "dev"])
        .env("CARGO", cargo)
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The script says where it wrote the archive (under CARGO_TARGET_DIR when that is set).
    let stdout = String::from_utf8_lossy(&out.stdout);
    let archive = std::path::PathBuf::from(stdout.lines().last().and_then(|l| l.split(' ').next()).unwrap());
    assert!(archive.ends_with("image/ep-operator.oci.tar"), "{stdout}");
    let dir = tempfile::tempdir().unwrap();
    let st = Command::new("tar").arg("-xf").arg(&archive).arg("-C").arg(dir.path()).status().unwrap();
    assert!(st.success());

    let index: Value = serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
    let m = &index["manifests"][0];
    assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], "ep-operator:0.1.0");
    let manifest: Value = serde_json::from_slice(&blob(dir.path(), m["digest"].as_str().unwrap())).unwrap();
    let config: Value =
        serde_json::from_slice(&blob(dir.path(), manifest["config"]["digest"].as_str().unwrap())).unwrap();
    let c = &config["config"];
    assert_eq!(c["Entrypoint"], serde_json::json!(["/usr/local/bin/ep-operator"]));
    assert_eq!(c["Cmd"], serde_json::json!(["run"]));
    assert_eq!(c["User"], "65532:65532", "non-root");
    let labels = &c["Labels"];
    assert_eq!(labels["org.opencontainers.image.source"], "https://github.com/ep-dev/ep-operator");
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    assert_eq!(labels["org.opencontainers.image.version"], "0.1.0");
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 1, "one layer on an empty base");

    // The layer's files.
    let layer = &manifest["layers"][0];
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let layer_file = dir.path().join("layer.tar");
    std::fs::write(&layer_file, blob(dir.path(), layer["digest"].as_str().unwrap())).unwrap();
    let gz = layer["mediaType"].as_str().unwrap().ends_with("gzip");
    let st = Command::new("tar")
        .arg(if gz { "-xzf" } else { "-xf" })
        .arg(&layer_file)
        .arg("-C")
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(st.success());
    for b in ["ep-operator", "ep-runner"] {
        let path = rootfs.join("usr/local/bin").join(b);
        let elf = std::fs::read(&path).unwrap_or_else(|e| panic!("{b} missing from the image: {e}"));
        assert!(!has_interpreter(&elf), "{b} needs a dynamic loader the empty base does not have");
        let v = Command::new(&path).arg("--version").output().unwrap();
        assert!(v.status.success() && String::from_utf8_lossy(&v.stdout).contains("0.1.0"), "{b} --version");
    }
    assert!(rootfs.join("etc/ssl/certs/ca-certificates.crt").metadata().unwrap().len() > 10_000, "CA certificates");
    assert!(std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap().contains(":65532:65532:"));
    // The dynamic build of the same binaries has an interpreter: the check can tell them apart.
    assert!(has_interpreter(&std::fs::read("/bin/sh").unwrap()) || !Path::new("/bin/sh").exists());
}
