//! The IMAP edge: one session per mailbox, incremental fetch by UID, IDLE
//! or polling, reconnection with backoff, quota and server-side retention.
//!
//! It owns the conversation with the provider's IMAP server and nothing
//! else: it knows no store, no PEC rule. The caller hands in a [`Cursor`]
//! (UIDVALIDITY and last UID seen, kept in its store) and receives
//! [`SyncEvent`]s; the cursor moves only after the caller's handler returned
//! `Ok` for a message, so a crash or a handler failure never skips mail.
//!
//! Invariants:
//! - read-only by default: the folder is opened with EXAMINE and bodies are
//!   fetched with `BODY.PEEK[]`, so `\Seen` is never set and people reading
//!   the same mailbox with webmail are not disturbed;
//! - nothing is deleted or moved except by [`apply_retention`], which refuses
//!   to run on a read-only session;
//! - every network call has a timeout (`ServerConfig::timeout`), every
//!   reconnection a bounded exponential backoff with jitter;
//! - messages are delivered in UID order; a UIDVALIDITY change is reported
//!   and followed by a full resync from UID 1 (the caller deduplicates by
//!   content).
//!
//! async-imap details (TOOLING.md §6.2, §8): the greeting is read here,
//! STARTTLS is a raw command followed by a new client on the TLS stream,
//! fetch streams are always consumed fully, unsolicited responses are
//! drained, IDLE uses `wait_with_timeout` and `done()` has its own timeout.

use std::future::Future;
use std::time::Duration;

use futures::TryStreamExt;
use jiff::Timestamp;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::{ImapConfig, RetentionAction, TlsMode};
use crate::telemetry::event;
use crate::tls::TlsError;

/// IDLE is re-issued at least this often (RFC 2177: servers may drop an
/// IDLE after 30 minutes).
pub const IDLE_MAX: Duration = Duration::from_secs(29 * 60);
/// First wait after a failure; doubled at each further failure.
pub const BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest wait between reconnection attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5 * 60);
/// Wait after the server refused the login: retrying sooner would only
/// lock the account (the password must be fixed first).
pub const AUTH_RETRY: Duration = Duration::from_secs(30 * 60);
/// While a mailbox stays above its quota threshold, `mailbox.quota_high`
/// is logged again at most this often.
pub const QUOTA_WARN_EVERY: Duration = Duration::from_secs(60 * 60);
/// Messages fetched per `UID FETCH` by [`run`].
pub const DEFAULT_BATCH: usize = 20;
/// Messages fetched per `UID FETCH`, and handed over together, by
/// [`run_batched`]: large enough that a backlog costs a few hundred
/// commits, not thousands (about 2 MB of receipts at a time).
pub const LARGE_BATCH: usize = 250;
/// UIDs per command in [`apply_retention`] (keeps command lines short).
const RETENTION_CHUNK: usize = 200;

/// Any stream an IMAP session can run over (TLS or, for local tests only,
/// plain TCP).
pub trait Io:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + std::fmt::Debug
{
}
impl<T> Io for T where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + std::fmt::Debug
{
}

/// The raw async-imap session type under [`Session`].
pub type RawSession = async_imap::Session<Box<dyn Io>>;

/// Where the caller stands in a folder: kept in its store between runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    /// UIDVALIDITY of the folder when `last_uid` was recorded; `None`
    /// before the first sync.
    pub uidvalidity: Option<u32>,
    /// Highest UID handled (handler returned `Ok`); `None`: nothing yet.
    pub last_uid: Option<u32>,
}

/// One message as fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Its UID.
    pub uid: u32,
    /// The UIDVALIDITY the UID belongs to.
    pub uidvalidity: u32,
    /// The message exactly as the server holds it (`BODY[]`).
    pub bytes: Vec<u8>,
}

