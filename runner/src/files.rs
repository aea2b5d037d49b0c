//! Writing the run's files: atomically (write, then rename), never outside the run directory.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ep_api::volume::ManifestEntry;
use md5::Md5;
use sha2::{Digest, Sha256};

/// Writes `value` as JSON to `path` atomically, so readers never see half a file.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Copies `from` to `to` while hashing; returns (size, sha256).
pub fn copy_hashing(from: &Path, to: &Path) -> std::io::Result<(u64, String)> {
    if let Some(d) = to.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut src = std::fs::File::open(from)?;
    let mut dst = std::fs::File::create(to)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        dst.write_all(&buf[..n])?;
        size += n as u64;
    }
    Ok((size, hex::encode(h.finalize())))
}

/// Every file under `dir` with size, sha256, MD5 and mode; paths relative to `dir`, sorted.
pub fn manifest_of(dir: &Path) -> std::io::Result<Vec<ManifestEntry>> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<ManifestEntry>) -> std::io::Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for p in entries {
            let md = std::fs::symlink_metadata(&p)?;
            if md.is_dir() {
                walk(base, &p, out)?;
            } else if md.is_file() {
                let mut f = std::fs::File::open(&p)?;
                let (mut sha, mut md5) = (Sha256::new(), Md5::new());
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    sha.update(&buf[..n]);
                    md5.update(&buf[..n]);
                }
                use std::os::unix::fs::PermissionsExt;
                out.push(ManifestEntry {
                    path: p.strip_prefix(base).map_err(std::io::Error::other)?.to_string_lossy().into_owned(),
                    size: md.len(),
                    sha256: hex::encode(sha.finalize()),
                    mode: md.permissions().mode() & 0o7777,
                    md5: Some(hex::encode(md5.finalize())),
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    if dir.exists() {
        walk(dir, dir, &mut out)?;
    }
    Ok(out)
}
