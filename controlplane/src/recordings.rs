//! Where Auth keeps session recordings: chunks of a recording still arriving are staged; a
//! finished recording, once verified, becomes one object in the configured store — files under
//! the data dir by default, or an S3-compatible bucket (`object_store`, multipart above 8 MiB) —
//! and its staging is removed.
//!
//! With files, staging is a file under the data dir (appended and synced): one Auth holds the
//! recordings. With S3, every upload call's bytes are an object of their own
//! (`PREFIX/staging/ID/OFFSET.part`), so that any Auth on the same database and bucket takes the
//! next call of an upload, serves a live recording to `gsh join`, and finishes it: the Auths keep
//! nothing of their own.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use serde::{Deserialize, Serialize};

/// `[auth.recording]` in the daemon's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordingConfig {
    /// `node`: agents record every SSH session; `off`: nothing is recorded.
    pub mode: RecordingMode,
    /// What an agent does with a session whose recording cannot be written.
    pub on_failure: OnFailure,
    /// `file` (under the data dir) or `s3://bucket/prefix`.
    pub storage: String,
    /// For S3-compatible stores other than AWS (e.g. `http://127.0.0.1:9000`).
    pub endpoint: Option<String>,
    pub region: Option<String>,
}

impl Default for RecordingConfig {
    fn default() -> Self {
        Self {
            mode: RecordingMode::Node,
            on_failure: OnFailure::Continue,
            storage: "file".into(),
            endpoint: None,
            region: None,
        }
    }
}

/// `[auth.recordings]`: where recordings are kept (the same keys as in `[auth.recording]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordingStorage {
    pub storage: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordingMode {
    Node,
    Off,
}

