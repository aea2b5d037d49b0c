//! Payload sync against runpod-sim's S3: only what the volume lacks is written, everything is
//! verified on the volume (one listing, or head_object), the manifest is sealed last, and RunPod's
//! faults are survived.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure by design

use std::sync::Mutex;

use ep_api::volume::keys;
use ep_testkit::volume::SimVolume;
use ep_volume::sync::{Progress, SyncOptions, push};
use ep_volume::{Payload, PayloadSource, VolumeStore};

fn payload_dir(files: usize) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("pkg")).unwrap();
    for i in 0..files {
        std::fs::write(d.path().join(format!("pkg/m{i}.py")), format!("x = {i}\n")).unwrap();
    }
    std::fs::write(d.path().join("train.py"), "print('train')\n").unwrap();
    std::fs::write(d.path().join("dup.py"), "x = 0\n").unwrap();
    d
}

fn build(dir: &std::path::Path) -> Payload {
    Payload::build(&PayloadSource { root: dir.into(), ..PayloadSource::default() }).unwrap()
}

#[tokio::test]
async fn first_push_uploads_verifies_and_seals_then_nothing_more() {
    let v = SimVolume::start(|_, _| {}).await.unwrap();
    let d = payload_dir(10);
    let p = build(d.path());
    let seen = Mutex::new(Vec::<Progress>::new());
    let r = push(&v.store, &p, &SyncOptions::default(), &|pr| seen.lock().unwrap().push(pr)).await.unwrap();
    assert_eq!((r.files_total, r.uploaded_files, r.manifest_written), (12, 11, true), "dup.py shares m0.py's blob");
    let last = *seen.lock().unwrap().last().unwrap();
    assert_eq!((last.files_done, last.files_total, last.bytes_done), (11, 11, last.bytes_total));
    assert_eq!(last.bytes_total, r.bytes_total - 6, "a duplicate content moves once");
    // The sealed manifest is on the volume, byte for byte; blobs are content-addressed.
    assert_eq!(std::fs::read(v.workspace.join(keys::payload_manifest(&p.id))).unwrap(), p.manifest_bytes);
    let train = p.manifest.files.iter().find(|f| f.path == "train.py").unwrap();
    assert_eq!(std::fs::read(v.workspace.join(keys::payload_blob(&train.sha256))).unwrap(), b"print('train')\n");
    // Sealed already: one request, nothing written.
    let again = push(&v.store, &p, &SyncOptions::default(), &|_| {}).await.unwrap();
    assert!(again.already_sealed);
    assert_eq!((again.uploaded_files, again.requests), (0, 1));
}

#[tokio::test]
async fn one_changed_file_writes_one_object_and_one_manifest() {
    let v = SimVolume::start(|_, _| {}).await.unwrap();
    let d = payload_dir(50);
    let first = build(d.path());
    push(&v.store, &first, &SyncOptions::default(), &|_| {}).await.unwrap();
    std::fs::write(d.path().join("pkg/m7.py"), "x = 'changed'\n").unwrap();
    let second = build(d.path());
    assert_ne!(second.id, first.id);
    let r =
        push(&v.store, &second, &SyncOptions { previous: Some(first.id.clone()), ..SyncOptions::default() }, &|_| {})
            .await
            .unwrap();
    assert_eq!((r.uploaded_files, r.manifest_written), (1, true));
    // get previous manifest, head new manifest, head+put+head the blob, put+head the manifest.
    assert_eq!(r.requests, 7, "{r:?}");
    // Without a previous manifest every blob is checked by one listing, still only one written:
    // head manifest, list, put blob, list, put+head manifest.
    std::fs::write(d.path().join("pkg/m8.py"), "x = 'again'\n").unwrap();
    let third = build(d.path());
    let r = push(&v.store, &third, &SyncOptions::default(), &|_| {}).await.unwrap();
    assert_eq!(r.uploaded_files, 1);
    assert_eq!(r.requests, 6, "{r:?}");
}

/// Every blob of the payload is on the volume with its content.
fn all_there(v: &SimVolume, p: &Payload) {
    for f in &p.manifest.files {
        let on_volume = std::fs::read(v.workspace.join(keys::payload_blob(&f.sha256)));
        assert_eq!(on_volume.ok().map(|b| b.len() as u64), Some(f.size), "{} missing after the sync", f.path);
    }
}

