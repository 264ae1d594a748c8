//! The sandbox provider's SMTP submission service: STARTTLS and implicit
//! TLS on loopback, AUTH PLAIN/LOGIN (only over TLS), one message per
//! transaction handed to a [`SubmissionHandler`].
//!
//! The protocol is parsed by `smtp-proto` (sans-IO); this module only moves
//! bytes, keeps the session state and upgrades the stream on STARTTLS.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use smtp_proto::request::receiver::{DataReceiver, RequestReceiver};
use smtp_proto::{
    AUTH_LOGIN, AUTH_PLAIN, EXT_8BIT_MIME, EXT_AUTH, EXT_ENHANCED_STATUS_CODES, EXT_SIZE,
    EXT_START_TLS, EhloResponse, Request,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_native_tls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The largest message accepted (bytes); larger ones get 552.
pub const MAX_MESSAGE_BYTES: usize = 200 * 1024 * 1024;

/// How long a client may stay silent before the connection is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// One submitted message.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The authenticated user (the mailbox address).
    pub user: String,
    /// MAIL FROM.
    pub mail_from: String,
    /// Every RCPT TO, in order.
    pub rcpts: Vec<String>,
    /// The message as received (dot-unstuffed, CRLF).
    pub data: Vec<u8>,
}

/// What to answer after DATA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataOutcome {
    /// Send this reply (250 to accept).
    Reply(u16, String),
    /// Process the message, then close the connection without replying
    /// (the client cannot know it was accepted).
    DropAfterAccepting,
    /// Close the connection without replying and without processing.
    DropWithoutAccepting,
}

/// The provider behind the SMTP service.
pub trait SubmissionHandler: Send + Sync + 'static {
    /// Checks a login; `Err(reply)` refuses it with that reply text (535).
    fn authenticate(&self, user: &str, password: &str) -> Result<(), String>;
    /// Called at MAIL FROM: `Some((code, text))` refuses the transaction
    /// (e.g. 451 4.7.0 for too much traffic).
    fn admit(&self, user: &str) -> Option<(u16, String)>;
    /// Handles a complete message.
    fn submit(&self, submission: Submission) -> impl Future<Output = DataOutcome> + Send;
}

/// Whether a listener starts in clear text (STARTTLS offered) or in TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plain TCP, STARTTLS required before AUTH.
    StartTls,
    /// TLS from the first byte (port 465 style).
    Implicit,
}

/// Accepts connections until `cancel` fires; every session is tracked.
pub async fn serve<H: SubmissionHandler>(
    listener: TcpListener,
    mode: Mode,
    tls: TlsAcceptor,
    hostname: String,
    handler: Arc<H>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (tcp, _) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "sandbox smtp: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (tls, hostname, handler, cancel) = (
            tls.clone(),
            hostname.clone(),
            handler.clone(),
            cancel.clone(),
        );
        tracker.spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                r = connection(tcp, mode, tls, hostname, handler) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "sandbox smtp: session ended");
                    }
                }
            }
        });
    }
}

async fn connection<H: SubmissionHandler>(
    tcp: TcpStream,
    mode: Mode,
    tls: TlsAcceptor,
    hostname: String,
    handler: Arc<H>,
) -> std::io::Result<()> {
    let _ = tcp.set_nodelay(true);
    match mode {
        Mode::Implicit => {
            let stream = tls.accept(tcp).await.map_err(std::io::Error::other)?;
            let mut s = Session::new(stream, true, &hostname, handler);
            s.greet().await?;
            s.run().await.map(|_| ())
        }
        Mode::StartTls => {
            let mut s = Session::new(tcp, false, &hostname, handler.clone());
            s.greet().await?;
            if let End::StartTls = s.run().await? {
                let tcp = s.stream;
                let stream = tls.accept(tcp).await.map_err(std::io::Error::other)?;
                let mut s = Session::new(stream, true, &hostname, handler);
                s.run().await?;
            }
            Ok(())
        }
    }
}

enum End {
    Quit,
    StartTls,
}

struct Session<'h, S, H> {
    stream: S,
    tls: bool,
    hostname: &'h str,
    handler: Arc<H>,
    buf: Vec<u8>,
    pos: usize,
    user: Option<String>,
    mail_from: Option<String>,
    rcpts: Vec<String>,
}

impl<'h, S: AsyncRead + AsyncWrite + Unpin, H: SubmissionHandler> Session<'h, S, H> {
    fn new(stream: S, tls: bool, hostname: &'h str, handler: Arc<H>) -> Self {
        Session {
            stream,
            tls,
            hostname,
            handler,
            buf: Vec::with_capacity(8192),
            pos: 0,
            user: None,
            mail_from: None,
            rcpts: Vec::new(),
        }
    }

