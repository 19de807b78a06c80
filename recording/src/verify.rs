//! The trailer and its signature: who recorded this, and is it what they recorded?

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::event::SessionMeta;
use crate::reader::scan;

/// The SSH signature namespace (`ssh-keygen -Y verify -n gatehouse-recording`).
pub const SIGNATURE_NAMESPACE: &str = "gatehouse-recording";

/// The last chunk of a finished recording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    /// Every event of the session is in the recording.
    pub complete: bool,
    /// Why not, when it is not (the agent stopped, the spool filled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Data chunks before the trailer, and their bytes (headers included).
    pub chunks: u64,
    pub data_bytes: u64,
    /// SHA-256 over the data chunks' bytes, in order.
    pub sha256: String,
    pub duration_ms: u64,
    /// The recording agent's OpenSSH host certificate.
    pub host_cert: String,
    /// An SSH signature (PEM, `SSHSIG`) over [`signed_message`] by the certificate's key.
    pub signature: String,
}

/// What the host key signs: the recording's id, whether it is complete, and its digest.
pub fn signed_message(
    id: &str,
    complete: bool,
    chunks: u64,
    data_bytes: u64,
    sha256: &str,
) -> Vec<u8> {
    format!("gatehouse-recording-v1\nid={id}\ncomplete={complete}\nchunks={chunks}\nbytes={data_bytes}\nsha256={sha256}\n")
        .into_bytes()
}

/// A recording that verified.
#[derive(Debug, Clone)]
pub struct Verified {
    pub meta: SessionMeta,
    pub trailer: Trailer,
    /// The host certificate's key id (the agent's host id).
    pub signed_by: String,
}

/// Check a trailer's signature: the host certificate is signed by one of the host CA keys
/// and was valid when the recording ended, it names the recording's node, and its key signed
/// this recording's digest.
pub fn verify_trailer(
    meta: &SessionMeta,
    trailer: &Trailer,
    host_cas: &[ssh_key::PublicKey],
) -> Result<String, Error> {
    let sig_err = |what: String| Error::Signature(what);
    let cert = ssh_key::Certificate::from_openssh(trailer.host_cert.trim())
        .map_err(|e| sig_err(format!("the host certificate does not parse: {e}")))?;
    if cert.cert_type() != ssh_key::certificate::CertType::Host {
        return Err(sig_err("the certificate is not a host certificate".into()));
    }
    let fingerprints: Vec<ssh_key::Fingerprint> = host_cas
        .iter()
        .map(|k| k.fingerprint(ssh_key::HashAlg::Sha256))
        .collect();
    let ended_secs = meta
        .started_unix_ms
        .saturating_add(trailer.duration_ms)
        .div_euclid(1000);
    cert.validate_at(ended_secs, &fingerprints).map_err(|e| {
        sig_err(format!(
            "the host certificate is not one the cluster's host CA signed, valid when the recording ended: {e}"
        ))
    })?;
    let principals = cert.valid_principals();
    if !principals
        .iter()
        .any(|p| p == &meta.node_id || p == &meta.node)
    {
        return Err(sig_err(format!(
            "the host certificate names {principals:?}, not the recording's node `{}`",
            meta.node
        )));
    }
    let sig = ssh_key::SshSig::from_pem(trailer.signature.trim())
        .map_err(|e| sig_err(format!("the signature does not parse: {e}")))?;
    let message = signed_message(
        &meta.id,
        trailer.complete,
        trailer.chunks,
        trailer.data_bytes,
        &trailer.sha256,
    );
    ssh_key::PublicKey::from(cert.public_key().clone())
        .verify(SIGNATURE_NAMESPACE, &message, &sig)
        .map_err(|e| sig_err(format!("the host key's signature does not match: {e}")))?;
    Ok(cert.key_id().to_owned())
}

/// Verify a whole recording: every chunk's checksum, sequence and contents, the digest in the
/// trailer, and the trailer's signature.
pub fn verify(bytes: &[u8], host_cas: &[ssh_key::PublicKey]) -> Result<Verified, Error> {
    let s = scan(bytes);
    if let Some(e) = s.error {
        return Err(e);
    }
    let meta = s
        .reader
        .meta()
        .cloned()
        .ok_or_else(|| Error::Trailer("no session start".into()))?;
    let trailer = s
        .reader
        .trailer()
        .cloned()
        .ok_or(Error::NoTrailer { last_seq: None })?;
    let signed_by = verify_trailer(&meta, &trailer, host_cas)?;
    Ok(Verified {
        meta,
        trailer,
        signed_by,
    })
}
