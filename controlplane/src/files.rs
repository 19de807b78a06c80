//! Files that hold secrets (keys, certificates, identities): directories 0700, files 0600,
//! written atomically (temp file, fsync, rename) so a reader never sees half a key.

use std::path::Path;

/// The files of an identity directory: `tls.crt`, `tls.key`, `ca.pem` (all 0600).
pub fn write_identity_dir(
    dir: &Path,
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> std::io::Result<()> {
    create_private_dir(dir)?;
    write_private(&dir.join("tls.crt"), cert_pem.as_bytes())?;
    write_private(&dir.join("tls.key"), key_pem.as_bytes())?;
    write_private(&dir.join("ca.pem"), ca_pem.as_bytes())?;
    Ok(())
}

pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

/// Write a file readable only by its owner, atomically (temp file + rename).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
