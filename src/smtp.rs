//! The SMTP edge: composing a letter (lettre's builder) and submitting it to
//! the provider, step by step, so that the outcome says exactly how far the
//! transaction got.
//!
//! Why step by step: a letter must never be sent twice. lettre's `send`
//! hides whether a failure came before or after the message was handed
//! over; here MAIL, RCPT and DATA are separate commands and the message
//! transfer is the last step, so a failure before it is safe to retry
//! ([`SubmitOutcome::NotSent`]), a failure after the message was written
//! without a reply is [`SubmitOutcome::Uncertain`] (never resent blindly).

use std::time::{Duration, SystemTime};

use lettre::address::Address;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Attachment, Mailbox, Message, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters,
};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::ClientId;

use crate::config::{ServerConfig, TlsMode};
use crate::pec::wire;

/// One document attached to a letter.
#[derive(Debug, Clone)]
pub struct Document {
    /// The file name shown to the recipient (already validated).
    pub name: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// Everything needed to compose one attempt of a letter.
#[derive(Debug, Clone)]
pub struct Draft<'a> {
    /// The mailbox's PEC address (From and MAIL FROM).
    pub from: &'a str,
    /// To recipients.
    pub to: &'a [String],
    /// Cc recipients.
    pub cc: &'a [String],
    /// The subject.
    pub subject: &'a str,
    /// The text of the letter.
    pub body: &'a str,
    /// The documents.
    pub documents: &'a [Document],
    /// The receipt flavour requested (`completa`, `breve`, `sintetica`).
    pub receipt: &'a str,
    /// The Message-ID, without brackets (`dispatch-id.attempt.random@host`).
    pub message_id: &'a str,
    /// The identificativo (and original msgid) of the message this answers.
    pub in_reply_to: &'a [String],
    /// The Date header.
    pub date: SystemTime,
}

/// A letter that cannot be composed (bad address, header).
#[derive(Debug, thiserror::Error)]
#[error("composing the letter: {0}")]
pub struct ComposeError(String);

fn addr(a: &str) -> Result<Address, ComposeError> {
    a.parse::<Address>()
        .map_err(|e| ComposeError(format!("address \"{a}\": {e}")))
}

/// Composes the exact bytes of a letter (CRLF line ends): From the PEC
/// mailbox, To and Cc (never Bcc), the Message-ID, `X-TipoRicevuta`,
/// In-Reply-To/References, RFC 2047 subject, RFC 2231 file names, MIME types
/// from the file extension.
///
/// # Errors
/// An address or header lettre refuses.
pub fn compose(d: &Draft<'_>) -> Result<Vec<u8>, ComposeError> {
    let mut b = Message::builder()
        .from(Mailbox::new(None, addr(d.from)?))
        .subject(d.subject)
        .date(d.date)
        .message_id(Some(format!("<{}>", d.message_id)))
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str(wire::H_TIPO_RICEVUTA),
            d.receipt.to_owned(),
        ));
    for t in d.to {
        b = b.to(Mailbox::new(None, addr(t)?));
    }
    for c in d.cc {
        b = b.cc(Mailbox::new(None, addr(c)?));
    }
    if !d.in_reply_to.is_empty() {
        let ids: Vec<String> = d.in_reply_to.iter().map(|i| format!("<{i}>")).collect();
        b = b.in_reply_to(ids.join(" ")).references(ids.join(" "));
    }
    let text = SinglePart::builder()
        .header(ContentType::TEXT_PLAIN)
        .body(d.body.to_owned());
    let message = if d.documents.is_empty() {
        b.singlepart(text)
    } else {
        let mut mp = MultiPart::mixed().singlepart(text);
        for doc in d.documents {
            let ct = ContentType::parse(mime_type(&doc.name)).unwrap_or(
                ContentType::parse("application/octet-stream")
                    .map_err(|e| ComposeError(e.to_string()))?,
            );
            mp = mp.singlepart(Attachment::new(doc.name.clone()).body(doc.bytes.clone(), ct));
        }
        b.multipart(mp)
    }
    .map_err(|e| ComposeError(e.to_string()))?;
    Ok(message.formatted())
}

