//! Delivery into the sandbox's Dovecot by IMAP APPEND, one cached session
//! per mailbox, reconnecting (with retries) when Dovecot restarts.

use std::collections::HashMap;
use std::time::Duration;

use async_imap::Session;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_native_tls::{TlsConnector, TlsStream};

type ImapSession = Session<TlsStream<TcpStream>>;

/// Appends messages to mailboxes of the sandbox's Dovecot.
pub struct Deliverer {
    connector: TlsConnector,
    port: u16,
    passwords: HashMap<String, String>,
    sessions: Mutex<HashMap<String, ImapSession>>,
}

impl std::fmt::Debug for Deliverer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliverer")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// A delivery that failed after every retry.
#[derive(Debug, thiserror::Error)]
#[error("deliver to {mailbox}: {message}")]
pub struct DeliverError {
    /// The mailbox.
    pub mailbox: String,
    /// The last error.
    pub message: String,
}

impl Deliverer {
    /// A deliverer for Dovecot's implicit-TLS port; `passwords` maps each
    /// address (lower case) to its password.
    pub fn new(connector: TlsConnector, port: u16, passwords: HashMap<String, String>) -> Self {
        Deliverer {
            connector,
            port,
            passwords,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Appends `message` to the INBOX of `mailbox`. Retries for about 10 s
    /// (Dovecot may be restarting).
    ///
    /// # Errors
    /// Unknown mailbox, or every attempt failed.
    pub async fn append(&self, mailbox: &str, message: &[u8]) -> Result<(), DeliverError> {
        let key = mailbox.to_ascii_lowercase();
        let Some(password) = self.passwords.get(&key) else {
            return Err(DeliverError {
                mailbox: mailbox.to_owned(),
                message: "no such mailbox".to_owned(),
            });
        };
        let mut last = String::new();
        for attempt in 0..40u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let mut sessions = self.sessions.lock().await;
            let session = match sessions.remove(&key) {
                Some(s) => s,
                None => match self.login(&key, password).await {
                    Ok(s) => s,
                    Err(e) => {
                        last = e;
                        continue;
                    }
                },
            };
            let mut session = session;
            match tokio::time::timeout(
                Duration::from_secs(30),
                session.append("INBOX", None, None, message),
            )
            .await
            {
                Ok(Ok(())) => {
                    sessions.insert(key, session);
                    return Ok(());
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "timeout".to_owned(),
            }
            // The session is dropped: the next attempt logs in again.
        }
        Err(DeliverError {
            mailbox: mailbox.to_owned(),
            message: last,
        })
    }

    async fn login(&self, user: &str, password: &str) -> Result<ImapSession, String> {
        let stream = crate::tls::connect(&self.connector, "127.0.0.1", self.port)
            .await
            .map_err(|e| e.to_string())?;
        let mut client = async_imap::Client::new(stream);
        client
            .read_response()
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "no greeting".to_owned())?;
        client
            .login(user, password)
            .await
            .map_err(|(e, _)| e.to_string())
    }

    /// Logs every cached session out (used before Dovecot restarts and at
    /// shutdown).
    pub async fn close_all(&self) {
        let mut sessions = self.sessions.lock().await;
        for (_, mut s) in sessions.drain() {
            let _ = tokio::time::timeout(Duration::from_secs(2), s.logout()).await;
        }
    }
}