#[tokio::test]
async fn a_first_push_costs_about_one_request_per_file_and_a_lost_upload_is_made_again() {
    let v = SimVolume::start(|_, _| {}).await.unwrap();
    let d = payload_dir(200);
    let p = build(d.path());
    // Two uploads answer 200 and never land: the listing after the uploads shows they are not
    // there, and they go up again before the manifest is sealed.
    v.faults(serde_json::json!({"s3PutLost": 2})).await;
    let r = push(&v.store, &p, &SyncOptions::default(), &|_| {}).await.unwrap();
    assert_eq!(v.world().await["faults"]["s3PutLost"], 0, "the lost uploads happened");
    all_there(&v, &p);
    assert_eq!(r.uploaded_files, 201);
    // 201 puts, head manifest, 2 listings, head + put + head for each lost one, put + head manifest.
    assert_eq!(r.requests, 201 + 1 + 2 + 2 * 3 + 2, "{r:?}");
}

#[tokio::test]
async fn a_listing_runpod_cannot_page_falls_back_to_head_object() {
    let v = SimVolume::start(|_, _| {}).await.unwrap();
    v.faults(serde_json::json!({"s3RepeatContinuationToken": true, "s3PutLost": 1})).await;
    let d = payload_dir(2100); // three pages of 1,000 keys: the third repeats the second's token
    let p = build(d.path());
    let r = push(&v.store, &p, &SyncOptions::default(), &|_| {}).await.unwrap();
    all_there(&v, &p);
    assert_eq!(r.uploaded_files, 2101);
    assert!(r.requests > 2 * 2101, "each upload verified with HEAD: {} requests", r.requests);
}

#[tokio::test]
async fn large_files_go_multipart_and_a_524_on_complete_is_checked_not_repeated() {
    let v = SimVolume::start(|_, s| {
        s.multipart_threshold = 1 << 20;
        s.part_size = 1 << 20;
    })
    .await
    .unwrap();
    v.faults(serde_json::json!({"s3CompleteTimeouts": 1})).await;
    let d = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..(3 << 20) + 123).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(d.path().join("weights.bin"), &big).unwrap();
    let p = build(d.path());
    let r = push(&v.store, &p, &SyncOptions::default(), &|_| {}).await.unwrap();
    assert_eq!(r.uploaded_files, 1);
    assert_eq!(std::fs::read(v.workspace.join(keys::payload_blob(&p.manifest.files[0].sha256))).unwrap(), big);
}

#[tokio::test]
async fn transient_502s_on_put_are_survived() {
    let v = SimVolume::start(|_, _| {}).await.unwrap();
    // Three 502s in a row on one upload: more than the SDK's own three attempts, so the sync's
    // head-then-retry has to carry it.
    v.faults(serde_json::json!({"s3Put502": 3})).await;
    let d = payload_dir(5);
    let p = build(d.path());
    let r = push(&v.store, &p, &SyncOptions { parallelism: 1, ..SyncOptions::default() }, &|_| {}).await.unwrap();
    assert_eq!(r.uploaded_files, 6);
    assert!(v.store.head(&keys::payload_manifest(&p.id)).await.unwrap().is_some());
    assert_eq!(v.world().await["faults"]["s3Put502"], 0, "the injected 502s were met and retried");
}

#[tokio::test]
async fn a_full_volume_fails_the_sync_and_leaves_it_unsealed() {
    let v = SimVolume::start(|c, _| c.volumes[0].size_gb = 0).await.unwrap();
    let d = payload_dir(2);
    let p = build(d.path());
    let err = push(&v.store, &p, &SyncOptions::default(), &|_| {}).await.unwrap_err();
    assert!(err.to_string().contains("InsufficientStorage") && err.to_string().contains("HTTP 507"), "{err}");
    assert!(v.store.head(&keys::payload_manifest(&p.id)).await.unwrap().is_none(), "never sealed");
}

#[tokio::test]
async fn a_blob_whose_bytes_are_not_its_sha256_is_refused_by_the_server() {
    // The PUT's signature carries the sha256 the blob is named by as its payload hash, so the
    // server checks the bytes it received against it (S3: XAmzContentSHA256Mismatch).
    let v = SimVolume::start(|_, _| {}).await.unwrap();
    let wrong = "0".repeat(64);
    let err = v.store.put_bytes(&keys::payload_blob(&wrong), bytes::Bytes::from_static(b"hello"), &wrong).await;
    let err = err.unwrap_err().to_string();
    assert!(err.contains("Sha256Mismatch") && err.contains("HTTP 400"), "{err}");
    assert!(!v.workspace.join(keys::payload_blob(&wrong)).exists(), "nothing landed");
}