/// What a sync reports to the caller, in this order: possibly
/// `UidValidityChanged`, the messages by UID, possibly `Quota`, `Synced`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncEvent {
    /// A new message (UID above the cursor).
    Message(Fetched),
    /// New messages, in UID order, as one fetch returned them
    /// ([`sync_once_batched`], [`run_batched`] only): the handler records
    /// them together; the cursor moves past the last one when it returns
    /// `Ok`.
    Messages(Vec<Fetched>),
    /// The folder's UIDVALIDITY is not the cursor's: every UID known so far
    /// is meaningless; all messages follow again from UID 1.
    UidValidityChanged {
        /// The cursor's value.
        old: u32,
        /// The server's value.
        new: u32,
    },
    /// Storage quota of the folder's quota root, in bytes (the server
    /// counts KiB; converted here).
    Quota {
        /// Bytes in use.
        used: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// The folder was read up to `last_uid` (0: empty so far).
    Synced {
        /// UIDVALIDITY of the folder.
        uidvalidity: u32,
        /// Highest UID handled.
        last_uid: u32,
        /// When the sync finished.
        at: Timestamp,
    },
}

/// Failures of the IMAP edge. Ask [`ImapError::is_auth`] and
/// [`ImapError::is_transient`] rather than matching variants.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImapError {
    /// TLS set-up, TCP connection or handshake failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// TCP connection failed (plain-text mode).
    #[error("connect {addr}: {source}")]
    Connect {
        /// host:port.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The server refused the login (wrong user or password).
    #[error("login refused for {user}: {reason}")]
    Auth {
        /// The login name.
        user: String,
        /// The server's answer.
        reason: String,
    },
    /// The server did not answer in time.
    #[error("{op}: no answer within {after:?}")]
    Timeout {
        /// The command.
        op: &'static str,
        /// The limit.
        after: Duration,
    },
    /// The server answered NO/BAD, broke the protocol or the connection.
    #[error("{op}: {source}")]
    Protocol {
        /// The command.
        op: &'static str,
        /// What async-imap reported.
        source: async_imap::error::Error,
    },
    /// The server closed the connection (no greeting, BYE, EOF in IDLE).
    #[error("{op}: connection closed by the server")]
    Closed {
        /// The command.
        op: &'static str,
    },
    /// The server's answer lacked something required (UIDVALIDITY, UID).
    #[error("{op}: {what} missing from the server's answer")]
    Missing {
        /// The command.
        op: &'static str,
        /// What was missing.
        what: &'static str,
    },
    /// The caller's handler failed; the cursor did not move past the event.
    #[error("handler: {0}")]
    Handler(String),
    /// A modifying operation on a session opened read-only.
    #[error("mailbox is read-only (set read_only = false to allow retention)")]
    ReadOnly,
}

impl ImapError {
    /// The server refused the credentials: retrying at once would not help
    /// and may lock the account.
    pub fn is_auth(&self) -> bool {
        matches!(self, Self::Auth { .. })
    }

    /// Worth retrying after a while (network, server, handler trouble).
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Auth { .. } | Self::ReadOnly)
    }
}

/// Runs `fut` under `limit`, naming the command in errors.
async fn timed<T>(
    limit: Duration,
    op: &'static str,
    fut: impl Future<Output = async_imap::error::Result<T>>,
) -> Result<T, ImapError> {
    match tokio::time::timeout(limit, fut).await {
        Err(_) => Err(ImapError::Timeout { op, after: limit }),
        Ok(Err(async_imap::error::Error::ConnectionLost)) => Err(ImapError::Closed { op }),
        Ok(Err(source)) => Err(ImapError::Protocol { op, source }),
        Ok(Ok(v)) => Ok(v),
    }
}

/// What the server offers, read once after login.
#[derive(Debug, Clone, Copy, Default)]
struct Caps {
    idle: bool,
    quota: bool,
    mv: bool,
    uidplus: bool,
}

/// A logged-in IMAP session.
pub struct Session {
    inner: RawSession,
    caps: Caps,
    timeout: Duration,
    read_only: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("idle", &self.caps.idle)
            .field("quota", &self.caps.quota)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// The server offers IDLE.
    pub fn has_idle(&self) -> bool {
        self.caps.idle
    }

    /// The server offers QUOTA.
    pub fn has_quota(&self) -> bool {
        self.caps.quota
    }

    /// The server offers MOVE.
    pub fn has_move(&self) -> bool {
        self.caps.mv
    }

    /// The session was opened read-only (`ImapConfig::read_only`).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The limit applied to each command.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The async-imap session, for commands this module does not wrap
    /// (tests, diagnostics). Consume every stream it returns.
    pub fn raw(&mut self) -> &mut RawSession {
        &mut self.inner
    }

