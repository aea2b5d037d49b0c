//! Payload manifests from a directory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use ep_api::volume::{FORMAT_VERSION, ManifestEntry, PayloadManifest};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What to take from a directory.
#[derive(Clone, Debug, Default)]
pub struct PayloadSource {
    pub root: PathBuf,
    /// Paths relative to the root; empty means the whole root.
    pub locations: Vec<String>,
    /// Gitignore-style patterns.
    pub excludes: Vec<String>,
    /// Where to keep the stat cache that spares re-hashing unchanged files (None: hash everything).
    pub cache_dir: Option<PathBuf>,
}

/// A built payload: its manifest, id, and where each file is on disk.
#[derive(Clone, Debug)]
pub struct Payload {
    pub manifest: PayloadManifest,
    /// Canonical JSON of the manifest, exactly as sealed on the volume.
    pub manifest_bytes: Vec<u8>,
    /// Hex sha256 of `manifest_bytes`.
    pub id: String,
    /// Absolute path of every manifest entry, by relative path.
    pub files: BTreeMap<String, PathBuf>,
}

/// A payload cannot be built; every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("payload location {location:?}: {reason}")]
    Location { location: String, reason: String },
    #[error("payload file {path:?}: symlink points outside the payload root (to {target})")]
    SymlinkEscape { path: String, target: String },
    #[error("payload file {path:?}: {kind} files cannot be part of a payload")]
    NotRegular { path: String, kind: &'static str },
    #[error("payload exclude pattern {pattern:?}: {reason}")]
    Exclude { pattern: String, reason: String },
    #[error("payload file {path:?}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("payload root {root}: {source}")]
    Root { root: String, source: std::io::Error },
}

/// Refuses what could leave the root: absolute paths, `..`, empty components.
pub fn normalize(location: &str) -> Result<String, String> {
    let p = Path::new(location);
    if p.is_absolute() {
        return Err("must be relative to the payload root".into());
    }
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str().ok_or("is not UTF-8")?.to_owned()),
            Component::CurDir => {}
            Component::ParentDir => return Err("must not contain '..'".into()),
            Component::RootDir | Component::Prefix(_) => return Err("must be relative to the payload root".into()),
        }
    }
    Ok(parts.join("/"))
}

/// One hashed file: relative path, absolute path, size, mode and its stat-cache entry.
type Hashed = (String, PathBuf, u64, u32, CacheEntry);

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct CacheEntry {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    inode: u64,
    sha256: String,
}

/// Hex sha256 of a file, streaming, through aws-lc-rs (the SHA extensions or AVX2 assembly
/// OpenSSL uses; the sha2 crate reaches about 0.75 of it on this project's build machine).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 1 << 18];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finish().as_ref()))
}

/// A file found by the walk: payload path, local path, stat.
type Found = (String, PathBuf, std::fs::Metadata);

/// Hashes one file, or takes its hash from the stat cache when nothing about it changed.
fn hash_one((rel, path, md): &Found, cache: &BTreeMap<String, CacheEntry>) -> Result<Hashed, ManifestError> {
    let stat = CacheEntry {
        size: md.len(),
        mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
        ctime_ns: i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec()),
        inode: md.ino(),
        sha256: String::new(),
    };
    // The stat cache spares reading unchanged files; ctime and inode cannot be set back by tools
    // that preserve mtime, so an edit always shows.
    let sha256 = match cache.get(rel) {
        Some(c)
            if c.size == stat.size
                && c.mtime_ns == stat.mtime_ns
                && c.ctime_ns == stat.ctime_ns
                && c.inode == stat.inode =>
        {
            c.sha256.clone()
        }
        _ => sha256_file(path).map_err(|source| ManifestError::Io { path: rel.clone(), source })?,
    };
    Ok((rel.clone(), path.clone(), md.len(), md.permissions().mode() & 0o7777, CacheEntry { sha256, ..stat }))
}

