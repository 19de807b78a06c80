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

/// Write a file readable only by its owner, atomically: a hidden temporary file beside it
/// (created exclusively, so a link planted at its name is never followed), fsync, rename over
/// `path` (which replaces a link at `path` rather than writing through it), fsync the directory.
/// A reader sees the old content or the new, never a part.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp)?;
    let written = f.write_all(data).and_then(|()| f.sync_all());
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