    /// LOGOUT under the timeout; errors are ignored (the connection is
    /// dropped anyway).
    pub async fn logout(mut self) {
        let _ = timed(self.timeout, "LOGOUT", self.inner.logout()).await;
    }

    /// Forgets queued unsolicited responses (the channel is bounded and
    /// silently drops on overflow); returns whether new mail was announced.
    fn drain_unsolicited(&mut self) -> bool {
        let mut news = false;
        while let Ok(r) = self.inner.unsolicited_responses.try_recv() {
            if matches!(
                r,
                async_imap::types::UnsolicitedResponse::Exists(_)
                    | async_imap::types::UnsolicitedResponse::Recent(_)
            ) {
                news = true;
            }
        }
        news
    }
}

/// Reads the server greeting (async-imap does not).
async fn greeting<T: Io>(
    client: &mut async_imap::Client<T>,
    limit: Duration,
) -> Result<(), ImapError> {
    let op = "greeting";
    let resp = tokio::time::timeout(limit, client.read_response())
        .await
        .map_err(|_| ImapError::Timeout { op, after: limit })?
        .map_err(|e| ImapError::Protocol {
            op,
            source: e.into(),
        })?
        .ok_or(ImapError::Closed { op })?;
    match resp.parsed() {
        async_imap::imap_proto::Response::Data {
            status: async_imap::imap_proto::Status::Bye,
            ..
        } => Err(ImapError::Closed { op }),
        _ => Ok(()),
    }
}

/// Opens the connection as configured (implicit TLS, STARTTLS, or plain
/// text only when `InsecurePlaintext`), reads the greeting, logs in and
/// reads the capabilities.
///
/// # Errors
/// [`ImapError::is_auth`] when the server refused the login; a transient
/// error for anything else (network, TLS, timeout, protocol).
pub async fn connect(cfg: &ImapConfig) -> Result<Session, ImapError> {
    let s = &cfg.server;
    let limit = s.timeout;
    let addr = format!("{}:{}", s.host, s.port);
    let tcp = || async {
        let tcp = tokio::time::timeout(limit, TcpStream::connect((s.host.as_str(), s.port)))
            .await
            .map_err(|_| ImapError::Timeout {
                op: "connect",
                after: limit,
            })?
            .map_err(|e| ImapError::Connect {
                addr: addr.clone(),
                source: e,
            })?;
        let _ = tcp.set_nodelay(true);
        Ok::<_, ImapError>(tcp)
    };
    let handshake = |connector: tokio_native_tls::TlsConnector, tcp: TcpStream| async move {
        tokio::time::timeout(limit, connector.connect(&s.host, tcp))
            .await
            .map_err(|_| ImapError::Timeout {
                op: "TLS handshake",
                after: limit,
            })?
            .map_err(|e| ImapError::Tls(TlsError::Tls(e)))
    };
    let client: async_imap::Client<Box<dyn Io>> = match s.tls {
        TlsMode::Implicit => {
            let connector = crate::tls::connector(s.ca_file.as_deref())?;
            let stream = handshake(connector, tcp().await?).await?;
            let mut c = async_imap::Client::new(Box::new(stream) as Box<dyn Io>);
            greeting(&mut c, limit).await?;
            c
        }
        TlsMode::StartTls => {
            let connector = crate::tls::connector(s.ca_file.as_deref())?;
            let mut plain = async_imap::Client::new(tcp().await?);
            greeting(&mut plain, limit).await?;
            timed(
                limit,
                "STARTTLS",
                plain.run_command_and_check_ok("STARTTLS", None),
            )
            .await?;
            let stream = handshake(connector, plain.into_inner()).await?;
            // No greeting after STARTTLS.
            async_imap::Client::new(Box::new(stream) as Box<dyn Io>)
        }
        TlsMode::InsecurePlaintext => {
            let mut c = async_imap::Client::new(Box::new(tcp().await?) as Box<dyn Io>);
            greeting(&mut c, limit).await?;
            c
        }
    };
    let inner =
        match tokio::time::timeout(limit, client.login(&s.username, s.password.expose())).await {
            Err(_) => {
                return Err(ImapError::Timeout {
                    op: "LOGIN",
                    after: limit,
                });
            }
            Ok(Err((async_imap::error::Error::No(reason), _))) => {
                return Err(ImapError::Auth {
                    user: s.username.clone(),
                    reason,
                });
            }
            Ok(Err((async_imap::error::Error::ConnectionLost, _))) => {
                return Err(ImapError::Closed { op: "LOGIN" });
            }
            Ok(Err((source, _))) => {
                return Err(ImapError::Protocol {
                    op: "LOGIN",
                    source,
                });
            }
            Ok(Ok(inner)) => inner,
        };
    let mut session = Session {
        inner,
        caps: Caps::default(),
        timeout: limit,
        read_only: cfg.read_only,
    };
    let caps = timed(limit, "CAPABILITY", session.inner.capabilities()).await?;
    session.caps = Caps {
        idle: caps.has_str("IDLE"),
        quota: caps.has_str("QUOTA"),
        mv: caps.has_str("MOVE"),
        uidplus: caps.has_str("UIDPLUS"),
    };
    session.drain_unsolicited();
    Ok(session)
}