impl RecordingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordingMode::Node => "node",
            RecordingMode::Off => "off",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The session goes on unrecorded from there (audited).
    Continue,
    /// The session is not started, or is ended with a message saying why.
    Refuse,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Continue => "continue",
            OnFailure::Refuse => "refuse",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecordingStoreError {
    #[error("recordings storage `{0}`: use `file` or `s3://bucket/prefix`")]
    BadUrl(String),
    #[error("object store: {0}")]
    Object(#[from] object_store::Error),
    #[error("staging: {0}")]
    Io(#[from] std::io::Error),
}

/// Objects larger than this go up in parts.
const MULTIPART_THRESHOLD: u64 = 8 * 1024 * 1024;
const PART_SIZE: usize = 8 * 1024 * 1024;

pub struct RecordingStore {
    /// Staging files (with S3: scratch, where a finished recording is put together).
    staging: PathBuf,
    objects: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    describe: String,
    /// Recordings still arriving are staged in the object store (S3), not in `staging`.
    shared_staging: bool,
}

impl std::fmt::Debug for RecordingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

impl RecordingStore {
    /// Open the store `config` names; staging files live in `<data_dir>/recordings/staging`.
    pub fn open(data_dir: &Path, config: &RecordingConfig) -> Result<Self, RecordingStoreError> {
        let root = data_dir.join("recordings");
        let staging = root.join("staging");
        crate::files::create_private_dir(&staging)?;
        if config.storage == "file" || config.storage.is_empty() {
            let objects = root.join("objects");
            crate::files::create_private_dir(&objects)?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(&objects)?;
            return Ok(Self {
                staging,
                objects: Arc::new(store),
                prefix: ObjectPath::from(""),
                describe: format!("files under {}", objects.display()),
                shared_staging: false,
            });
        }
        let Some(rest) = config.storage.strip_prefix("s3://") else {
            return Err(RecordingStoreError::BadUrl(config.storage.clone()));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(RecordingStoreError::BadUrl(config.storage.clone()));
        }
        // Credentials from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, …).
        let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(endpoint) = &config.endpoint {
            b = b
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        if let Some(region) = &config.region {
            b = b.with_region(region);
        }
        Ok(Self {
            staging,
            objects: Arc::new(b.build()?),
            prefix: ObjectPath::from(prefix.trim_matches('/')),
            describe: format!("s3://{bucket}/{prefix}"),
            shared_staging: true,
        })
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    fn staging_path(&self, id: &str) -> PathBuf {
        self.staging.join(format!("{id}.rec"))
    }

    fn object_path(&self, id: &str) -> ObjectPath {
        self.prefix.child(format!("{id}.rec"))
    }

    /// The objects a recording is staged in, with S3.
    fn parts_prefix(&self, id: &str) -> ObjectPath {
        self.prefix.child("staging").child(id)
    }

    /// The staged parts of a recording, in order: (offset, length, object), the chain from 0
    /// where each starts where the one before ends (a part left by a write whose index update
    /// failed, and written again since, is not part of it).
    async fn parts(&self, id: &str) -> Result<Vec<(u64, u64, ObjectPath)>, object_store::Error> {
        use tokio_stream::StreamExt;
        let mut found: Vec<(u64, u64, ObjectPath)> = Vec::new();
        let mut listing = self.objects.list(Some(&self.parts_prefix(id)));
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            let offset = meta
                .location
                .filename()
                .and_then(|f| f.strip_suffix(".part"))
                .and_then(|o| o.parse::<u64>().ok());
            if let Some(o) = offset {
                found.push((o, meta.size, meta.location));
            }
        }
        found.sort_by_key(|p| p.0);
        let mut chain = Vec::with_capacity(found.len());
        let mut next = 0;
        for part in found {
            if part.0 == next {
                next += part.1;
                chain.push(part);
            }
        }
        Ok(chain)
    }

    /// Append whole chunks at `offset` of a recording still arriving, durably. A staging file
    /// longer than `offset` (a crash after the write, before the index moved) is cut back first;
    /// a staged part at `offset` is replaced.
    pub async fn append(&self, id: &str, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        if self.shared_staging {
            let part = self.parts_prefix(id).child(format!("{offset:020}.part"));
            self.objects
                .put(&part, bytes::Bytes::copy_from_slice(data).into())
                .await
                .map_err(std::io::Error::other)?;
            return Ok(());
        }
        let path = self.staging_path(id);
        let data = data.to_vec();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::{Seek, SeekFrom, Write};
            let mut opts = std::fs::OpenOptions::new();
            opts.create(true).write(true).truncate(false);
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&path)?;
            if f.metadata()?.len() != offset {
                f.set_len(offset)?;
            }
            f.seek(SeekFrom::Start(offset))?;
            f.write_all(&data)?;
            f.sync_data()
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Read `range` of a recording: from its staging file while it arrives, else its object.
    pub async fn read(
        &self,
        id: &str,
        live: bool,
        range: Range<u64>,
    ) -> Result<Vec<u8>, RecordingStoreError> {
        if live {
            match self.read_staged(id, range.clone()).await {
                Ok(bytes) => return Ok(bytes),
                // Finished since the caller looked: the staged copy is gone, the object is
                // there (a reader following a session as it ends).
                Err(staged) => return self.read_object(id, range).await.map_err(|_| staged),
            }
        }
        self.read_object(id, range).await
    }

    /// A live recording's bytes, from the staging file (or the staged parts, with S3).
    async fn read_staged(
        &self,
        id: &str,
        range: Range<u64>,
    ) -> Result<Vec<u8>, RecordingStoreError> {
        if self.shared_staging {
            let mut out = Vec::new();
            for (start, len, part) in self.parts(id).await? {
                let end = start + len;
                if end <= range.start || start >= range.end {
                    continue;
                }
                let from = range.start.max(start) - start;
                let to = range.end.min(end) - start;
                out.extend_from_slice(&self.objects.get_range(&part, from..to).await?);
            }
            return Ok(out);
        }
        let path = self.staging_path(id);
        Ok(
            tokio::task::spawn_blocking(move || read_range(&path, range))
                .await
                .map_err(std::io::Error::other)??,
        )
    }

    /// A kept recording's bytes.
    async fn read_object(
        &self,
        id: &str,
        range: Range<u64>,
    ) -> Result<Vec<u8>, RecordingStoreError> {
        let path = self.object_path(id);
        match self.objects.get_range(&path, range.clone()).await {
            Ok(bytes) => Ok(bytes.to_vec()),
            // Shorter than the index says (damaged or cut): what there is, so the reader
            // can say where it ends.
            Err(e) => {
                let len = self.objects.head(&path).await.map_err(|_| e)?.size;
                if range.start >= len {
                    return Ok(Vec::new());
                }
                Ok(self
                    .objects
                    .get_range(&path, range.start..range.end.min(len))
                    .await?
                    .to_vec())
            }
        }
    }

    /// Every chunk of the staging file checked, a chunk at a time (before it is kept). Staged
    /// parts (S3) are first put together in a scratch file.
    pub async fn scan_staging(
        &self,
        id: &str,
    ) -> Result<gatehouse_recording::Scan, RecordingStoreError> {
        let path = self.staging_path(id);
        if self.shared_staging {
            use tokio::io::AsyncWriteExt;
            let mut f = tokio::fs::File::create(&path).await?;
            for (_, _, part) in self.parts(id).await? {
                let bytes = self.objects.get(&part).await?.bytes().await?;
                f.write_all(&bytes).await?;
            }
            f.flush().await?;
        }
        Ok(tokio::task::spawn_blocking(move || {
            gatehouse_recording::scan_from(std::fs::File::open(&path)?)
        })
        .await
        .map_err(std::io::Error::other)??)
    }

    /// Keep a finished, verified recording: its staging file becomes an object (in parts when
    /// large), then the staging file goes.
    pub async fn keep(&self, id: &str) -> Result<u64, RecordingStoreError> {
        let path = self.staging_path(id);
        let len = tokio::fs::metadata(&path).await?.len();
        let object = self.object_path(id);
        if len <= MULTIPART_THRESHOLD {
            let bytes = tokio::fs::read(&path).await?;
            self.objects.put(&object, bytes.into()).await?;
        } else {
            use tokio::io::AsyncReadExt;
            let upload = self.objects.put_multipart(&object).await?;
            let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            let mut f = tokio::fs::File::open(&path).await?;
            let mut buf = vec![0u8; PART_SIZE];
            loop {
                let n = f.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                w.wait_for_capacity(2).await?;
                w.write(buf.get(..n).unwrap_or_default());
            }
            w.finish().await?;
        }
        tokio::fs::remove_file(&path).await?;
        if self.shared_staging {
            for (_, _, part) in self.parts(id).await? {
                if let Err(e) = self.objects.delete(&part).await {
                    tracing::warn!(recording = id, error = %e, "recordings: a staged part was not removed");
                }
            }
        }
        Ok(len)
    }
}

fn read_range(path: &Path, range: Range<u64>) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(range.start))?;
    let mut out = Vec::new();
    f.take(range.end.saturating_sub(range.start))
        .read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_live_read_after_the_recording_was_kept_reads_the_object() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordingStore::open(dir.path(), &RecordingConfig::default()).unwrap();
        store.append("r1", 0, b"0123456789").await.unwrap();
        assert_eq!(store.read("r1", true, 2..5).await.unwrap(), b"234");
        // The session ends between the reader's look at the index and its read.
        store.keep("r1").await.unwrap();
        assert_eq!(store.read("r1", true, 2..5).await.unwrap(), b"234");
        assert_eq!(store.read("r1", false, 8..10).await.unwrap(), b"89");
        // Neither staged nor kept: the staging error stands.
        let err = store.read("nope", true, 0..1).await.unwrap_err();
        assert!(err.to_string().starts_with("staging"), "{err}");
    }
}
