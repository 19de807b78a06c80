//! What every web request is checked against, as pure functions of its headers: the session
//! cookie, the origin, the CSRF token, and the headers every response carries.
//!
//! - The cookie is `__Host-gatehouse_session`: `HttpOnly` (no script reads it), `Secure`,
//!   `SameSite=Strict` (a cross-site request never carries it), `Path=/`, no domain.
//! - A state-changing request (anything but GET/HEAD) must carry the session's CSRF token in
//!   `X-CSRF-Token`, and, when the browser says where it comes from (`Origin`), come from this
//!   very origin. A WebSocket (a GET a page of any site could open) must come from this origin
//!   and carry the token as `csrf` in its query.
//! - The login (no session yet) must be JSON — a cross-site form cannot send that without a
//!   preflight this server never grants — and same-origin when `Origin` says.

use http::{HeaderMap, HeaderValue, Method, header};

use crate::sessions::same_secret;

pub const COOKIE: &str = "__Host-gatehouse_session";
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The Content-Security-Policy of every response: scripts and connections to this origin only,
/// nothing framed. (Inline styles are allowed: the terminal sets its colours with them.)
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
img-src 'self' data:; connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; \
form-action 'self'; frame-ancestors 'none'";

/// Why a request was refused before any handler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("cross-origin request refused")]
    CrossOrigin,
    #[error("missing or wrong CSRF token")]
    Csrf,
    #[error("the body must be JSON (Content-Type: application/json)")]
    NotJson,
}

/// The session token in the request's cookies, if any.
pub fn session_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim())
}

/// The `Set-Cookie` value of a new session living `max_age` seconds.
pub fn set_cookie(token: &str, max_age: i64) -> String {
    format!(
        "{COOKIE}={token}; Max-Age={}; Path=/; Secure; HttpOnly; SameSite=Strict",
        max_age.max(0)
    )
}

/// The `Set-Cookie` value that clears it.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Max-Age=0; Path=/; Secure; HttpOnly; SameSite=Strict")
}

/// Whether the request's `Origin` (if it says one) is this server: `https://` + `Host`.
/// `strict`: a request without `Origin` is refused too (WebSockets always send one).
pub fn check_origin(headers: &HeaderMap, strict: bool) -> Result<(), Refused> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return if strict {
            Err(Refused::CrossOrigin)
        } else {
            Ok(())
        };
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .ok_or(Refused::CrossOrigin)?;
    let want = format!("https://{host}");
    if origin.to_str().ok() == Some(want.as_str()) {
        Ok(())
    } else {
        Err(Refused::CrossOrigin)
    }
}

/// Whether the method changes state (needs the CSRF token).
pub fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// A state-changing request with a session: same origin, and the session's token in the header.
pub fn check_csrf(headers: &HeaderMap, csrf: &str) -> Result<(), Refused> {
    check_origin(headers, false)?;
    let sent = headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or(Refused::Csrf)?;
    if same_secret(sent, csrf) {
        Ok(())
    } else {
        Err(Refused::Csrf)
    }
}

/// A WebSocket's opening request: this origin, and the session's token in the query.
pub fn check_websocket(
    headers: &HeaderMap,
    query_csrf: Option<&str>,
    csrf: &str,
) -> Result<(), Refused> {
    check_origin(headers, true)?;
    match query_csrf {
        Some(sent) if same_secret(sent, csrf) => Ok(()),
        _ => Err(Refused::Csrf),
    }
}

/// The login: JSON, and same-origin when the browser says.
pub fn check_login(headers: &HeaderMap) -> Result<(), Refused> {
    check_origin(headers, false)?;
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if json { Ok(()) } else { Err(Refused::NotJson) }
}

/// Headers every response carries.
pub fn security_headers(headers: &mut HeaderMap, api: bool) {
    let set = |h: &mut HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(headers, "content-security-policy", CSP);
    set(headers, "x-content-type-options", "nosniff");
    set(headers, "x-frame-options", "DENY");
    set(headers, "referrer-policy", "no-referrer");
    set(headers, "strict-transport-security", "max-age=31536000");
    set(headers, "cross-origin-opener-policy", "same-origin");
    if api {
        set(headers, "cache-control", "no-store");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_cookie_is_found_among_others_and_not_by_prefix() {
        let h = headers(&[
            ("cookie", "a=1; __Host-gatehouse_session=TOKEN; b=2"),
            ("cookie", "c=3"),
        ]);
        assert_eq!(session_token(&h), Some("TOKEN"));
        let h = headers(&[(
            "cookie",
            "__Host-gatehouse_session_x=NO; x__Host-gatehouse_session=NO",
        )]);
        assert_eq!(session_token(&h), None);
        assert_eq!(session_token(&HeaderMap::new()), None);
        let c = set_cookie("T", 60);
        for part in [
            "HttpOnly",
            "Secure",
            "SameSite=Strict",
            "Path=/",
            "Max-Age=60",
        ] {
            assert!(c.contains(part), "{c}");
        }
        assert!(!c.contains("Domain"));
    }

    #[test]
    fn cross_site_requests_and_missing_tokens_are_refused() {
        let same = [
            ("host", "gh.example:3080"),
            ("origin", "https://gh.example:3080"),
        ];
        let evil = [
            ("host", "gh.example:3080"),
            ("origin", "https://evil.example"),
        ];
        let with = |base: &[(&'static str, &'static str)], csrf: Option<&'static str>| {
            let mut v = base.to_vec();
            if let Some(c) = csrf {
                v.push(("x-csrf-token", c));
            }
            headers(&v)
        };
        assert_eq!(check_csrf(&with(&same, Some("tok")), "tok"), Ok(()));
        assert_eq!(check_csrf(&with(&same, None), "tok"), Err(Refused::Csrf));
        assert_eq!(
            check_csrf(&with(&same, Some("other")), "tok"),
            Err(Refused::Csrf)
        );
        assert_eq!(
            check_csrf(&with(&evil, Some("tok")), "tok"),
            Err(Refused::CrossOrigin)
        );
        // A script without Origin (curl) still needs the token.
        assert_eq!(
            check_csrf(&headers(&[("x-csrf-token", "tok")]), "tok"),
            Ok(())
        );
        assert_eq!(check_csrf(&HeaderMap::new(), "tok"), Err(Refused::Csrf));
        // WebSockets: origin required.
        assert_eq!(check_websocket(&headers(&same), Some("tok"), "tok"), Ok(()));
        assert_eq!(
            check_websocket(&headers(&same), None, "tok"),
            Err(Refused::Csrf)
        );
        assert_eq!(
            check_websocket(&headers(&evil), Some("tok"), "tok"),
            Err(Refused::CrossOrigin)
        );
        assert_eq!(
            check_websocket(&HeaderMap::new(), Some("tok"), "tok"),
            Err(Refused::CrossOrigin)
        );
        // Login: JSON only, same origin.
        let json = [("content-type", "application/json; charset=utf-8")];
        assert_eq!(check_login(&headers(&json)), Ok(()));
        assert_eq!(
            check_login(&headers(&[(
                "content-type",
                "application/x-www-form-urlencoded"
            )])),
            Err(Refused::NotJson)
        );
        let mut cross = evil.to_vec();
        cross.push(("content-type", "application/json"));
        assert_eq!(check_login(&headers(&cross)), Err(Refused::CrossOrigin));
        assert!(changes_state(&Method::POST) && changes_state(&Method::DELETE));
        assert!(!changes_state(&Method::GET));
    }
}