/// Opens `folder` (EXAMINE when `read_only`) and returns its UIDVALIDITY.
async fn open_folder(
    session: &mut Session,
    folder: &str,
    read_only: bool,
) -> Result<u32, ImapError> {
    let limit = session.timeout;
    let mb = if read_only {
        timed(limit, "EXAMINE", session.inner.examine(folder)).await?
    } else {
        timed(limit, "SELECT", session.inner.select(folder)).await?
    };
    session.drain_unsolicited();
    mb.uid_validity.ok_or(ImapError::Missing {
        op: "SELECT",
        what: "UIDVALIDITY",
    })
}

/// The UIDs above `after`, ascending. `UID FETCH n:*` always returns the
/// highest message even when n is above it, hence the filter.
async fn uids_after(session: &mut Session, after: u32) -> Result<Vec<u32>, ImapError> {
    let limit = session.timeout;
    let from = after.saturating_add(1);
    let inner = &mut session.inner;
    let fetches: Vec<_> = timed(limit, "UID FETCH (UID)", async {
        inner
            .uid_fetch(format!("{from}:*"), "(UID)")
            .await?
            .try_collect()
            .await
    })
    .await?;
    let mut uids: Vec<u32> = fetches
        .iter()
        .filter_map(|f| f.uid)
        .filter(|&u| u > after)
        .collect();
    uids.sort_unstable();
    uids.dedup();
    Ok(uids)
}

/// Fetches these UIDs' bodies (`BODY.PEEK[]`), sorted by UID. UIDs
/// expunged meanwhile are simply absent.
async fn fetch_bodies(
    session: &mut Session,
    uids: &[u32],
) -> Result<Vec<(u32, Vec<u8>)>, ImapError> {
    let limit = session.timeout;
    let set = uid_set(uids);
    let inner = &mut session.inner;
    let fetches: Vec<_> = timed(limit, "UID FETCH (BODY.PEEK[])", async {
        inner
            .uid_fetch(set, "(UID BODY.PEEK[])")
            .await?
            .try_collect()
            .await
    })
    .await?;
    let mut out = Vec::with_capacity(fetches.len());
    for f in &fetches {
        // A FETCH without UID or body is an unsolicited flag update.
        if let (Some(uid), Some(body)) = (f.uid, f.body())
            && uids.binary_search(&uid).is_ok()
        {
            out.push((uid, body.to_vec()));
        }
    }
    out.sort_by_key(|m| m.0);
    out.dedup_by_key(|m| m.0);
    Ok(out)
}

