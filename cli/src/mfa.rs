//! `gsh mfa add`: enroll a TOTP device. A new secret is made here, shown as an `otpauth://` URI
//! and as a QR code in the terminal; Auth stores it once a code from the device (and the
//! password) checks out, so a device that did not scan the secret is never enrolled.

use anyhow::Context;
use gatehouse_controlplane::client::Client;
use gatehouse_controlplane::{otp, proto};
use qrcode::QrCode;
use qrcode::render::unicode::Dense1x2;

use crate::rpc_error;

/// The QR code of `text` for a terminal (two modules per character cell, with a quiet zone).
pub fn qr_for_terminal(text: &str) -> anyhow::Result<String> {
    let code = QrCode::new(text.as_bytes()).context("encoding the QR code")?;
    Ok(code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

/// What enrolling asks of the user, in order.
pub trait Prompts {
    /// A code the new device shows (asked after the URI and QR code are printed).
    fn new_code(&mut self) -> anyhow::Result<String>;
    /// A code of the device being replaced.
    fn current_code(&mut self) -> anyhow::Result<String>;
}

/// Make a secret, show it, ask for a code and enroll the device.
pub async fn enroll(
    client: &mut Client,
    cluster: &str,
    user: &str,
    password: String,
    prompts: &mut dyn Prompts,
) -> anyhow::Result<()> {
    let secret = otp::new_secret();
    let uri = otp::uri(cluster, user, &secret);
    println!("Scan this QR code with an authenticator app (or enter the URI by hand):\n");
    println!("{}", qr_for_terminal(&uri)?);
    println!("{uri}\n");
    let code = prompts.new_code()?;
    let mut req = proto::AddMfaDeviceRequest {
        user: user.to_owned(),
        password,
        secret: otp::base32_encode(&secret),
        code,
        current_code: String::new(),
    };
    let first = client.add_mfa_device(req.clone()).await;
    match first {
        Ok(_) => {}
        Err(s)
            if s.code() == tonic::Code::FailedPrecondition
                && s.message().contains("a device is enrolled") =>
        {
            req.current_code = prompts.current_code()?;
            client.add_mfa_device(req).await.map_err(rpc_error)?;
        }
        Err(s) => return Err(rpc_error(s)),
    }
    println!("Device enrolled for {user}: logins ask for its code when the cluster requires it.");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_uri_renders_as_a_terminal_qr_code() {
        let qr = super::qr_for_terminal("otpauth://totp/c:alice?secret=MZXW6YTBOI").unwrap();
        let lines: Vec<&str> = qr.lines().collect();
        assert!(lines.len() > 10, "{qr}");
        assert!(
            lines
                .iter()
                .all(|l| l.chars().count() == lines[0].chars().count())
        );
    }
}
