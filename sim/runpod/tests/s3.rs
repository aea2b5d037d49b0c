//! The network-volume S3 API with aws-sdk-s3, configured as the operator uses it: path style,
//! request checksums only when required, region = data center id (lower case, see README).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure by design

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumMode, CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier,
};
use runpod_sim::{RunningSim, WorldConfig};

const VOL: &str = "tgb8bx6fwl";

async fn sim(patch: impl FnOnce(&mut WorldConfig)) -> (RunningSim, Client, tempfile::TempDir) {
    sim_in("eu-ro-1", patch).await
}

async fn sim_in(region: &str, patch: impl FnOnce(&mut WorldConfig)) -> (RunningSim, Client, tempfile::TempDir) {
    let mut config = WorldConfig { s3_max_put_bytes: 1 << 20, ..WorldConfig::default() };
    patch(&mut config);
    let (running, dir) = ep_testkit::volume::start_runpod_sim(config).await.unwrap();
    let e = &running.endpoints;
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .endpoint_url(&e.s3)
        .force_path_style(true)
        .credentials_provider(Credentials::new(&e.s3_access_key, &e.s3_secret_key, None, None, "test"))
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    (running, Client::from_conf(conf), dir)
}

/// Starts a multipart upload of one part; returns the upload id and the parts to complete with.
async fn one_part_upload(s3: &Client, key: &str, body: &'static [u8]) -> (String, CompletedMultipartUpload) {
    let up = s3.create_multipart_upload().bucket(VOL).key(key).send().await.unwrap();
    let id = up.upload_id().unwrap().to_owned();
    let p = s3
        .upload_part()
        .bucket(VOL)
        .key(key)
        .upload_id(&id)
        .part_number(1)
        .body(ByteStream::from_static(body))
        .send()
        .await
        .unwrap();
    let parts = CompletedMultipartUpload::builder()
        .parts(CompletedPart::builder().part_number(1).e_tag(p.e_tag().unwrap()).build())
        .build();
    (id, parts)
}

fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    hex::encode(md5::Md5::digest(data))
}

fn b64_sha256(data: &[u8]) -> String {
    use base64::Engine;
    use sha2::Digest;
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(data))
}