/// `1,2,5` for a sorted UID list (short ranges compressed to `a:b`).
fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end.saturating_add(1) {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

/// The storage quota of `folder`'s root, in bytes, if the server tells.
async fn read_quota(session: &mut Session, folder: &str) -> Result<Option<(u64, u64)>, ImapError> {
    let limit = session.timeout;
    let (_roots, quotas) =
        timed(limit, "GETQUOTAROOT", session.inner.get_quota_root(folder)).await?;
    session.drain_unsolicited();
    Ok(quotas
        .iter()
        .flat_map(|q| q.resources.iter())
        .find(|r| r.name == async_imap::types::QuotaResourceName::Storage)
        .map(|r| (r.usage.saturating_mul(1024), r.limit.saturating_mul(1024))))
}

/// One pass over `folder`: opens it (EXAMINE when `read_only`), checks
/// UIDVALIDITY against `cursor`, fetches every message above the cursor in
/// batches of `batch` and hands each to `emit` in UID order, then the quota
/// (when offered) and `Synced`.
///
/// `cursor` moves as `emit` accepts events: after a `Message` it names that
/// UID, after `UidValidityChanged` it holds the new UIDVALIDITY and no UID.
/// A first sync (`uidvalidity: None`) adopts the server's value silently.
///
/// # Errors
/// Network and protocol failures, or [`ImapError::Handler`] when `emit`
/// failed (the cursor stays before that event).
pub async fn sync_once<F, Fut>(
    session: &mut Session,
    folder: &str,
    cursor: &mut Cursor,
    read_only: bool,
    batch: usize,
    emit: &mut F,
) -> Result<(), ImapError>
where
    F: FnMut(SyncEvent) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    sync_inner(session, folder, cursor, read_only, batch, false, emit).await
}

/// [`sync_once`], but the messages of each fetch of `batch` go to `emit`
/// together as one [`SyncEvent::Messages`], and the next batch is fetched
/// while `emit` handles the previous one (the server's time overlaps the
/// caller's). The cursor moves past a batch when `emit` accepted it.
///
/// # Errors
/// As [`sync_once`].
pub async fn sync_once_batched<F, Fut>(
    session: &mut Session,
    folder: &str,
    cursor: &mut Cursor,
    read_only: bool,
    batch: usize,
    emit: &mut F,
) -> Result<(), ImapError>
where
    F: FnMut(SyncEvent) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    sync_inner(session, folder, cursor, read_only, batch, true, emit).await
}

async fn sync_inner<F, Fut>(
    session: &mut Session,
    folder: &str,
    cursor: &mut Cursor,
    read_only: bool,
    batch: usize,
    batched: bool,
    emit: &mut F,
) -> Result<(), ImapError>
where
    F: FnMut(SyncEvent) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let uidvalidity = open_folder(session, folder, read_only).await?;
    match cursor.uidvalidity {
        Some(old) if old != uidvalidity => {
            emit(SyncEvent::UidValidityChanged {
                old,
                new: uidvalidity,
            })
            .await
            .map_err(ImapError::Handler)?;
            *cursor = Cursor {
                uidvalidity: Some(uidvalidity),
                last_uid: None,
            };
        }
        Some(_) => {}
        None => {
            *cursor = Cursor {
                uidvalidity: Some(uidvalidity),
                last_uid: None,
            };
        }
    }
    let after = cursor.last_uid.unwrap_or(0);
    let uids = uids_after(session, after).await?;
    if batched {
        let mut chunks = uids.chunks(batch.max(1));
        let mut current = match chunks.next() {
            Some(c) => fetch_bodies(session, c).await?,
            None => Vec::new(),
        };
        while !current.is_empty() {
            let fetched: Vec<Fetched> = std::mem::take(&mut current)
                .into_iter()
                .map(|(uid, bytes)| Fetched {
                    uid,
                    uidvalidity,
                    bytes,
                })
                .collect();
            let last = fetched.last().map(|f| f.uid);
            let next = chunks.next();
            // The next fetch runs while the handler records this batch.
            let (handled, prefetched) = tokio::join!(emit(SyncEvent::Messages(fetched)), async {
                match next {
                    Some(c) => fetch_bodies(session, c).await,
                    None => Ok(Vec::new()),
                }
            });
            handled.map_err(ImapError::Handler)?;
            cursor.last_uid = last.or(cursor.last_uid);
            current = prefetched?;
            // A chunk whose UIDs were all expunged meanwhile: go on.
            while current.is_empty() {
                let Some(c) = chunks.next() else { break };
                current = fetch_bodies(session, c).await?;
            }
        }
    } else {
        for chunk in uids.chunks(batch.max(1)) {
            for (uid, bytes) in fetch_bodies(session, chunk).await? {
                emit(SyncEvent::Message(Fetched {
                    uid,
                    uidvalidity,
                    bytes,
                }))
                .await
                .map_err(ImapError::Handler)?;
                cursor.last_uid = Some(uid);
            }
        }
    }
    if session.caps.quota {
        match read_quota(session, folder).await {
            Ok(Some((used, limit))) => emit(SyncEvent::Quota { used, limit })
                .await
                .map_err(ImapError::Handler)?,
            Ok(None) => {}
            // A NO to GETQUOTAROOT does not make the sync fail.
            Err(ImapError::Protocol { op, source }) => {
                tracing::debug!(error = %source, op, "quota not readable");
            }
            Err(e) => return Err(e),
        }
    }
    emit(SyncEvent::Synced {
        uidvalidity,
        last_uid: cursor.last_uid.unwrap_or(0),
        at: Timestamp::now(),
    })
    .await
    .map_err(ImapError::Handler)
}

