//! Which I/O backend a Proxy worker runs on (io_uring or epoll), chosen once at start, and the
//! worker's runtime: a current-thread tokio runtime with a `LocalSet`, plus the thread's ring
//! on io_uring.

use std::io;

use super::uring;

/// The I/O backend of the Proxy's workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoBackend {
    /// io_uring when the kernel allows it, else epoll.
    #[default]
    Auto,
    IoUring,
    Epoll,
}

impl IoBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::IoUring => "io_uring",
            Self::Epoll => "epoll",
        }
    }
}

impl std::str::FromStr for IoBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "io_uring" | "io-uring" | "uring" => Ok(Self::IoUring),
            "epoll" => Ok(Self::Epoll),
            other => Err(format!(
                "unknown I/O backend `{other}` (expected auto, io_uring or epoll)"
            )),
        }
    }
}

impl std::fmt::Display for IoBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Decide the backend for `wanted`: `Ok((backend, why))`, or an error when io_uring was
/// demanded and is not available.
pub fn choose(wanted: IoBackend) -> Result<(IoBackend, String), String> {
    choose_with(wanted, uring::probe)
}

fn choose_with(
    wanted: IoBackend,
    probe: impl FnOnce() -> Result<(), String>,
) -> Result<(IoBackend, String), String> {
    match wanted {
        IoBackend::Epoll => Ok((IoBackend::Epoll, "forced by configuration".into())),
        IoBackend::IoUring => match probe() {
            Ok(()) => Ok((IoBackend::IoUring, "forced by configuration".into())),
            Err(why) => Err(format!(
                "io_uring was asked for but is not available: {why}"
            )),
        },
        IoBackend::Auto => match probe() {
            Ok(()) => Ok((IoBackend::IoUring, "available".into())),
            Err(why) => Ok((IoBackend::Epoll, format!("io_uring unavailable: {why}"))),
        },
    }
}

/// The backend of the current thread.
#[cfg(test)]
pub(crate) fn current_backend() -> IoBackend {
    if uring::current().is_some() {
        IoBackend::IoUring
    } else {
        IoBackend::Epoll
    }
}

/// Run `fut` on this thread as a Proxy worker on `backend` runs: a current-thread runtime and
/// a `LocalSet`, for io_uring with the ring installed and the batch submitted before the
/// thread sleeps. The ring is drained and removed after `fut` and its tasks are gone.
pub fn block_on_worker<F: std::future::Future>(
    backend: IoBackend,
    fut: F,
) -> io::Result<F::Output> {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    let uring = backend == IoBackend::IoUring;
    if uring {
        builder.on_thread_park(|| {
            if let Some(d) = uring::current() {
                d.submit();
            }
        });
    }
    let rt = builder.build()?;
    let local = tokio::task::LocalSet::new();
    let out = local.block_on(&rt, async {
        if uring {
            uring::Driver::install(uring::RingSize::WORKER)?;
        }
        Ok(fut.await)
    });
    // Tasks (and the connections they hold) go first, then the ring drains what they left.
    drop(local);
    drop(rt);
    uring::Driver::uninstall();
    out
}

/// Tests: run `test` on epoll, then on io_uring where the kernel has it (required when
/// `GATEHOUSE_PROXY_IO_BACKEND=io_uring`, as in CI's io_uring pass).
#[cfg(test)]
pub(crate) fn on_each_backend<F, Fut>(test: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    #[allow(clippy::unwrap_used)]
    block_on_worker(IoBackend::Epoll, test()).unwrap();
    match uring::probe() {
        #[allow(clippy::unwrap_used)]
        Ok(()) => block_on_worker(IoBackend::IoUring, test()).unwrap(),
        Err(why) if std::env::var("GATEHOUSE_PROXY_IO_BACKEND").as_deref() == Ok("io_uring") => {
            #[allow(clippy::panic)]
            {
                panic!("io_uring required but unavailable: {why}")
            }
        }
        Err(why) => eprintln!("io_uring variant skipped: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied() -> Result<(), String> {
        Err("io_uring_setup: Operation not permitted (os error 1)".into())
    }

    #[test]
    fn auto_falls_back_to_epoll_and_says_why() {
        let (b, why) = choose_with(IoBackend::Auto, denied).unwrap();
        assert_eq!(b, IoBackend::Epoll);
        assert!(why.contains("not permitted"), "{why}");
        let (b, _) = choose_with(IoBackend::Auto, || Ok(())).unwrap();
        assert_eq!(b, IoBackend::IoUring);
    }

    #[test]
    fn forced_backends_are_obeyed_or_refused() {
        let (b, _) = choose_with(IoBackend::Epoll, || Ok(())).unwrap();
        assert_eq!(b, IoBackend::Epoll);
        let err = choose_with(IoBackend::IoUring, denied).unwrap_err();
        assert!(err.contains("asked for"), "{err}");
        assert_eq!("epoll".parse::<IoBackend>().unwrap(), IoBackend::Epoll);
        assert_eq!("io_uring".parse::<IoBackend>().unwrap(), IoBackend::IoUring);
        assert!("kqueue".parse::<IoBackend>().is_err());
    }
}