/// The MIME type of a document from its extension (the common office and
/// public-administration formats; anything else is application/octet-stream).
pub fn mime_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "pdf" => "application/pdf",
        "p7m" => "application/pkcs7-mime",
        "p7s" => "application/pkcs7-signature",
        "xml" => "application/xml",
        "txt" => "text/plain; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "html" | "htm" => "text/html; charset=utf-8",
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "tif" | "tiff" => "image/tiff",
        "odt" => "application/vnd.oasis.opendocument.text",
        "ods" => "application/vnd.oasis.opendocument.spreadsheet",
        "doc" => "application/msword",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "xls" => "application/vnd.ms-excel",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "zip" => "application/zip",
        "eml" => "message/rfc822",
        _ => "application/octet-stream",
    }
}

/// How a submission ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// 250 after the message: the provider took it.
    Accepted {
        /// The server's reply.
        reply: String,
    },
    /// The message was not handed over (connection, TLS, a 4xx before or
    /// after DATA): safe to retry later.
    NotSent {
        /// What happened.
        reason: String,
    },
    /// A 5xx reply: the provider refuses this letter.
    Refused {
        /// The server's reply.
        reply: String,
    },
    /// Authentication refused: the mailbox must be suspended (no retries
    /// that would lock the account).
    AuthRefused {
        /// The server's reply.
        reply: String,
    },
    /// The message was written but no reply came (the connection broke or
    /// timed out after DATA): it may have been accepted.
    Uncertain {
        /// What happened.
        reason: String,
    },
}

/// Credentials and TLS setup for one SMTP server, and the connection kept
/// open between consecutive letters.
pub struct Submitter {
    host: String,
    port: u16,
    tls: TlsMode,
    params: Option<TlsParameters>,
    /// For implicit TLS: pecgate does the handshake itself (so that the
    /// socket gets TCP_NODELAY) and hands lettre the encrypted stream.
    connector: Option<tokio_native_tls::TlsConnector>,
    credentials: Credentials,
    timeout: Duration,
    hello: ClientId,
    /// The connection of the previous letter, reusable for the next one.
    idle: Option<Kept>,
}

/// A logged-in connection between two transactions.
struct Kept {
    conn: AsyncSmtpConnection,
    /// When its last transaction ended.
    since: std::time::Instant,
    /// Transactions made on it.
    used: u32,
}

/// A connection unused for this long is closed rather than reused (well
/// below the usual server idle timeouts of one to five minutes).
pub const KEEP_IDLE: Duration = Duration::from_secs(20);
/// Transactions per connection at most (providers limit messages per
/// session); then QUIT and a new connection.
pub const KEEP_MAX: u32 = 100;

/// An implicit-TLS stream handed to lettre as an already connected stream.
#[derive(Debug)]
struct TlsTransport(tokio_native_tls::TlsStream<tokio::net::TcpStream>);