/// Server-side retention on `folder`: the messages `uids` are moved to
/// `Move { folder }` (created if missing; UID MOVE when offered, else UID
/// COPY + `\Deleted` + expunge) or deleted (`Expunge`). Nothing else is
/// touched when the server has UIDPLUS; without it, EXPUNGE also removes
/// messages someone else marked `\Deleted`. Returns how many UIDs were
/// handled. The caller decides which UIDs (archived and recorded long
/// enough ago).
///
/// # Errors
/// [`ImapError::ReadOnly`] on a read-only session; network and protocol
/// failures.
pub async fn apply_retention(
    session: &mut Session,
    folder: &str,
    uids: &[u32],
    action: &RetentionAction,
) -> Result<usize, ImapError> {
    if session.read_only {
        return Err(ImapError::ReadOnly);
    }
    if uids.is_empty() {
        return Ok(0);
    }
    let limit = session.timeout;
    let mut sorted = uids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if let RetentionAction::Move { folder: to } = action {
        // Exists already: NO, which is fine; a real problem shows at MOVE.
        let _ = timed(limit, "CREATE", session.inner.create(to)).await;
    }
    open_folder(session, folder, false).await?;
    for chunk in sorted.chunks(RETENTION_CHUNK) {
        let set = uid_set(chunk);
        match action {
            RetentionAction::Move { folder: to } if session.caps.mv => {
                timed(limit, "UID MOVE", session.inner.uid_mv(&set, to)).await?;
            }
            RetentionAction::Move { folder: to } => {
                timed(limit, "UID COPY", session.inner.uid_copy(&set, to)).await?;
                delete(session, &set).await?;
            }
            RetentionAction::Expunge => delete(session, &set).await?,
        }
        session.drain_unsolicited();
    }
    Ok(sorted.len())
}

/// Marks `set` `\Deleted` and expunges it (only it, with UIDPLUS).
async fn delete(session: &mut Session, set: &str) -> Result<(), ImapError> {
    let limit = session.timeout;
    let inner = &mut session.inner;
    timed(limit, "UID STORE", async {
        inner
            .uid_store(set, "+FLAGS.SILENT (\\Deleted)")
            .await?
            .try_collect::<Vec<_>>()
            .await
    })
    .await?;
    let uidplus = session.caps.uidplus;
    let inner = &mut session.inner;
    timed(limit, "EXPUNGE", async {
        if uidplus {
            inner.uid_expunge(set).await?.try_collect::<Vec<_>>().await
        } else {
            inner.expunge().await?.try_collect::<Vec<_>>().await
        }
    })
    .await?;
    Ok(())
}

/// The next wait of an exponential backoff with up to 25 % jitter.
fn backoff(failures: u32) -> Duration {
    let base = BACKOFF_START
        .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(16)))
        .min(BACKOFF_MAX);
    // A fresh RandomState is randomly keyed: enough spread for jitter
    // without a clock read or an RNG crate.
    let random = {
        use std::hash::{BuildHasher, Hasher};
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    };
    let jitter = base.mul_f64((random % 250) as f64 / 1000.0);
    (base + jitter).min(BACKOFF_MAX + BACKOFF_MAX / 4)
}