/// Hashes every file on every core (up to 8). Threads take the next file from one shared queue,
/// largest first, so no thread is left with all the large files while the others idle.
fn hash_all(items: &[Found], cache: &BTreeMap<String, CacheEntry>) -> Vec<Result<Hashed, ManifestError>> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(items[i].2.len()));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(2, std::num::NonZero::get).min(8).min(items.len().max(1));
    let mut out: Vec<(usize, Result<Hashed, ManifestError>)> = Vec::with_capacity(items.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = vec![];
                    while let Some(&i) = order.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                        mine.push((i, hash_one(&items[i], cache)));
                    }
                    mine
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(part) => out.extend(part),
                // A lost thread must not silently drop files from the manifest.
                Err(_) => out.push((
                    usize::MAX,
                    Err(ManifestError::Io {
                        path: "<hashing>".into(),
                        source: std::io::Error::other("a hashing thread panicked"),
                    }),
                )),
            }
        }
    });
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

fn cache_path(dir: &Path, root: &Path) -> PathBuf {
    dir.join(format!("{}.json", hex::encode(Sha256::digest(root.to_string_lossy().as_bytes()))))
}

impl Payload {
    /// Builds the manifest of `src`, hashing files in parallel.
    pub fn build(src: &PayloadSource) -> Result<Self, ManifestError> {
        let root = src
            .root
            .canonicalize()
            .map_err(|source| ManifestError::Root { root: src.root.display().to_string(), source })?;
        let ignore = {
            let mut b = ignore::gitignore::GitignoreBuilder::new(&root);
            for pat in &src.excludes {
                b.add_line(None, pat)
                    .map_err(|e| ManifestError::Exclude { pattern: pat.clone(), reason: e.to_string() })?;
            }
            b.build().map_err(|e| ManifestError::Exclude { pattern: src.excludes.join(" "), reason: e.to_string() })?
        };
        let locations = if src.locations.is_empty() { vec![".".to_owned()] } else { src.locations.clone() };
        let mut found: BTreeMap<String, (PathBuf, std::fs::Metadata)> = BTreeMap::new();
        for loc in &locations {
            let rel = normalize(loc).map_err(|reason| ManifestError::Location { location: loc.clone(), reason })?;
            let abs = if rel.is_empty() { root.clone() } else { root.join(&rel) };
            if std::fs::symlink_metadata(&abs).is_err() {
                return Err(ManifestError::Location { location: loc.clone(), reason: "does not exist".into() });
            }
            walk(&root, &abs, &rel, &ignore, &mut found)?;
        }
        let cache_file = src.cache_dir.as_ref().map(|d| cache_path(d, &root));
        let cache: BTreeMap<String, CacheEntry> = cache_file
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let items: Vec<Found> = found.into_iter().map(|(k, (p, m))| (k, p, m)).collect();
        let hashed = hash_all(&items, &cache);
        let mut files = BTreeMap::new();
        let mut entries = Vec::new();
        let mut new_cache = BTreeMap::new();
        for item in hashed {
            let (rel, path, size, mode, c) = item?;
            entries.push(ManifestEntry { path: rel.clone(), size, sha256: c.sha256.clone(), mode, md5: None });
            files.insert(rel.clone(), path);
            new_cache.insert(rel, c);
        }
        entries.sort();
        if let Some(p) = cache_file {
            if let Some(d) = p.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            if let Ok(bytes) = serde_json::to_vec(&new_cache) {
                let tmp = p.with_extension("tmp");
                if std::fs::write(&tmp, bytes).is_ok() {
                    let _ = std::fs::rename(&tmp, &p);
                }
            }
        }
        let manifest = PayloadManifest { version: FORMAT_VERSION, files: entries };
        Ok(Self::from_manifest(manifest, files))
    }