impl tokio::io::AsyncRead for TlsTransport {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsTransport {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for TlsTransport {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.get_ref().get_ref().get_ref().peer_addr()
    }
}

impl std::fmt::Debug for Submitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the credentials.
        f.debug_struct("Submitter")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// A submitter that cannot be set up (bad CA file).
#[derive(Debug, thiserror::Error)]
#[error("smtp {host}:{port}: {message}")]
pub struct SetupError {
    host: String,
    port: u16,
    message: String,
}

impl Submitter {
    /// A submitter for this server; `hello` is the EHLO name.
    ///
    /// # Errors
    /// An unreadable CA file or TLS parameters lettre refuses.
    pub fn new(server: &ServerConfig, hello: &str) -> Result<Submitter, SetupError> {
        let err = |m: String| SetupError {
            host: server.host.clone(),
            port: server.port,
            message: m,
        };
        let params = match server.tls {
            TlsMode::InsecurePlaintext => None,
            TlsMode::Implicit | TlsMode::StartTls => {
                let mut b = TlsParameters::builder(server.host.clone());
                if let Some(ca) = &server.ca_file {
                    let pem = std::fs::read(ca)
                        .map_err(|e| err(format!("ca_file {}: {e}", ca.display())))?;
                    for cert in openssl::x509::X509::stack_from_pem(&pem).unwrap_or_default() {
                        let pem = cert.to_pem().map_err(|e| err(e.to_string()))?;
                        b = b.add_root_certificate(
                            Certificate::from_pem(&pem).map_err(|e| err(e.to_string()))?,
                        );
                    }
                }
                Some(b.build().map_err(|e| err(e.to_string()))?)
            }
        };
        let connector = match server.tls {
            TlsMode::Implicit => Some(
                crate::tls::connector(server.ca_file.as_deref()).map_err(|e| err(e.to_string()))?,
            ),
            _ => None,
        };
        Ok(Submitter {
            host: server.host.clone(),
            port: server.port,
            tls: server.tls,
            params,
            connector,
            idle: None,
            credentials: Credentials::new(
                server.username.clone(),
                server.password.expose().to_owned(),
            ),
            timeout: server.timeout,
            hello: ClientId::Domain(hello.to_owned()),
        })
    }

    /// Submits `message` from `from` to `rcpts`, on the connection kept
    /// from the previous letter when there is one (younger than
    /// [`KEEP_IDLE`], fewer than [`KEEP_MAX`] transactions), else on a new
    /// one.
    ///
    /// Never twice: a kept connection that fails before the message is
    /// written (the server closed it while idle) is dropped and the letter
    /// goes over a new connection; once the message is on the wire, a lost
    /// connection is [`SubmitOutcome::Uncertain`] as on a new one. After a
    /// refusal or a 4xx the connection is kept only if RSET succeeds.
    pub async fn submit(&mut self, from: &str, rcpts: &[String], message: &[u8]) -> SubmitOutcome {
        if let Some(kept) = self.idle.take() {
            if kept.since.elapsed() < KEEP_IDLE && kept.used < KEEP_MAX {
                let mut conn = kept.conn;
                let txn = self.transaction(&mut conn, from, rcpts, message).await;
                if matches!(txn.outcome, SubmitOutcome::NotSent { .. }) && !txn.wrote && txn.broken
                {
                    // The kept connection was dead before the message left:
                    // nothing was sent, so a new connection may carry it.
                    conn.abort().await;
                } else {
                    self.finish(conn, &txn, kept.used + 1).await;
                    return txn.outcome;
                }
            } else {
                let mut conn = kept.conn;
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.quit()).await;
            }
        }
        let mut conn = match self.connect().await {
            Ok(c) => c,
            Err(outcome) => return outcome,
        };
        let txn = self.transaction(&mut conn, from, rcpts, message).await;
        self.finish(conn, &txn, 1).await;
        txn.outcome
    }

