//! Group commit: many callers' writes, one task, one transaction per batch. Each caller hands
//! in a job and waits; the task takes every job waiting (up to a limit), writes them in one
//! transaction (one fsync shared by all), and answers each caller with its own result. A
//! failed transaction fails every job of its batch, and nothing of it is stored.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};
use tonic::Status;

type Job<J, R> = (J, oneshot::Sender<Result<R, String>>);

/// The queue of jobs `J`, each answered with an `R`.
#[derive(Debug)]
pub(crate) struct GroupCommit<J, R> {
    tx: mpsc::UnboundedSender<Job<J, R>>,
}

impl<J: Send + 'static, R: Send + 'static> GroupCommit<J, R> {
    /// Start the writer on the current runtime. `write` gets the jobs of a batch (at most
    /// `max_jobs`) and returns one result per job, in order; `None` ends the writer (its owner
    /// is gone).
    pub(crate) fn start<F, Fut>(max_jobs: usize, mut write: F) -> Self
    where
        F: FnMut(Vec<J>) -> Fut + Send + 'static,
        Fut: Future<Output = Option<Result<Vec<R>, String>>> + Send,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job<J, R>>();
        tokio::spawn(async move {
            let mut batch: Vec<Job<J, R>> = Vec::with_capacity(max_jobs);
            while rx.recv_many(&mut batch, max_jobs).await > 0 {
                let (jobs, answers): (Vec<J>, Vec<_>) = batch.drain(..).unzip();
                let Some(result) = write(jobs).await else {
                    return;
                };
                match result {
                    Ok(results) if results.len() == answers.len() => {
                        for (done, r) in answers.into_iter().zip(results) {
                            let _ = done.send(Ok(r));
                        }
                    }
                    Ok(results) => {
                        let msg = format!(
                            "group commit: {} results for {} jobs",
                            results.len(),
                            answers.len()
                        );
                        for done in answers {
                            let _ = done.send(Err(msg.clone()));
                        }
                    }
                    Err(msg) => {
                        for done in answers {
                            let _ = done.send(Err(msg.clone()));
                        }
                    }
                }
            }
        });
        Self { tx }
    }

    /// Hand in `job` and wait until its batch is written.
    pub(crate) async fn submit(&self, job: J) -> Result<R, Status> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send((job, done))
            .map_err(|_| Status::unavailable("Auth is shutting down"))?;
        match wait.await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(super::internal(e)),
            Err(_) => Err(Status::unavailable("Auth is shutting down")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn jobs_waiting_together_share_a_batch_and_get_their_own_answers() {
        let batches = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&batches);
        let gc = Arc::new(GroupCommit::<u32, u32>::start(64, move |jobs: Vec<u32>| {
            seen.fetch_add(1, Ordering::Relaxed);
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                if jobs.contains(&13) {
                    return Some(Err("unlucky batch".into()));
                }
                Some(Ok(jobs.iter().map(|j| j * 2).collect()))
            }
        }));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..100u32 {
            let gc = Arc::clone(&gc);
            tasks.spawn(async move { (i, gc.submit(i + 100).await) });
        }
        for (i, r) in tasks.join_all().await {
            assert_eq!(r.unwrap(), (i + 100) * 2);
        }
        assert!(batches.load(Ordering::Relaxed) < 100, "jobs were batched");
        // The reason goes to the log; the caller is told it was internal.
        let err = gc.submit(13).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal, "{err}");
    }
}
