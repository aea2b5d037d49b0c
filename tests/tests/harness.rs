//! The harness itself: a throwaway PostgreSQL, and kubectl/helm from the npm package.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers panic on setup failure by design

use std::process::Command;

use ep_testkit::postgres::TempPostgres;
use ep_testkit::tools;
use sqlx::Connection;

#[tokio::test]
async fn throwaway_postgres_starts_serves_and_goes_away() {
    let pg = TempPostgres::start().unwrap();
    let url = pg.create_database("harness").await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut conn).await.unwrap();
    assert_eq!(one, 1);
    conn.close().await.unwrap();
    let port = pg.port();
    drop(pg);
    assert!(
        sqlx::PgConnection::connect(&format!("postgres://postgres@127.0.0.1:{port}/harness")).await.is_err(),
        "stopped on drop"
    );
}

#[test]
fn two_clusters_run_side_by_side() {
    let a = TempPostgres::start().unwrap();
    let b = TempPostgres::start().unwrap();
    assert_ne!(a.port(), b.port());
}

#[test]
fn kubectl_and_helm_are_the_expected_versions() {
    let kubectl = tools::kubectl().unwrap();
    let out = Command::new(&kubectl).args(["version", "--client", "-o", "json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["clientVersion"]["minor"], "35", "{v}");
    let helm = tools::helm().unwrap();
    let out = Command::new(&helm).args(["version", "--short"]).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("v4."), "{}", String::from_utf8_lossy(&out.stdout));
}
