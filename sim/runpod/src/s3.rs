//! The network volume's S3 API over the volume directory, with RunPod's limits and quirks
//! (runpod-api.md section 8): bucket = volume id, path style, SigV4 checked, MD5 ETags, single PUT
//! below 500 MiB, 507 when the volume is full, no batch delete, empty directories listed.
//!
//! s3s-fs is not used: it writes an object before checking its checksum, and RunPod's limits
//! need hooks it does not have. Objects are verified before they land.

mod region;
mod store;

use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;

use crate::Sim;
use crate::config::S3Credentials;

pub use store::{MAX_PART_BYTES, MAX_PUT_BYTES, Volumes};

/// Serves S3 on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, sim: Arc<Sim>, creds: S3Credentials) {
    let mut builder = S3ServiceBuilder::new(Volumes::new(sim));
    builder.set_auth(SimpleAuth::from_single(creds.access_key.clone(), creds.secret_key.clone()));
    let service = builder.build();
    let creds = Arc::new(creds);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let service = service.clone();
        let creds = creds.clone();
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let service = service.clone();
            let creds = creds.clone();
            async move {
                match region::fold(req, &creds.access_key, &creds.secret_key) {
                    Ok(req) => hyper::service::Service::call(&service, req).await,
                    Err(message) => {
                        let body = format!(
                            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SignatureDoesNotMatch</Code><Message>{message}</Message></Error>"
                        );
                        Ok(http::Response::builder()
                            .status(403)
                            .header("content-type", "application/xml")
                            .body(s3s::Body::from(body))
                            .unwrap_or_default())
                    }
                }
            }
        });
        tokio::spawn(async move {
            if let Err(e) = Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(error = %e, "S3 connection ended with an error");
            }
        });
    }
}