#[tokio::test]
async fn put_head_get_list_delete_with_md5_etags() {
    let (_sim, s3, _dir) = sim(|_| {}).await;
    let body = b"print('hello')\n".to_vec();
    let put = s3
        .put_object()
        .bucket(VOL)
        .key("ep/payloads/abc/train.py")
        .metadata("sha256", "deadbeef")
        .body(ByteStream::from(body.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(put.e_tag(), Some(format!("\"{}\"", md5_hex(&body)).as_str()));
    let head = s3.head_object().bucket(VOL).key("ep/payloads/abc/train.py").send().await.unwrap();
    assert_eq!(head.content_length(), Some(i64::try_from(body.len()).unwrap()));
    assert_eq!(head.metadata().unwrap()["sha256"], "deadbeef", "user metadata survives");
    let got = s3.get_object().bucket(VOL).key("ep/payloads/abc/train.py").range("bytes=0-4").send().await.unwrap();
    assert_eq!(got.body.collect().await.unwrap().into_bytes().as_ref(), b"print");
    s3.put_object().bucket(VOL).key("ep/runs/").body(ByteStream::from_static(b"")).send().await.unwrap();
    let listed = s3.list_objects_v2().bucket(VOL).prefix("ep/").send().await.unwrap();
    let keys: Vec<&str> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys, ["ep/payloads/abc/train.py", "ep/runs/"], "empty directories are listed, like RunPod");
    let with_delim = s3.list_objects_v2().bucket(VOL).prefix("ep/").delimiter("/").send().await.unwrap();
    let prefixes: Vec<&str> = with_delim.common_prefixes().iter().filter_map(|p| p.prefix()).collect();
    assert_eq!(prefixes, ["ep/payloads/", "ep/runs/"]);
    s3.delete_object().bucket(VOL).key("ep/payloads/abc/train.py").send().await.unwrap();
    let gone = s3.head_object().bucket(VOL).key("ep/payloads/abc/train.py").send().await.unwrap_err();
    assert_eq!(gone.raw_response().unwrap().status().as_u16(), 404);
    assert_eq!(s3.list_buckets().send().await.unwrap().buckets()[0].name(), Some(VOL));
    assert_eq!(
        s3.head_bucket().bucket("nope").send().await.unwrap_err().raw_response().unwrap().status().as_u16(),
        404
    );
}

#[tokio::test]
async fn a_wrong_checksum_is_refused_and_nothing_lands() {
    let (_sim, s3, _dir) = sim(|_| {}).await;
    let err = s3
        .put_object()
        .bucket(VOL)
        .key("bad.bin")
        .checksum_sha256(b64_sha256(b"something else"))
        .body(ByteStream::from_static(b"payload"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.raw_response().unwrap().status().as_u16(), 400);
    assert!(s3.head_object().bucket(VOL).key("bad.bin").send().await.is_err(), "a refused object must not be written");
    // The right checksum is accepted and returned on head when asked.
    s3.put_object()
        .bucket(VOL)
        .key("good.bin")
        .checksum_sha256(b64_sha256(b"payload"))
        .body(ByteStream::from_static(b"payload"))
        .send()
        .await
        .unwrap();
    let head = s3.head_object().bucket(VOL).key("good.bin").checksum_mode(ChecksumMode::Enabled).send().await.unwrap();
    assert_eq!(head.checksum_sha256(), Some(b64_sha256(b"payload").as_str()));
    // A client that sends its default CRC32 trailer (aws-chunked) works too.
    s3.put_object()
        .bucket(VOL)
        .key("crc.bin")
        .checksum_algorithm(ChecksumAlgorithm::Crc32)
        .body(ByteStream::from_static(b"payload"))
        .send()
        .await
        .unwrap();
    let got = s3.get_object().bucket(VOL).key("crc.bin").send().await.unwrap();
    assert_eq!(got.body.collect().await.unwrap().into_bytes().as_ref(), b"payload");
}

#[tokio::test]
async fn runpod_limits_single_put_size_batch_delete_and_full_volume() {
    let (_sim, s3, _dir) = sim(|c| {
        c.volumes.push(runpod_sim::config::VolumeConfig {
            id: "tinyvolume".into(),
            name: "tiny".into(),
            size_gb: 0,
            data_center_id: "EU-RO-1".into(),
        });
    })
    .await;
    let big = vec![7u8; (1 << 20) + 1];
    let err = s3.put_object().bucket(VOL).key("big.bin").body(ByteStream::from(big.clone())).send().await.unwrap_err();
    assert_eq!(err.raw_response().unwrap().status().as_u16(), 400, "single PUT at or above the limit is refused");
    assert_eq!(err.as_service_error().and_then(|e| e.meta().code()), Some("EntityTooLarge"));

    // Multipart takes it; parts have no 5 MiB minimum on RunPod.
    let up = s3.create_multipart_upload().bucket(VOL).key("big.bin").send().await.unwrap();
    let id = up.upload_id().unwrap();
    let mut parts = Vec::new();
    for (n, chunk) in big.chunks(300_000).enumerate() {
        let n = i32::try_from(n + 1).unwrap();
        let p = s3
            .upload_part()
            .bucket(VOL)
            .key("big.bin")
            .upload_id(id)
            .part_number(n)
            .body(ByteStream::from(chunk.to_vec()))
            .send()
            .await
            .unwrap();
        parts.push(CompletedPart::builder().part_number(n).e_tag(p.e_tag().unwrap()).build());
    }
    let listed = s3.list_parts().bucket(VOL).key("big.bin").upload_id(id).send().await.unwrap();
    assert_eq!(listed.parts().len(), 4);
    let done = s3
        .complete_multipart_upload()
        .bucket(VOL)
        .key("big.bin")
        .upload_id(id)
        .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
        .send()
        .await
        .unwrap();
    assert_eq!(done.e_tag(), Some(format!("\"{}\"", md5_hex(&big)).as_str()), "the ETag is the MD5 of the file");
    let head = s3.head_object().bucket(VOL).key("big.bin").send().await.unwrap();
    assert_eq!(head.content_length(), Some(i64::try_from(big.len()).unwrap()));

    let err = s3
        .delete_objects()
        .bucket(VOL)
        .delete(Delete::builder().objects(ObjectIdentifier::builder().key("big.bin").build().unwrap()).build().unwrap())
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.raw_response().unwrap().status().as_u16(), 501, "no DeleteObjects on RunPod");

    let full =
        s3.put_object().bucket("tinyvolume").key("x").body(ByteStream::from_static(b"x")).send().await.unwrap_err();
    assert_eq!(full.raw_response().unwrap().status().as_u16(), 507, "a full volume answers 507");
    assert!(s3.head_object().bucket("tinyvolume").key("x").send().await.is_err());
}

#[tokio::test]
async fn complete_that_times_out_has_still_completed() {
    let (_sim, s3, _dir) = sim(|c| c.faults.s3_complete_timeouts = 1).await;
    let (id, parts) = one_part_upload(&s3, "slow.bin", b"abc").await;
    let id = id.as_str();
    let err = s3
        .complete_multipart_upload()
        .bucket(VOL)
        .key("slow.bin")
        .upload_id(id)
        .multipart_upload(parts)
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.raw_response().unwrap().status().as_u16(), 524);
    // What a careful client does: check with head_object before retrying.
    let head = s3.head_object().bucket(VOL).key("slow.bin").send().await.unwrap();
    assert_eq!(head.content_length(), Some(3));
}

