//! The page: built by `web/ui` (npm + Vite) into `web/ui/dist`, committed, and embedded here,
//! so a proxy serves the UI on a machine without Node. Names are fixed (no content hashes);
//! each file's ETag is its SHA-256, and browsers revalidate (`no-cache`).

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

struct Asset {
    name: &'static str,
    mime: &'static str,
    body: &'static [u8],
    etag: LazyLock<String>,
}

macro_rules! asset {
    ($name:literal, $mime:literal, $path:literal) => {
        Asset {
            name: $name,
            mime: $mime,
            body: include_bytes!($path),
            etag: LazyLock::new(|| {
                format!("\"{}\"", hex_prefix(&Sha256::digest(include_bytes!($path))))
            }),
        }
    };
}

fn hex_prefix(d: &[u8]) -> String {
    d.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

static INDEX: Asset = asset!(
    "index.html",
    "text/html; charset=utf-8",
    "../ui/dist/index.html"
);
static FILES: [Asset; 2] = [
    asset!(
        "app.js",
        "text/javascript; charset=utf-8",
        "../ui/dist/assets/app.js"
    ),
    asset!(
        "app.css",
        "text/css; charset=utf-8",
        "../ui/dist/assets/app.css"
    ),
];

fn serve(a: &Asset, headers: &HeaderMap) -> Response {
    let etag = a.etag.as_str();
    let cached = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut resp = if cached {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        a.body.into_response()
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(a.mime));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    resp
}

pub(crate) async fn index(headers: HeaderMap) -> Response {
    serve(&INDEX, &headers)
}

pub(crate) async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    match FILES.iter().find(|a| a.name == file) {
        Some(a) => serve(a, &headers),
        None => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}