    /// Keeps the connection for the next letter when it is in a clean
    /// state, else closes it.
    async fn finish(&mut self, mut conn: AsyncSmtpConnection, txn: &Txn, used: u32) {
        let keep = !txn.broken
            && match txn.outcome {
                SubmitOutcome::Accepted { .. } => true,
                // A reply came: the session is usable once the transaction
                // is reset.
                SubmitOutcome::Refused { .. } | SubmitOutcome::NotSent { .. } => {
                    matches!(
                        tokio::time::timeout(self.timeout, conn.command(Rset)).await,
                        Ok(Ok(_))
                    )
                }
                SubmitOutcome::AuthRefused { .. } | SubmitOutcome::Uncertain { .. } => false,
            };
        if keep && used < KEEP_MAX {
            self.idle = Some(Kept {
                conn,
                since: std::time::Instant::now(),
                used,
            });
        } else if keep {
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.quit()).await;
        } else {
            conn.abort().await;
        }
    }

    /// Closes the kept connection, if any (QUIT): when the queue is empty
    /// or the daemon stops.
    pub async fn close(&mut self) {
        if let Some(mut kept) = self.idle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), kept.conn.quit()).await;
        }
    }

    /// Connects, secures and logs in exactly as a submission does, then
    /// says QUIT without sending anything (`pecgate check-config --connect`).
    ///
    /// # Errors
    /// [`SubmitOutcome::AuthRefused`] when the server refused the login,
    /// [`SubmitOutcome::NotSent`] for anything else (network, TLS, timeout).
    pub async fn try_login(&self) -> Result<(), SubmitOutcome> {
        let mut conn = self.connect().await?;
        let _ = tokio::time::timeout(self.timeout, conn.quit()).await;
        Ok(())
    }

    /// A TCP connection with TCP_NODELAY: lettre writes the message and the
    /// final `.` in two writes, and without it Nagle's algorithm holds the
    /// terminator until the server's delayed ACK (40 ms or more per letter).
    async fn tcp(&self) -> Result<tokio::net::TcpStream, SubmitOutcome> {
        let addr = format!("{}:{}", self.host, self.port);
        let tcp = match tokio::time::timeout(
            self.timeout,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                return Err(SubmitOutcome::NotSent {
                    reason: format!("{addr}: connection: {e}"),
                });
            }
            Err(_) => {
                return Err(SubmitOutcome::NotSent {
                    reason: format!("{addr}: connection timed out"),
                });
            }
        };
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, SubmitOutcome> {
        let not_sent = |e: lettre::transport::smtp::Error| SubmitOutcome::NotSent {
            reason: format!("{}:{}: {e}", self.host, self.port),
        };
        let timed_out = || SubmitOutcome::NotSent {
            reason: format!("{}:{}: timed out", self.host, self.port),
        };
        let tcp = self.tcp().await?;
        let stream: Box<dyn AsyncTokioStream> = match (&self.tls, &self.connector) {
            (TlsMode::Implicit, Some(connector)) => {
                let tls = tokio::time::timeout(self.timeout, connector.connect(&self.host, tcp))
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|e| SubmitOutcome::NotSent {
                        reason: format!("{}:{}: tls: {e}", self.host, self.port),
                    })?;
                Box::new(TlsTransport(tls))
            }
            _ => Box::new(tcp),
        };
        let mut conn = tokio::time::timeout(
            self.timeout,
            AsyncSmtpConnection::connect_with_transport(stream, &self.hello),
        )
        .await
        .map_err(|_| timed_out())?
        .map_err(not_sent)?;
        if self.tls == TlsMode::StartTls {
            let Some(params) = self.params.clone() else {
                return Err(SubmitOutcome::NotSent {
                    reason: "starttls without TLS parameters".to_owned(),
                });
            };
            if !conn.can_starttls() {
                return Err(SubmitOutcome::NotSent {
                    reason: format!(
                        "{}:{}: the server does not offer STARTTLS (tls = \"starttls\" requires it)",
                        self.host, self.port
                    ),
                });
            }
            conn.starttls(params, &self.hello).await.map_err(not_sent)?;
        }
        match conn
            .auth(&[Mechanism::Plain, Mechanism::Login], &self.credentials)
            .await
        {
            Ok(_) => Ok(conn),
            Err(e) if e.is_permanent() => Err(SubmitOutcome::AuthRefused {
                reply: e.to_string(),
            }),
            Err(e) => Err(not_sent(e)),
        }
    }

    /// One transaction: MAIL, RCPT for each recipient, DATA, the message.
    async fn transaction(
        &self,
        conn: &mut AsyncSmtpConnection,
        from: &str,
        rcpts: &[String],
        message: &[u8],
    ) -> Txn {
        // No reply at all (network, timeout, garbage) or 421 (the server
        // closes the session): the connection cannot be used again.
        let dead = |e: &lettre::transport::smtp::Error| {
            e.status().is_none_or(|c| c.to_string().starts_with("421"))
        };
        let before = |e: lettre::transport::smtp::Error| Txn {
            broken: dead(&e),
            wrote: false,
            outcome: if e.is_permanent() {
                SubmitOutcome::Refused {
                    reply: e.to_string(),
                }
            } else {
                SubmitOutcome::NotSent {
                    reason: e.to_string(),
                }
            },
        };
        let refused = |reply: String| Txn {
            outcome: SubmitOutcome::Refused { reply },
            wrote: false,
            broken: false,
        };
        let from = match from.parse::<Address>() {
            Ok(a) => a,
            Err(e) => return refused(format!("bad sender address: {e}")),
        };
        let mut params = Vec::new();
        if !message.is_ascii() {
            params.push(lettre::transport::smtp::extension::MailParameter::Body(
                lettre::transport::smtp::extension::MailBodyParameter::EightBitMime,
            ));
        }
        if let Err(e) = conn.command(Mail::new(Some(from), params)).await {
            return before(e);
        }
        for r in rcpts {
            let to = match r.parse::<Address>() {
                Ok(a) => a,
                Err(e) => return refused(format!("bad recipient address {r}: {e}")),
            };
            if let Err(e) = conn.command(Rcpt::new(to, vec![])).await {
                return before(e);
            }
        }
        if let Err(e) = conn.command(Data).await {
            return before(e);
        }
        // From here on the message is on the wire. lettre always ends the
        // data with "\r\n.\r\n": the message's own final CRLF is left out so
        // that the provider receives exactly `message` (the bytes archived),
        // not `message` plus an empty line.
        let data = message.strip_suffix(b"\r\n").unwrap_or(message);
        let (outcome, broken) = match conn.message(data).await {
            Ok(r) => (
                SubmitOutcome::Accepted {
                    reply: format!("{} {}", r.code(), r.message().collect::<Vec<_>>().join(" ")),
                },
                false,
            ),
            Err(e) if e.is_permanent() => (
                SubmitOutcome::Refused {
                    reply: e.to_string(),
                },
                false,
            ),
            Err(e) if e.is_transient() => {
                let broken = dead(&e);
                (
                    SubmitOutcome::NotSent {
                        reason: e.to_string(),
                    },
                    broken,
                )
            }
            Err(e) => (
                SubmitOutcome::Uncertain {
                    reason: e.to_string(),
                },
                true,
            ),
        };
        Txn {
            outcome,
            wrote: true,
            broken,
        }
    }
}

