//! [`Store`]: the async handle; one dedicated thread owns the [`Db`].

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::error::{StoreError, display_path};
use super::{Db, Result};

/// How many requests may wait for the store thread before senders wait too.
const QUEUE: usize = 256;

type Job = Box<dyn FnOnce(&mut Db) + Send>;

enum Request {
    Run(Job),
    Close(oneshot::Sender<Result<()>>),
}

/// The async handle to the store: a dedicated OS thread owns the [`Db`] and runs the
/// closures sent to it one at a time, in order, so that no rusqlite call ever runs on a
/// tokio worker thread and all of the daemon's writes go through one owner.
///
/// Cheap to clone; every clone talks to the same thread. Other processes (CLI commands
/// while the daemon runs) open their own [`Db`] on the same file: SQLite's locks and the
/// 5 s busy timeout make their writes wait for the daemon's, not fail.
#[derive(Clone)]
pub struct Store {
    /// Requests to the thread (FIFO: [`Store::close`] runs after everything sent before).
    sender: mpsc::Sender<Request>,
    /// Joined by [`Store::close`]; `None` once taken.
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
    /// For messages.
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Starts the store thread, which opens (and migrates) the database at `path`;
    /// returns once it is open.
    ///
    /// # Errors
    ///
    /// Whatever [`Db::open`] returns, reported back from the thread;
    /// [`StoreError::Thread`] when the thread cannot be started.
    pub async fn open(path: impl AsRef<Path>) -> Result<Store> {
        let path = path.as_ref().to_path_buf();
        let (sender, mut receiver) = mpsc::channel::<Request>(QUEUE);
        let (opened_tx, opened_rx) = oneshot::channel::<Result<()>>();
        let thread_path = path.clone();
        let thread = std::thread::Builder::new()
            .name("pecgate-store".into())
            .spawn(move || {
                let mut db = match Db::open(&thread_path) {
                    Ok(db) => {
                        let _ = opened_tx.send(Ok(()));
                        db
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                while let Some(request) = receiver.blocking_recv() {
                    match request {
                        Request::Run(job) => job(&mut db),
                        Request::Close(reply) => {
                            // Refuse anything sent after the close, then finish.
                            receiver.close();
                            while let Ok(Request::Run(job)) = receiver.try_recv() {
                                job(&mut db);
                            }
                            let _ = reply.send(db.close());
                            return;
                        }
                    }
                }
                // Every handle was dropped without close: still checkpoint and close.
                if let Err(e) = db.close() {
                    tracing::warn!(error = %e, "store closed with an error");
                }
            })
            .map_err(|source| StoreError::Thread {
                path: display_path(&path),
                source,
            })?;
        match opened_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(StoreError::Closed);
            }
        }
        Ok(Store {
            sender,
            thread: Arc::new(Mutex::new(Some(thread))),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the store thread and returns its result. Requests run one at a time,
    /// in the order they were sent. Use [`Db::write`] inside `f` to make several changes
    /// in one transaction. If `f` panics, its transaction is rolled back, the store
    /// keeps running and this returns [`StoreError::Panicked`].
    ///
    /// # Errors
    ///
    /// `f`'s error; [`StoreError::Closed`] when the store has stopped.
    pub async fn call<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Db) -> Result<R> + Send + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel();
        let job: Job = Box::new(move |db: &mut Db| {
            let out = std::panic::catch_unwind(AssertUnwindSafe(|| f(db))).unwrap_or_else(|p| {
                let what = p
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                Err(StoreError::Panicked(what))
            });
            let _ = reply_tx.send(out);
        });
        self.sender
            .send(Request::Run(job))
            .await
            .map_err(|_| StoreError::Closed)?;
        reply_rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Lets every request already sent finish, checkpoints the WAL, closes the database
    /// and joins the thread. Other clones get [`StoreError::Closed`] afterwards.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] from the checkpoint or close; [`StoreError::Closed`] when
    /// the store had already stopped.
    pub async fn close(self) -> Result<()> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let sent = self.sender.send(Request::Close(reply_tx)).await;
        let out = match sent {
            Ok(()) => reply_rx.await.map_err(|_| StoreError::Closed)?,
            Err(_) => Err(StoreError::Closed),
        };
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            // The thread has replied (or stopped) and ends right away; joining off the
            // async threads anyway.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        out
    }
}