    /// A payload from an existing manifest and file locations.
    pub fn from_manifest(manifest: PayloadManifest, files: BTreeMap<String, PathBuf>) -> Self {
        let manifest_bytes = serde_json::to_vec(&manifest).unwrap_or_default();
        let id = hex::encode(Sha256::digest(&manifest_bytes));
        Self { manifest, manifest_bytes, id, files }
    }

    /// A payload from in-memory files (ConfigMap keys are file names).
    pub fn from_memory(files: &BTreeMap<String, Vec<u8>>, staging: &Path) -> Result<Self, ManifestError> {
        let mut entries = Vec::new();
        let mut paths = BTreeMap::new();
        for (name, data) in files {
            let rel = normalize(name).map_err(|reason| ManifestError::Location { location: name.clone(), reason })?;
            let path = staging.join(&rel);
            if let Some(d) = path.parent() {
                std::fs::create_dir_all(d).map_err(|source| ManifestError::Io { path: rel.clone(), source })?;
            }
            std::fs::write(&path, data).map_err(|source| ManifestError::Io { path: rel.clone(), source })?;
            entries.push(ManifestEntry {
                path: rel.clone(),
                size: data.len() as u64,
                sha256: hex::encode(Sha256::digest(data)),
                mode: 0o644,
                md5: None,
            });
            paths.insert(rel, path);
        }
        entries.sort();
        Ok(Self::from_manifest(PayloadManifest { version: FORMAT_VERSION, files: entries }, paths))
    }
}

fn walk(
    root: &Path,
    abs: &Path,
    rel: &str,
    ignore: &ignore::gitignore::Gitignore,
    out: &mut BTreeMap<String, (PathBuf, std::fs::Metadata)>,
) -> Result<(), ManifestError> {
    let io = |source| ManifestError::Io { path: rel.to_owned(), source };
    let lmd = std::fs::symlink_metadata(abs).map_err(io)?;
    let (path, md) = if lmd.file_type().is_symlink() {
        let target = abs.canonicalize().map_err(io)?;
        if !target.starts_with(root) {
            return Err(ManifestError::SymlinkEscape { path: rel.to_owned(), target: target.display().to_string() });
        }
        let md = std::fs::metadata(&target).map_err(io)?;
        (target, md)
    } else {
        (abs.to_path_buf(), lmd)
    };
    if !rel.is_empty() && ignore.matched_path_or_any_parents(abs, md.is_dir()).is_ignore() {
        return Ok(());
    }
    let ft = md.file_type();
    if ft.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(&path).map_err(io)?.flatten().collect();
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let child = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            walk(root, &abs.join(e.file_name()), &child, ignore, out)?;
        }
        return Ok(());
    }
    let kind = if ft.is_file() {
        None
    } else if ft.is_block_device() || ft.is_char_device() {
        Some("device")
    } else if ft.is_fifo() {
        Some("fifo")
    } else if ft.is_socket() {
        Some("socket")
    } else {
        Some("special")
    };
    if let Some(kind) = kind {
        return Err(ManifestError::NotRegular { path: rel.to_owned(), kind });
    }
    out.insert(rel.to_owned(), (path, md));
    Ok(())
}