#[tokio::test]
async fn complete_502_does_not_complete() {
    let (_sim, s3, _dir) = sim(|c| c.faults.s3_complete_502 = 1).await;
    // No SDK retries, so the 502 itself is observed.
    let s3 = Client::from_conf(
        s3.config().to_builder().retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled()).build(),
    );
    let (id, parts) = one_part_upload(&s3, "k", b"abc").await;
    let id = id.as_str();
    let err = s3
        .complete_multipart_upload()
        .bucket(VOL)
        .key("k")
        .upload_id(id)
        .multipart_upload(parts.clone())
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.raw_response().unwrap().status().as_u16(), 502);
    assert!(s3.head_object().bucket(VOL).key("k").send().await.is_err(), "a 502 completed nothing");
    let uploads = s3.list_multipart_uploads().bucket(VOL).send().await.unwrap();
    assert_eq!(uploads.uploads().len(), 1, "the upload is still pending and can be completed again");
    s3.complete_multipart_upload().bucket(VOL).key("k").upload_id(id).multipart_upload(parts).send().await.unwrap();
    assert_eq!(s3.head_object().bucket(VOL).key("k").send().await.unwrap().content_length(), Some(3));
}

#[tokio::test]
async fn listing_quirks_on_demand() {
    let (sim, s3, _dir) = sim(|c| c.faults.s3_repeat_continuation_token = true).await;
    for i in 0..5 {
        s3.put_object().bucket(VOL).key(format!("k{i}")).body(ByteStream::from_static(b"x")).send().await.unwrap();
    }
    let first = s3.list_objects_v2().bucket(VOL).max_keys(2).send().await.unwrap();
    let t1 = first.next_continuation_token().unwrap().to_owned();
    let second = s3.list_objects_v2().bucket(VOL).max_keys(2).continuation_token(&t1).send().await.unwrap();
    assert_eq!(second.next_continuation_token(), Some(t1.as_str()), "the same token comes back twice");

    // Files written by a pod (not through S3) are missing from listings but found by key.
    std::fs::write(
        std::path::Path::new(&sim.endpoints.state_dir).join("volumes").join(VOL).join("pod-wrote.txt"),
        b"hi",
    )
    .unwrap();
    let all = s3.list_objects_v2().bucket(VOL).prefix("pod").send().await.unwrap();
    assert_eq!(all.contents().len(), 1, "visible while the quirk is off");
    reqwest::Client::new()
        .post(format!("{}/faults", sim.endpoints.admin))
        .json(&serde_json::json!({"s3HidePodFiles": true}))
        .send()
        .await
        .unwrap();
    let hidden = s3.list_objects_v2().bucket(VOL).prefix("pod").send().await.unwrap();
    assert!(hidden.contents().is_empty(), "hidden from listings");
    let head = s3.head_object().bucket(VOL).key("pod-wrote.txt").send().await.unwrap();
    assert_eq!(head.content_length(), Some(2));
    assert_eq!(head.e_tag(), Some(format!("\"{}\"", md5_hex(b"hi")).as_str()), "MD5 computed for pod-written files");
}

#[tokio::test]
async fn keys_cannot_escape_the_volume() {
    let (_sim, s3, _dir) = sim(|_| {}).await;
    for key in ["../escape", "a/../../b", ".s3compat_meta/x"] {
        let r = s3.put_object().bucket(VOL).key(key).body(ByteStream::from_static(b"x")).send().await;
        assert!(r.is_err(), "{key} must be refused");
    }
}

#[tokio::test]
async fn the_data_center_id_works_as_the_region_as_runpod_documents() {
    let (_sim, s3, _dir) = sim_in("EU-RO-1", |_| {}).await;
    s3.put_object()
        .bucket(VOL)
        .key("dir/a b+c.txt")
        .metadata("sha256", "x")
        .body(ByteStream::from_static(b"hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(s3.head_object().bucket(VOL).key("dir/a b+c.txt").send().await.unwrap().content_length(), Some(5));
    let got = s3.get_object().bucket(VOL).key("dir/a b+c.txt").send().await.unwrap();
    assert_eq!(got.body.collect().await.unwrap().into_bytes().as_ref(), b"hello");
    let listed = s3.list_objects_v2().bucket(VOL).prefix("dir/").max_keys(10).send().await.unwrap();
    assert_eq!(listed.contents()[0].key(), Some("dir/a b+c.txt"));
    let (id, parts) = one_part_upload(&s3, "m", b"abc").await;
    let id = id.as_str();
    s3.complete_multipart_upload().bucket(VOL).key("m").upload_id(id).multipart_upload(parts).send().await.unwrap();
    // The signature is still checked: a wrong secret is refused.
    let wrong = Client::from_conf(
        s3.config()
            .to_builder()
            .credentials_provider(Credentials::new("user_2simulator000000000000", "rps_WRONG", None, None, "t"))
            .build(),
    );
    let err = wrong.head_object().bucket(VOL).key("m").send().await.unwrap_err();
    assert_eq!(err.raw_response().unwrap().status().as_u16(), 403);
}