    async fn greet(&mut self) -> std::io::Result<()> {
        let line = format!(
            "220 {} ESMTP pecgate sandbox PEC provider\r\n",
            self.hostname
        );
        self.send(&line).await
    }

    async fn send(&mut self, text: &str) -> std::io::Result<()> {
        self.stream.write_all(text.as_bytes()).await?;
        self.stream.flush().await
    }

    async fn reply(&mut self, code: u16, text: &str) -> std::io::Result<()> {
        self.send(&format!("{code} {text}\r\n")).await
    }

    /// Reads more bytes; `Ok(false)` at end of stream.
    async fn fill(&mut self) -> std::io::Result<bool> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(IDLE_TIMEOUT, self.stream.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "idle timeout"))??;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// Reads one line (for AUTH continuations), without its line end.
    async fn read_line(&mut self) -> std::io::Result<Option<String>> {
        loop {
            if let Some(i) = self.buf[self.pos..].iter().position(|&b| b == b'\n') {
                let line = &self.buf[self.pos..self.pos + i];
                let line = String::from_utf8_lossy(line)
                    .trim_end_matches('\r')
                    .to_owned();
                self.pos += i + 1;
                return Ok(Some(line));
            }
            if self.buf.len() - self.pos > 8192 {
                return Ok(None);
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    async fn run(&mut self) -> std::io::Result<End> {
        let mut receiver = RequestReceiver::default();
        loop {
            let request = {
                let mut iter = self.buf[self.pos..].iter();
                let before = iter.len();
                let r = receiver.ingest(&mut iter).map(|r| r.into_owned());
                let consumed = before - iter.len();
                self.pos += consumed;
                r
            };
            let request = match request {
                Ok(r) => r,
                Err(smtp_proto::Error::NeedsMoreData { .. }) => {
                    if !self.fill().await? {
                        return Ok(End::Quit);
                    }
                    continue;
                }
                Err(smtp_proto::Error::ResponseTooLong) => {
                    self.reply(500, "5.5.2 line too long").await?;
                    continue;
                }
                Err(smtp_proto::Error::UnknownCommand) => {
                    self.reply(502, "5.5.1 command not implemented").await?;
                    continue;
                }
                Err(e) => {
                    self.reply(501, &format!("5.5.4 syntax error: {e:?}"))
                        .await?;
                    continue;
                }
            };
            match request {
                Request::Ehlo { host: _ } | Request::Helo { host: _ } => {
                    self.mail_from = None;
                    self.rcpts.clear();
                    let mut ehlo = EhloResponse::new(self.hostname);
                    ehlo.capabilities = EXT_8BIT_MIME | EXT_ENHANCED_STATUS_CODES | EXT_SIZE;
                    ehlo.size = MAX_MESSAGE_BYTES;
                    if self.tls {
                        ehlo.capabilities |= EXT_AUTH;
                        ehlo.auth_mechanisms = AUTH_PLAIN | AUTH_LOGIN;
                    } else {
                        ehlo.capabilities |= EXT_START_TLS;
                    }
                    let mut out = Vec::new();
                    ehlo.write(&mut out)?;
                    self.stream.write_all(&out).await?;
                    self.stream.flush().await?;
                }
                Request::StartTls => {
                    if self.tls {
                        self.reply(503, "5.5.1 already in TLS").await?;
                    } else {
                        self.reply(220, "2.0.0 ready to start TLS").await?;
                        // Bytes pipelined after STARTTLS would be a
                        // plaintext injection: drop them.
                        return Ok(End::StartTls);
                    }
                }
                Request::Auth {
                    mechanism,
                    initial_response,
                } => self.auth(mechanism, initial_response).await?,
                Request::Mail { from } => {
                    let Some(user) = self.user.clone() else {
                        self.reply(530, "5.7.0 authentication required").await?;
                        continue;
                    };
                    if self.mail_from.is_some() {
                        self.reply(503, "5.5.1 nested MAIL command").await?;
                        continue;
                    }
                    if let Some((code, text)) = self.handler.admit(&user) {
                        self.reply(code, &text).await?;
                        continue;
                    }
                    self.mail_from = Some(from.address);
                    self.rcpts.clear();
                    self.reply(250, "2.1.0 sender ok").await?;
                }
                Request::Rcpt { to } => {
                    if self.mail_from.is_none() {
                        self.reply(503, "5.5.1 MAIL first").await?;
                    } else if self.rcpts.len() >= 1000 {
                        self.reply(452, "4.5.3 too many recipients").await?;
                    } else {
                        self.rcpts.push(to.address);
                        self.reply(250, "2.1.5 recipient ok").await?;
                    }
                }
                Request::Data => {
                    if self.mail_from.is_none() || self.rcpts.is_empty() {
                        self.reply(503, "5.5.1 MAIL and RCPT first").await?;
                        continue;
                    }
                    self.reply(354, "start mail input; end with <CRLF>.<CRLF>")
                        .await?;
                    let Some(data) = self.read_data().await? else {
                        return Ok(End::Quit);
                    };
                    let submission = Submission {
                        user: self.user.clone().unwrap_or_default(),
                        mail_from: self.mail_from.take().unwrap_or_default(),
                        rcpts: std::mem::take(&mut self.rcpts),
                        data,
                    };
                    if submission.data.len() > MAX_MESSAGE_BYTES {
                        self.reply(552, "5.3.4 message too big").await?;
                        continue;
                    }
                    match self.handler.submit(submission).await {
                        DataOutcome::Reply(code, text) => self.reply(code, &text).await?,
                        DataOutcome::DropAfterAccepting | DataOutcome::DropWithoutAccepting => {
                            return Ok(End::Quit);
                        }
                    }
                }
                Request::Rset => {
                    self.mail_from = None;
                    self.rcpts.clear();
                    self.reply(250, "2.0.0 ok").await?;
                }
                Request::Noop { .. } => self.reply(250, "2.0.0 ok").await?,
                Request::Quit => {
                    self.reply(221, "2.0.0 bye").await?;
                    return Ok(End::Quit);
                }
                Request::Bdat { .. } => {
                    self.reply(502, "5.5.1 CHUNKING not offered").await?;
                }
                _ => self.reply(502, "5.5.1 command not implemented").await?,
            }
        }
    }

    async fn read_data(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut receiver = DataReceiver::new();
        let mut data = Vec::new();
        loop {
            let done = {
                let mut iter = self.buf[self.pos..].iter();
                let before = iter.len();
                let done = receiver.ingest(&mut iter, &mut data);
                self.pos += before - iter.len();
                done
            };
            if done {
                return Ok(Some(data));
            }
            if data.len() > MAX_MESSAGE_BYTES + 1024 * 1024 {
                // Keep reading to the end, but stop storing.
                data.truncate(MAX_MESSAGE_BYTES + 1);
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    async fn auth(&mut self, mechanism: u64, initial: String) -> std::io::Result<()> {
        if !self.tls {
            return self
                .reply(530, "5.7.0 must issue a STARTTLS command first")
                .await;
        }
        if self.user.is_some() {
            return self.reply(503, "5.5.1 already authenticated").await;
        }
        let credentials = if mechanism == AUTH_PLAIN {
            let response = if initial.is_empty() {
                self.send("334 \r\n").await?;
                match self.read_line().await? {
                    Some(l) => l,
                    None => return Ok(()),
                }
            } else {
                initial
            };
            decode_plain(&response)
        } else if mechanism == AUTH_LOGIN {
            let user = if initial.is_empty() {
                self.send("334 VXNlcm5hbWU6\r\n").await?;
                self.read_line().await?
            } else {
                Some(initial)
            };
            self.send("334 UGFzc3dvcmQ6\r\n").await?;
            let pass = self.read_line().await?;
            match (user.and_then(|u| b64(&u)), pass.and_then(|p| b64(&p))) {
                (Some(u), Some(p)) => Some((u, p)),
                _ => None,
            }
        } else {
            return self.reply(504, "5.5.4 mechanism not supported").await;
        };
        let Some((user, password)) = credentials else {
            return self.reply(501, "5.5.2 cannot decode credentials").await;
        };
        match self.handler.authenticate(&user, &password) {
            Ok(()) => {
                self.user = Some(user);
                self.reply(235, "2.7.0 authentication successful").await
            }
            Err(text) => self.reply(535, &text).await,
        }
    }
}

fn b64(s: &str) -> Option<String> {
    let bytes = openssl::base64::decode_block(s.trim()).ok()?;
    String::from_utf8(bytes).ok()
}

/// Decodes SASL PLAIN (`authzid\0authcid\0password`).
fn decode_plain(response: &str) -> Option<(String, String)> {
    let decoded = b64(response)?;
    let mut parts = decoded.split('\0');
    let _authzid = parts.next()?;
    let user = parts.next()?.to_owned();
    let pass = parts.next()?.to_owned();
    Some((user, pass))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_credentials_decode() {
        let enc = openssl::base64::encode_block(b"\0user@pec.test\0s3cret");
        assert_eq!(
            decode_plain(&enc),
            Some(("user@pec.test".into(), "s3cret".into()))
        );
        assert_eq!(decode_plain("!!!"), None);
    }
}