/// The part of a sealed manifest an experiment declares: the files under `locations` (all when
/// empty) that no `excludes` pattern (gitignore syntax, as at push time) matches. Used for payloads
/// pushed by digest, whose manifest was built with whatever the pusher chose: the run gets only
/// what the Experiment declares, whatever was pushed. A location that holds no file is an error,
/// as when building from a directory.
pub fn select(
    manifest: &PayloadManifest,
    locations: &[String],
    excludes: &[String],
) -> Result<PayloadManifest, ManifestError> {
    let root = Path::new("/");
    let mut b = ignore::gitignore::GitignoreBuilder::new(root);
    for pat in excludes {
        b.add_line(None, pat).map_err(|e| ManifestError::Exclude { pattern: pat.clone(), reason: e.to_string() })?;
    }
    let ignore =
        b.build().map_err(|e| ManifestError::Exclude { pattern: excludes.join(" "), reason: e.to_string() })?;
    let mut roots = Vec::new();
    for loc in locations {
        let rel = normalize(loc).map_err(|reason| ManifestError::Location { location: loc.clone(), reason })?;
        roots.push((loc, rel));
    }
    let under = |path: &str, rel: &str| rel.is_empty() || path == rel || path.starts_with(&format!("{rel}/"));
    for (loc, rel) in &roots {
        if !manifest.files.iter().any(|f| under(&f.path, rel)) {
            return Err(ManifestError::Location {
                location: (*loc).clone(),
                reason: "is not in the pushed payload".into(),
            });
        }
    }
    let files = manifest
        .files
        .iter()
        .filter(|f| roots.is_empty() || roots.iter().any(|(_, rel)| under(&f.path, rel)))
        .filter(|f| !ignore.matched_path_or_any_parents(root.join(&f.path), false).is_ignore())
        .cloned()
        .collect();
    Ok(PayloadManifest { version: manifest.version, files })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("src/pkg")).unwrap();
        std::fs::create_dir_all(r.join("data")).unwrap();
        std::fs::create_dir_all(r.join("__pycache__")).unwrap();
        std::fs::write(r.join("train.py"), "print(1)\n").unwrap();
        std::fs::write(r.join("src/pkg/model.py"), "x = 1\n").unwrap();
        std::fs::write(r.join("src/pkg/model.pyc"), "bin").unwrap();
        std::fs::write(r.join("data/big.csv"), "a,b\n").unwrap();
        std::fs::write(r.join("__pycache__/x.pyc"), "bin").unwrap();
        std::fs::write(r.join("notes.md"), "n").unwrap();
        d
    }

    fn paths(p: &Payload) -> Vec<&str> {
        p.manifest.files.iter().map(|f| f.path.as_str()).collect()
    }

    #[test]
    fn a_pushed_manifest_narrowed_to_the_declared_part_equals_building_that_part() {
        let d = tree();
        let pushed = Payload::build(&PayloadSource { root: d.path().into(), ..PayloadSource::default() }).unwrap();
        for (locations, excludes) in [
            (vec!["train.py", "src"], vec!["*.pyc"]),
            (vec![], vec!["__pycache__/", "*.pyc", "/data"]),
            (vec!["src/pkg"], vec![]),
            (vec![], vec![]),
        ] {
            let locations: Vec<String> = locations.into_iter().map(Into::into).collect();
            let excludes: Vec<String> = excludes.into_iter().map(Into::into).collect();
            let built = Payload::build(&PayloadSource {
                root: d.path().into(),
                locations: locations.clone(),
                excludes: excludes.clone(),
                cache_dir: None,
            })
            .unwrap();
            let narrowed = select(&pushed.manifest, &locations, &excludes).unwrap();
            assert_eq!(narrowed, built.manifest, "{locations:?} {excludes:?}");
        }
        let err = select(&pushed.manifest, &["model/".into()], &[]).unwrap_err();
        assert!(err.to_string().contains("is not in the pushed payload"), "{err}");
    }

    #[test]
    fn declared_locations_and_excludes() {
        let d = tree();
        let src = PayloadSource {
            root: d.path().into(),
            locations: vec!["train.py".into(), "src".into()],
            excludes: vec!["*.pyc".into()],
            cache_dir: None,
        };
        let p = Payload::build(&src).unwrap();
        assert_eq!(paths(&p), ["src/pkg/model.py", "train.py"]);
        let all = Payload::build(&PayloadSource {
            root: d.path().into(),
            excludes: vec!["__pycache__/".into(), "*.pyc".into(), "/data".into()],
            ..PayloadSource::default()
        })
        .unwrap();
        assert_eq!(paths(&all), ["notes.md", "src/pkg/model.py", "train.py"]);
        let e = &all.manifest.files[2];
        assert_eq!(e.sha256, hex::encode(Sha256::digest(b"print(1)\n")));
        assert_eq!(e.size, 9);
        assert_eq!(e.mode & 0o600, 0o600);
    }

    #[test]
    fn the_id_is_the_sha256_of_the_manifest_and_ignores_mtime() {
        let d = tree();
        let src = PayloadSource { root: d.path().into(), ..PayloadSource::default() };
        let a = Payload::build(&src).unwrap();
        assert_eq!(a.id, hex::encode(Sha256::digest(&a.manifest_bytes)));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(d.path().join("train.py"), "print(1)\n").unwrap();
        assert_eq!(Payload::build(&src).unwrap().id, a.id, "same bytes, new mtime: same payload");
        std::fs::write(d.path().join("train.py"), "print(2)\n").unwrap();
        assert_ne!(Payload::build(&src).unwrap().id, a.id);
    }

    #[test]
    fn the_stat_cache_never_hides_an_edit() {
        let d = tree();
        let cache = tempfile::tempdir().unwrap();
        let src =
            PayloadSource { root: d.path().into(), cache_dir: Some(cache.path().into()), ..PayloadSource::default() };
        let first = Payload::build(&src).unwrap();
        // Same size, content changed, mtime set back: ctime still moves, so the file is re-hashed.
        let f = d.path().join("train.py");
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, "print(9)\n").unwrap();
        File::options().write(true).open(&f).unwrap().set_modified(mtime).unwrap();
        let second = Payload::build(&src).unwrap();
        assert_ne!(second.id, first.id);
        assert_eq!(
            second.manifest.files.iter().find(|e| e.path == "train.py").unwrap().sha256,
            hex::encode(Sha256::digest(b"print(9)\n"))
        );
    }

    #[test]
    fn paths_are_confined_to_the_root() {
        let d = tree();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        for (loc, want) in [
            ("../x", "must not contain '..'"),
            ("/etc/passwd", "must be relative"),
            ("src/../../x", "'..'"),
            ("missing", "does not exist"),
        ] {
            let err = Payload::build(&PayloadSource {
                root: d.path().into(),
                locations: vec![loc.into()],
                ..PayloadSource::default()
            })
            .unwrap_err()
            .to_string();
            assert!(err.contains(loc) && err.contains(want), "{loc}: {err}");
        }
        std::os::unix::fs::symlink(outside.path().join("secret"), d.path().join("src/leak")).unwrap();
        let err = Payload::build(&PayloadSource { root: d.path().into(), ..PayloadSource::default() })
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"src/leak\"") && err.contains("symlink points outside the payload root"), "{err}");
        std::fs::remove_file(d.path().join("src/leak")).unwrap();
        std::os::unix::fs::symlink(d.path().join("train.py"), d.path().join("src/inside")).unwrap();
        let ok = Payload::build(&PayloadSource { root: d.path().into(), ..PayloadSource::default() }).unwrap();
        assert!(paths(&ok).contains(&"src/inside"), "a symlink inside the root is taken as its content");
    }

    #[test]
    fn special_files_are_refused() {
        let d = tree();
        let status = std::process::Command::new("mkfifo").arg(d.path().join("pipe")).status().unwrap();
        assert!(status.success());
        let err = Payload::build(&PayloadSource { root: d.path().into(), ..PayloadSource::default() })
            .unwrap_err()
            .to_string();
        assert_eq!(err, "payload file \"pipe\": fifo files cannot be part of a payload");
    }

    #[test]
    fn configmap_payloads() {
        let staging = tempfile::tempdir().unwrap();
        let files = BTreeMap::from([("train.py".to_owned(), b"print(1)\n".to_vec())]);
        let p = Payload::from_memory(&files, staging.path()).unwrap();
        assert_eq!(paths(&p), ["train.py"]);
        let bad = BTreeMap::from([("../x".to_owned(), b"x".to_vec())]);
        assert!(Payload::from_memory(&bad, staging.path()).is_err());
    }
}
