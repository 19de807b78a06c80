//! Password hashing (argon2id with the OWASP-recommended parameters: 19 MiB, t=2, p=1) and
//! generation of initial passwords.
//!
//! Hashing is CPU- and memory-bound, so Auth runs it on a [`HasherPool`]: one thread per core,
//! each with its own argon2 memory allocated once. That bounds both the CPU that password
//! guessing can take and the memory (threads × 19 MiB) — allocating 19 MiB per hash on arbitrary
//! blocking threads left every glibc arena holding a freed 19 MiB block (≈ 480 MiB RSS at 8
//! concurrent logins, measured).

use argon2::password_hash::{
    Output, ParamsString, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use rand::seq::SliceRandom;

pub const MIN_PASSWORD_LEN: usize = 12;
pub const MAX_PASSWORD_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PasswordError {
    #[error("password must be at least {MIN_PASSWORD_LEN} characters")]
    TooShort,
    #[error("password must be at most {MAX_PASSWORD_LEN} bytes")]
    TooLong,
    #[error("hashing failed: {0}")]
    Hash(String),
    #[error("the password hasher has stopped")]
    PoolGone,
}

pub fn check_policy(password: &str) -> Result<(), PasswordError> {
    if password.len() > MAX_PASSWORD_LEN {
        return Err(PasswordError::TooLong);
    }
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(PasswordError::TooShort);
    }
    Ok(())
}

/// Hash with freshly allocated memory (for tools and tests; Auth uses [`HasherPool`]).
pub fn hash(password: &str) -> Result<String, PasswordError> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

/// Verify with freshly allocated memory. A malformed stored hash simply fails.
pub fn verify(password: &str, stored_hash: &str) -> bool {
    match PasswordHash::new(stored_hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Argon2 memory reused across hashes on one thread.
struct Scratch {
    blocks: Vec<Block>,
}

impl Scratch {
    fn for_params(&mut self, params: &Params) -> &mut [Block] {
        let n = params.block_count();
        if self.blocks.len() < n {
            self.blocks.resize(n, Block::default());
        }
        self.blocks.get_mut(..n).unwrap_or_default()
    }

    fn hash(&mut self, password: &str) -> Result<String, PasswordError> {
        let err = |e: &dyn std::fmt::Display| PasswordError::Hash(e.to_string());
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        let params = Params::default();
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
        let mut salt_buf = [0u8; 64];
        let salt_bytes = salt
            .as_salt()
            .decode_b64(&mut salt_buf)
            .map_err(|e| err(&e))?;
        let memory = self.for_params(&params);
        let output = Output::init_with(Params::DEFAULT_OUTPUT_LEN, |out| {
            argon
                .hash_password_into_with_memory(password.as_bytes(), salt_bytes, out, &mut *memory)
                .map_err(|_| argon2::password_hash::Error::Crypto)
        })
        .map_err(|e| err(&e))?;
        let phc = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&params).map_err(|e| err(&e))?,
            salt: Some(salt.as_salt()),
            hash: Some(output),
        };
        Ok(phc.to_string())
    }

    fn verify(&mut self, password: &str, stored: &str) -> bool {
        let Ok(parsed) = PasswordHash::new(stored) else {
            return false;
        };
        let (Ok(alg), Ok(params), Some(salt), Some(expected)) = (
            Algorithm::try_from(parsed.algorithm),
            Params::try_from(&parsed),
            parsed.salt,
            parsed.hash,
        ) else {
            return false;
        };
        let version = parsed
            .version
            .map(Version::try_from)
            .and_then(Result::ok)
            .unwrap_or_default();
        let mut salt_buf = [0u8; 64];
        let Ok(salt_bytes) = salt.decode_b64(&mut salt_buf) else {
            return false;
        };
        let argon = Argon2::new(alg, version, params.clone());
        let memory = self.for_params(&params);
        let computed = Output::init_with(expected.len(), |out| {
            argon
                .hash_password_into_with_memory(password.as_bytes(), salt_bytes, out, &mut *memory)
                .map_err(|_| argon2::password_hash::Error::Crypto)
        });
        // `Output` compares in constant time.
        matches!(computed, Ok(c) if c == expected)
    }
}

enum Job {
    Hash(
        String,
        tokio::sync::oneshot::Sender<Result<String, PasswordError>>,
    ),
    Verify(String, String, tokio::sync::oneshot::Sender<bool>),
}

/// A fixed set of hashing threads with reusable memory. Jobs queue when all are busy.
#[derive(Clone)]
pub struct HasherPool {
    jobs: crossbeam_channel::Sender<Job>,
}

impl std::fmt::Debug for HasherPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HasherPool").finish_non_exhaustive()
    }
}

impl HasherPool {
    /// Start `threads` hashing threads (at least one). They exit when the pool is dropped.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(4096);
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    let mut scratch = Scratch { blocks: Vec::new() };
                    for job in rx {
                        match job {
                            Job::Hash(pw, reply) => {
                                let _ = reply.send(scratch.hash(&pw));
                            }
                            Job::Verify(pw, stored, reply) => {
                                let _ = reply.send(scratch.verify(&pw, &stored));
                            }
                        }
                    }
                })?;
        }
        Ok(Self { jobs: tx })
    }

    pub async fn hash(&self, password: String) -> Result<String, PasswordError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Job::Hash(password, tx))
            .map_err(|_| PasswordError::PoolGone)?;
        rx.await.map_err(|_| PasswordError::PoolGone)?
    }

    pub async fn verify(
        &self,
        password: String,
        stored_hash: String,
    ) -> Result<bool, PasswordError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Job::Verify(password, stored_hash, tx))
            .map_err(|_| PasswordError::PoolGone)?;
        rx.await.map_err(|_| PasswordError::PoolGone)
    }
}

/// A random 24-character password (~143 bits) from an alphabet without look-alikes.
pub fn generate() -> String {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rngs::OsRng;
    (0..24)
        .filter_map(|_| ALPHABET.choose(&mut rng).map(|b| *b as char))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_verify_and_policy() {
        let p = generate();
        assert_eq!(p.len(), 24);
        check_policy(&p).unwrap();
        let h = hash(&p).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify(&p, &h));
        assert!(!verify("wrong password!", &h));
        assert!(!verify(&p, "not a hash"));
        assert!(matches!(
            check_policy("short"),
            Err(PasswordError::TooShort)
        ));
    }

    #[test]
    fn scratch_hashes_interoperate_with_the_reference_implementation() {
        let mut s = Scratch { blocks: Vec::new() };
        let ours = s.hash("correct horse battery").unwrap();
        assert!(verify("correct horse battery", &ours), "{ours}");
        let reference = hash("correct horse battery").unwrap();
        assert!(s.verify("correct horse battery", &reference));
        assert!(!s.verify("correct horse batterY", &reference));
        assert!(!s.verify("x", "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$AAAA"));
        // Other parameters (e.g. an older, cheaper hash) still verify.
        let cheap = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(1024, 1, 1, None).unwrap(),
        )
        .hash_password(
            b"pw-with-old-params",
            &SaltString::generate(&mut rand::rngs::OsRng),
        )
        .unwrap()
        .to_string();
        assert!(s.verify("pw-with-old-params", &cheap));
    }

    #[tokio::test]
    async fn pool_hashes_and_verifies() {
        let pool = HasherPool::new(2).unwrap();
        let h = pool.hash("a long enough password".into()).await.unwrap();
        assert!(
            pool.verify("a long enough password".into(), h.clone())
                .await
                .unwrap()
        );
        assert!(!pool.verify("another password!!".into(), h).await.unwrap());
    }
}