/// How far one transaction got.
struct Txn {
    outcome: SubmitOutcome,
    /// The message was (at least partly) written.
    wrote: bool,
    /// The connection is unusable (no reply, or 421).
    broken: bool,
}

/// Pacing of one mailbox: at most `per_minute` submissions in any minute
/// and `per_day` in any 24 hours (providers throttle, and some forbid
/// bursts). Pure: the caller passes the time.
#[derive(Debug, Clone)]
pub struct Pacer {
    per_minute: u32,
    per_day: u32,
    recent: std::collections::VecDeque<jiff::Timestamp>,
}

impl Pacer {
    /// A pacer with these limits (0 = no limit).
    pub fn new(per_minute: u32, per_day: u32) -> Pacer {
        Pacer {
            per_minute,
            per_day,
            recent: std::collections::VecDeque::new(),
        }
    }

    /// How long to wait before the next submission may start (zero: now).
    pub fn wait(&mut self, now: jiff::Timestamp) -> Duration {
        let day = jiff::SignedDuration::from_hours(24);
        let minute = jiff::SignedDuration::from_secs(60);
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= day)
        {
            self.recent.pop_front();
        }
        let mut wait = jiff::SignedDuration::ZERO;
        if self.per_day > 0 && self.recent.len() >= self.per_day as usize {
            let oldest = self.recent[self.recent.len() - self.per_day as usize];
            wait = wait.max(day - now.duration_since(oldest));
        }
        if self.per_minute > 0 {
            let in_minute: Vec<_> = self
                .recent
                .iter()
                .filter(|t| now.duration_since(**t) < minute)
                .collect();
            if in_minute.len() >= self.per_minute as usize {
                let oldest = in_minute[in_minute.len() - self.per_minute as usize];
                wait = wait.max(minute - now.duration_since(*oldest));
            }
        }
        wait.unsigned_abs()
    }

    /// Records a submission started at `now`.
    pub fn record(&mut self, now: jiff::Timestamp) {
        self.recent.push_back(now);
    }
}