/// Sleeps unless cancelled; returns `false` when cancelled.
async fn pause(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

/// How a wait for new mail ended.
enum Woke {
    /// Sync again (new data, timeout).
    Sync(Session),
    /// Cancelled; the session is logged out.
    Cancelled,
}

/// Waits for new mail: IDLE when offered and enabled (re-issued each
/// `min(poll, 29 min)`), else a sleep of `poll`.
async fn wait_for_mail(
    session: Session,
    cfg: &ImapConfig,
    cancel: &CancellationToken,
) -> Result<Woke, ImapError> {
    let mut session = session;
    if session.drain_unsolicited() {
        // New mail announced during the last sync.
        return Ok(Woke::Sync(session));
    }
    if !(cfg.idle && session.caps.idle) {
        if !pause(cancel, cfg.poll).await {
            session.logout().await;
            return Ok(Woke::Cancelled);
        }
        return Ok(Woke::Sync(session));
    }
    let limit = session.timeout;
    let Session {
        inner,
        caps,
        timeout,
        read_only,
    } = session;
    // EXISTS sent before the server's "+ idling" goes to this channel, not
    // to the IDLE wait: look at it after init (the FETCH/IDLE race).
    let unsolicited = inner.unsolicited_responses.clone();
    let mut handle = inner.idle();
    timed(limit, "IDLE", handle.init()).await?;
    let mut cancelled = false;
    let mut news = false;
    while let Ok(r) = unsolicited.try_recv() {
        news |= matches!(
            r,
            async_imap::types::UnsolicitedResponse::Exists(_)
                | async_imap::types::UnsolicitedResponse::Recent(_)
        );
    }
    let idle_for = cfg.poll.min(IDLE_MAX).max(Duration::from_secs(1));
    if !news {
        let (fut, _stop) = handle.wait_with_timeout(idle_for);
        tokio::select! {
            () = cancel.cancelled() => cancelled = true,
            r = fut => match r {
                Ok(async_imap::extensions::idle::IdleResponse::ManualInterrupt) => {
                    // Never interrupted by us (the stop source is held):
                    // the stream ended.
                    return Err(ImapError::Closed { op: "IDLE" });
                }
                Ok(_) => {}
                Err(async_imap::error::Error::ConnectionLost) => {
                    return Err(ImapError::Closed { op: "IDLE" });
                }
                Err(source) => return Err(ImapError::Protocol { op: "IDLE", source }),
            },
        }
    }
    let inner = timed(limit, "DONE", handle.done()).await?;
    let session = Session {
        inner,
        caps,
        timeout,
        read_only,
    };
    if cancelled {
        session.logout().await;
        return Ok(Woke::Cancelled);
    }
    Ok(Woke::Sync(session))
}

/// Watches `cfg.folder` until `cancel`: connect, sync, wait (IDLE or
/// poll), sync again; after any failure, log it and reconnect with backoff
/// (1 s doubling to 5 min, jittered; 30 min after a refused login). Each
/// event goes to `handler`, which must have recorded it durably before
/// returning `Ok`; when it fails, the session is dropped and the same event
/// comes again after reconnecting. Returns the cursor reached.
///
/// `mailbox` is the configured mailbox name, for the logs.
pub async fn run<F, Fut>(
    mailbox: &str,
    cfg: ImapConfig,
    cursor: Cursor,
    handler: F,
    cancel: CancellationToken,
) -> Cursor
where
    F: FnMut(SyncEvent) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    run_inner(mailbox, cfg, cursor, handler, cancel, false).await
}

/// [`run`], with the messages handed over in batches of up to
/// [`LARGE_BATCH`] ([`SyncEvent::Messages`], see [`sync_once_batched`]):
/// what `pecgate run` uses, so that a backlog is recorded in a few large
/// store transactions.
pub async fn run_batched<F, Fut>(
    mailbox: &str,
    cfg: ImapConfig,
    cursor: Cursor,
    handler: F,
    cancel: CancellationToken,
) -> Cursor
where
    F: FnMut(SyncEvent) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    run_inner(mailbox, cfg, cursor, handler, cancel, true).await
}

