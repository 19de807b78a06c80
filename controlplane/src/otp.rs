//! Time-based one-time passwords (RFC 6238 over RFC 4226 HOTP): HMAC-SHA1, 30-second steps,
//! six digits — what every authenticator app reads from an `otpauth://totp/` URI. Sans-IO: the
//! caller passes the time. A code is accepted one step either side of now (clock drift), and a
//! step once used is refused again (the caller stores the last step; see [`verify`]).

use aws_lc_rs::hmac;

/// Seconds per step.
pub const STEP_SECS: u64 = 30;
/// Digits per code.
pub const DIGITS: u32 = 6;
/// Bytes of a new secret (160 bits, RFC 4226's recommendation).
pub const SECRET_LEN: usize = 20;

/// Why a code was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OtpError {
    #[error("the one-time code must be {DIGITS} digits")]
    Malformed,
    #[error("wrong one-time code")]
    Wrong,
    #[error("this one-time code was already used; wait for the next one")]
    Replayed,
    #[error("the device secret is not valid base32")]
    BadSecret,
}

/// A fresh random secret.
pub fn new_secret() -> Vec<u8> {
    use rand::RngCore as _;
    let mut s = vec![0u8; SECRET_LEN];
    rand::thread_rng().fill_bytes(&mut s);
    s
}

/// The HOTP value of `secret` at `counter` (RFC 4226 §5.3), as a number below 10^DIGITS.
pub fn hotp(secret: &[u8], counter: u64) -> u32 {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = hmac::sign(&key, &counter.to_be_bytes());
    let mac = tag.as_ref();
    // Dynamic truncation: the low nibble of the last byte picks four bytes.
    let offset = mac.last().map_or(0, |b| usize::from(b & 0x0f));
    let word = mac
        .get(offset..offset + 4)
        .and_then(|w| <[u8; 4]>::try_from(w).ok())
        .map_or(0, u32::from_be_bytes);
    (word & 0x7fff_ffff) % 10u32.pow(DIGITS)
}

/// The step `unix_secs` falls in.
pub fn step_at(unix_secs: u64) -> u64 {
    unix_secs / STEP_SECS
}

/// The code an authenticator shows at `unix_secs`, zero-padded.
pub fn code_at(secret: &[u8], unix_secs: u64) -> String {
    format!(
        "{:0width$}",
        hotp(secret, step_at(unix_secs)),
        width = DIGITS as usize
    )
}

/// Check `code` at `unix_secs`, one step either side. `last_used` is the last step a code of
/// this device was accepted at: that step and earlier ones are refused. Returns the step the
/// code matched, to be stored as the new `last_used`.
pub fn verify(secret: &[u8], code: &str, unix_secs: u64, last_used: u64) -> Result<u64, OtpError> {
    let code = code.trim();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(OtpError::Malformed);
    }
    let want: u32 = code.parse().map_err(|_| OtpError::Malformed)?;
    let now = step_at(unix_secs);
    let mut matched = None;
    for step in [now.saturating_sub(1), now, now + 1] {
        // Constant work whichever step matches (no early return on a hit).
        if hotp(secret, step) == want && matched.is_none() {
            matched = Some(step);
        }
    }
    match matched {
        Some(step) if step <= last_used => Err(OtpError::Replayed),
        Some(step) => Ok(step),
        None => Err(OtpError::Wrong),
    }
}

const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// The base32 symbol of a value's low five bits.
fn symbol(v: u32) -> char {
    char::from(ALPHABET.get((v & 31) as usize).copied().unwrap_or(b'A'))
}

/// Base32 (RFC 4648) without padding, as `otpauth://` URIs carry secrets.
pub fn base32_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut buf, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buf = (buf << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(symbol(buf >> bits));
        }
    }
    if bits > 0 {
        out.push(symbol(buf << (5 - bits)));
    }
    out
}

/// Decode base32 (case-insensitive; spaces, dashes and padding ignored).
pub fn base32_decode(text: &str) -> Result<Vec<u8>, OtpError> {
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let (mut buf, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        if matches!(c, b' ' | b'-' | b'=') {
            continue;
        }
        let v = ALPHABET
            .iter()
            .position(|&a| a == c.to_ascii_uppercase())
            .ok_or(OtpError::BadSecret)?;
        buf = (buf << 5) | v as u32;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
        buf &= (1 << bits) - 1;
    }
    Ok(out)
}

/// Percent-encode everything but RFC 3986's unreserved characters (for URI parts and queries).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The `otpauth://` URI authenticator apps enroll from (the issuer is the cluster).
pub fn uri(issuer: &str, user: &str, secret: &[u8]) -> String {
    let enc = percent_encode;
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECS}",
        enc(issuer),
        enc(user),
        base32_encode(secret),
        enc(issuer)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_SECRET: &[u8] = b"12345678901234567890";

    /// RFC 6238 Appendix B (SHA-1), the last six of its eight digits.
    #[test]
    fn rfc6238_test_vectors() {
        for (t, eight) in [
            (59u64, "94287082"),
            (1_111_111_109, "07081804"),
            (1_111_111_111, "14050471"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
            (20_000_000_000, "65353130"),
        ] {
            assert_eq!(code_at(RFC_SECRET, t), eight[2..], "T = {t}");
        }
    }

    /// RFC 4226 Appendix D.
    #[test]
    fn rfc4226_hotp_values() {
        let want = [
            755224, 287082, 359152, 969429, 338314, 254676, 287922, 162583, 399871, 520489,
        ];
        for (i, w) in want.iter().enumerate() {
            assert_eq!(hotp(RFC_SECRET, i as u64), *w);
        }
    }

    #[test]
    fn codes_drift_one_step_and_never_replay() {
        let s = new_secret();
        let t = 1_800_000_000;
        let now = code_at(&s, t);
        assert_eq!(verify(&s, &now, t, 0), Ok(step_at(t)));
        assert_eq!(verify(&s, &code_at(&s, t - 30), t, 0), Ok(step_at(t) - 1));
        assert_eq!(verify(&s, &code_at(&s, t + 30), t, 0), Ok(step_at(t) + 1));
        if code_at(&s, t - 60) != now && code_at(&s, t - 60) != code_at(&s, t - 30) {
            assert_eq!(verify(&s, &code_at(&s, t - 60), t, 0), Err(OtpError::Wrong));
        }
        assert_eq!(verify(&s, &now, t, step_at(t)), Err(OtpError::Replayed));
        assert_eq!(verify(&s, "12345", t, 0), Err(OtpError::Malformed));
        assert_eq!(verify(&s, "12a456", t, 0), Err(OtpError::Malformed));
        assert_eq!(verify(&s, "", t, 0), Err(OtpError::Malformed));
    }

    #[test]
    fn base32_round_trips_and_matches_rfc4648() {
        assert_eq!(base32_encode(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32_encode(b"f"), "MY");
        assert_eq!(
            base32_decode("MZXW6YTBOI======").as_deref(),
            Ok(&b"foobar"[..])
        );
        assert_eq!(base32_decode("mzxw 6ytb-oi").as_deref(), Ok(&b"foobar"[..]));
        assert_eq!(base32_decode("M1"), Err(OtpError::BadSecret));
        for n in 0..41 {
            let s: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(base32_decode(&base32_encode(&s)), Ok(s));
        }
    }

    #[test]
    fn the_uri_is_what_authenticators_read() {
        let u = uri("my cluster", "alice@x", b"foobar");
        assert_eq!(
            u,
            "otpauth://totp/my%20cluster:alice%40x?secret=MZXW6YTBOI&issuer=my%20cluster&algorithm=SHA1&digits=6&period=30"
        );
    }
}
