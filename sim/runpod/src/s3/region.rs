//! RunPod documents the data center id (`EU-RO-1`) as the S3 region, and clients sign with it.
//! s3s 0.14 checks the signature but then refuses any region that is not lower case. This layer
//! verifies such a request's SigV4 header signature itself, with the region as sent, then signs the
//! same canonical request again with the lower-cased region, so s3s accepts it and still checks
//! the request. Lower-case requests pass through untouched. (Signed aws-chunked payloads chain
//! chunk signatures from the original one and cannot be re-signed: such clients must send a
//! lower-case region; see README.)

use hmac::{KeyInit, Mac};
use hyper::Request;
use hyper::header::AUTHORIZATION;
use sha2_next::{Digest, Sha256};

type HmacSha256 = hmac::Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length; the error arm cannot happen.
    let mut m = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The SigV4 header signature of `req` with `region`, or None when the request lacks what is needed.
fn signature<B>(
    req: &Request<B>,
    secret: &str,
    date: &str,
    region: &str,
    service: &str,
    signed: &str,
) -> Option<String> {
    let h = req.headers();
    let amz_date = h.get("x-amz-date")?.to_str().ok()?;
    let payload = h.get("x-amz-content-sha256")?.to_str().ok()?;
    let mut query: Vec<(String, String)> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (encode(&decode(k)), encode(&decode(v)))
        })
        .collect();
    query.sort();
    let query: Vec<String> = query.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut headers = String::new();
    for name in signed.split(';') {
        let value = if name == "host" && !h.contains_key("host") {
            req.uri().authority()?.to_string()
        } else {
            let vals: Vec<String> = h
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect();
            vals.join(",")
        };
        headers.push_str(&format!("{name}:{value}\n"));
    }
    let canonical =
        format!("{}\n{}\n{}\n{headers}\n{signed}\n{payload}", req.method(), req.uri().path(), query.join("&"));
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let to_sign =
        format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}", hex::encode(Sha256::digest(canonical.as_bytes())));
    let key = [date, region, service, "aws4_request"]
        .iter()
        .fold(format!("AWS4{secret}").into_bytes(), |k, part| hmac(&k, part.as_bytes()));
    Some(hex::encode(hmac(&key, to_sign.as_bytes())))
}

/// Rewrites an upper-case credential region to lower case after checking the signature.
/// `Err` carries the reason for a 403 when the signature does not match.
pub fn fold<B>(mut req: Request<B>, access_key: &str, secret: &str) -> Result<Request<B>, String> {
    let Some(auth) = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned) else {
        return Ok(req);
    };
    let Some(rest) = auth.strip_prefix("AWS4-HMAC-SHA256 ") else { return Ok(req) };
    let mut cred = None;
    let mut signed = None;
    let mut sig = None;
    for part in rest.split(',').map(str::trim) {
        if let Some(v) = part.strip_prefix("Credential=") {
            cred = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            sig = Some(v);
        }
    }
    let (Some(cred), Some(signed), Some(sig)) = (cred, signed, sig) else { return Ok(req) };
    let fields: Vec<&str> = cred.split('/').collect();
    let [ak, date, region, service, "aws4_request"] = fields.as_slice() else { return Ok(req) };
    let lower = region.to_ascii_lowercase();
    if *region == lower || *ak != access_key {
        return Ok(req);
    }
    match signature(&req, secret, date, region, service, signed) {
        Some(expected) if expected == sig => {}
        Some(_) => return Err("The request signature we calculated does not match the signature you provided.".into()),
        None => return Ok(req),
    }
    let Some(resigned) = signature(&req, secret, date, &lower, service, signed) else { return Ok(req) };
    let header = format!(
        "AWS4-HMAC-SHA256 Credential={ak}/{date}/{lower}/{service}/aws4_request, SignedHeaders={signed}, Signature={resigned}"
    );
    if let Ok(v) = header.parse() {
        req.headers_mut().insert(AUTHORIZATION, v);
    }
    Ok(req)
}