async fn run_inner<F, Fut>(
    mailbox: &str,
    cfg: ImapConfig,
    cursor: Cursor,
    mut handler: F,
    cancel: CancellationToken,
    batched: bool,
) -> Cursor
where
    F: FnMut(SyncEvent) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut cursor = cursor;
    let mut failures: u32 = 0;
    let warn_percent = u64::from(cfg.quota_warn_percent);
    // The quota warning is logged when the use crosses the threshold and
    // then at most every QUOTA_WARN_EVERY while it stays above (every sync
    // would flood the log).
    let mut quota_warned: Option<std::time::Instant> = None;
    let mut emit = |ev: SyncEvent| {
        if let SyncEvent::Quota { used, limit } = &ev
            && !(*limit > 0 && used.saturating_mul(100) >= limit.saturating_mul(warn_percent))
        {
            quota_warned = None;
        }
        match &ev {
            SyncEvent::UidValidityChanged { old, new } => tracing::warn!(
                event = event::MAILBOX_UIDVALIDITY_CHANGED,
                mailbox,
                old,
                new,
                "uidvalidity changed: full resync"
            ),
            SyncEvent::Quota { used, limit }
                if *limit > 0
                    && used.saturating_mul(100) >= limit.saturating_mul(warn_percent)
                    && quota_warned.is_none_or(|t| t.elapsed() >= QUOTA_WARN_EVERY) =>
            {
                quota_warned = Some(std::time::Instant::now());
                tracing::warn!(
                    event = event::MAILBOX_QUOTA_HIGH,
                    mailbox,
                    used,
                    limit,
                    "mailbox quota nearly used up"
                );
            }
            SyncEvent::Message(f) => {
                tracing::debug!(mailbox, uid = f.uid, "message fetched");
            }
            SyncEvent::Messages(fs) => {
                for f in fs {
                    tracing::debug!(mailbox, uid = f.uid, "message fetched");
                }
            }
            _ => {}
        }
        handler(ev)
    };
    while !cancel.is_cancelled() {
        let mut session = match tokio::select! {
            () = cancel.cancelled() => break,
            r = connect(&cfg) => r,
        } {
            Ok(s) => {
                tracing::info!(
                    event = event::MAILBOX_CONNECTED,
                    mailbox,
                    idle = s.caps.idle,
                    "imap connected"
                );
                s
            }
            Err(e) if e.is_auth() => {
                tracing::error!(event = event::MAILBOX_AUTH_REFUSED, mailbox, error = %e, "imap login refused");
                if !pause(&cancel, AUTH_RETRY).await {
                    break;
                }
                continue;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = backoff(failures);
                tracing::warn!(event = event::MAILBOX_DISCONNECTED, mailbox, error = %e, retry_in = ?wait, "imap connection failed");
                if !pause(&cancel, wait).await {
                    break;
                }
                continue;
            }
        };
        let failure = loop {
            if let Err(e) = sync_inner(
                &mut session,
                &cfg.folder,
                &mut cursor,
                cfg.read_only,
                if batched { LARGE_BATCH } else { DEFAULT_BATCH },
                batched,
                &mut emit,
            )
            .await
            {
                break e;
            }
            failures = 0;
            if cancel.is_cancelled() {
                session.logout().await;
                return cursor;
            }
            match wait_for_mail(session, &cfg, &cancel).await {
                Ok(Woke::Sync(s)) => session = s,
                Ok(Woke::Cancelled) => return cursor,
                Err(e) => break e,
            }
        };
        failures = failures.saturating_add(1);
        let wait = backoff(failures);
        tracing::warn!(
            event = event::MAILBOX_DISCONNECTED,
            mailbox,
            uid = cursor.last_uid,
            error = %failure,
            retry_in = ?wait,
            "imap session failed; reconnecting"
        );
        if !pause(&cancel, wait).await {
            break;
        }
    }
    cursor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_sets() {
        assert_eq!(uid_set(&[]), "");
        assert_eq!(uid_set(&[4]), "4");
        assert_eq!(uid_set(&[1, 2, 3, 7, 9, 10]), "1:3,7,9:10");
        assert_eq!(
            uid_set(&[u32::MAX - 1, u32::MAX]),
            format!("{}:{}", u32::MAX - 1, u32::MAX)
        );
    }

    #[test]
    fn backoff_is_bounded() {
        assert!(backoff(1) >= BACKOFF_START && backoff(1) < BACKOFF_START * 2);
        assert!(backoff(3) >= Duration::from_secs(4));
        assert!(backoff(100) <= BACKOFF_MAX + BACKOFF_MAX / 4);
        assert!(backoff(100) >= BACKOFF_MAX);
    }

    #[test]
    fn errors_classified() {
        let auth = ImapError::Auth {
            user: "u".into(),
            reason: "no".into(),
        };
        assert!(auth.is_auth() && !auth.is_transient());
        let t = ImapError::Timeout {
            op: "LOGIN",
            after: Duration::from_secs(1),
        };
        assert!(!t.is_auth() && t.is_transient());
    }
}