/// The delay before retry `n` (1-based) after a transient failure:
/// exponential from `base`, capped at `max`, with ±20 % jitter taken from
/// `jitter` in [0, 1).
pub fn backoff(n: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << n.saturating_sub(1).min(20));
    let capped = exp.min(max);
    let factor = 0.8 + 0.4 * jitter.clamp(0.0, 1.0);
    capped.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;

    #[test]
    fn pacer_spaces_submissions() {
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let mut p = Pacer::new(2, 3);
        assert_eq!(p.wait(t0), Duration::ZERO);
        p.record(t0);
        p.record(t0);
        assert_eq!(p.wait(t0), Duration::from_secs(60));
        let later = t0 + jiff::SignedDuration::from_secs(61);
        assert_eq!(p.wait(later), Duration::ZERO);
        p.record(later);
        // The daily limit of 3 is reached: wait until 24 h after the first.
        let w = p.wait(later);
        assert_eq!(w, Duration::from_secs(24 * 3600 - 61));
        let unlimited = &mut Pacer::new(0, 0);
        unlimited.record(t0);
        assert_eq!(unlimited.wait(t0), Duration::ZERO);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let b = Duration::from_secs(10);
        let m = Duration::from_secs(600);
        assert_eq!(backoff(1, b, m, 0.5), Duration::from_secs(10));
        assert_eq!(backoff(2, b, m, 0.5), Duration::from_secs(20));
        assert_eq!(backoff(10, b, m, 0.5), Duration::from_secs(600));
        assert!(backoff(3, b, m, 0.0) < backoff(3, b, m, 0.99));
    }

    #[test]
    fn composes_a_letter() {
        let to = vec!["mario.rossi@pec.example.it".to_owned()];
        let cc = vec!["ufficio@example.com".to_owned()];
        let docs = vec![Document {
            name: "certificato di residenza è.pdf".to_owned(),
            bytes: b"%PDF-1.4 test".to_vec(),
        }];
        let d = Draft {
            from: "protocollo@pec.comune.example.it",
            to: &to,
            cc: &cc,
            subject: "Certificato di residenza – prot. 2026/0001",
            body: "Gentile cittadino,\nin allegato il certificato.",
            documents: &docs,
            receipt: "breve",
            message_id: "01JABCDEF.1.x1y2@gateway.example.it",
            in_reply_to: &["opec.1@pec.example.it".to_owned()],
            date: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        };
        let bytes = compose(&d).unwrap();
        let parsed = crate::pec::classify::parser().parse(&bytes).unwrap();
        assert_eq!(
            parsed.message_id(),
            Some("01JABCDEF.1.x1y2@gateway.example.it")
        );
        assert_eq!(
            parsed.subject(),
            Some("Certificato di residenza – prot. 2026/0001")
        );
        assert!(parsed.bcc().is_none());
        assert_eq!(
            crate::pec::classify::top_header_text(&parsed, "X-TipoRicevuta").as_deref(),
            Some("breve")
        );
        let att = parsed.attachments().next().unwrap();
        use mail_parser::MimeHeaders;
        assert_eq!(
            att.attachment_name(),
            Some("certificato di residenza è.pdf")
        );
        assert_eq!(att.contents(), b"%PDF-1.4 test");
        assert!(String::from_utf8_lossy(&bytes).contains("In-Reply-To: <opec.1@pec.example.it>"));
        assert!(!bytes.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'));
    }
}
