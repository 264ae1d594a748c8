//! Helpers for `tests/sandbox.rs`: start a sandbox in a temporary directory,
//! write letters, submit them with lettre (STARTTLS or implicit TLS, the
//! sandbox CA as the only private root), read mailboxes with async-imap over
//! TLS, wait (with a deadline, never a fixed sleep) until the expected mail
//! is there, and take each message apart with `inspect` + `Verifier`.
//!
//! Certificates and passwords are made once per test binary (by
//! `World::open` in a scratch directory) and copied into each sandbox
//! directory, which the sandbox then reuses as on a restart: RSA key
//! generation is most of a sandbox's start-up time. The binary tests start
//! from empty directories.
//!
//! Dovecot must be installed: `Sandbox::start` fails with the command to
//! install it, and the tests fail with that message (nothing is skipped).
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use jiff::Timestamp;
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::response::Response;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use pecgate::pec::daticert::Daticert;
use pecgate::pec::inspect::inspect;
use pecgate::pec::kind::Kind;
use pecgate::sandbox::world::{SandboxInfo, World};
use pecgate::sandbox::{Sandbox, SandboxOptions};
use pecgate::verify::{Status, TrustAnchors, Verdict, Verifier};
use tempfile::TempDir;
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------
// The world (docs/sandbox.md)

/// The office mailbox (provider uno).
pub const OFFICE: &str = "protocollo@pec.comune.sandbox.test";
/// A citizen of provider uno.
pub const ANAGRAFE: &str = "anagrafe@pec.comune.sandbox.test";
/// Citizens of provider due.
pub const MARIO: &str = "mario.rossi@pec.cittadini.sandbox.test";
/// Citizen of provider due.
pub const GIULIA: &str = "giulia.bianchi@pec.cittadini.sandbox.test";
/// Citizen of provider due.
pub const LUCA: &str = "luca.verdi@pec.cittadini.sandbox.test";
/// Ordinary mailboxes.
pub const ANNA: &str = "anna.neri@posta.sandbox.test";
/// Ordinary mailbox.
pub const PAOLO: &str = "paolo.gialli@posta.sandbox.test";
/// Service address of provider uno (pec.comune.sandbox.test).
pub const UNO: &str = "posta-certificata@pec.comune.sandbox.test";
/// Service address of provider due (pec.cittadini.sandbox.test).
pub const DUE: &str = "posta-certificata@pec.cittadini.sandbox.test";
/// gestore-emittente of provider uno.
pub const UNO_GESTORE: &str = "Sandbox PEC Uno S.p.A.";
/// gestore-emittente of provider due.
pub const DUE_GESTORE: &str = "Sandbox PEC Due S.p.A.";

/// The EICAR anti-virus test string.
pub const EICAR: &[u8] = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// How long mail may take to arrive before a test fails.
pub const ARRIVAL: Duration = Duration::from_secs(20);
/// How long a test waits to be sure that nothing more arrives.
pub const SETTLE: Duration = Duration::from_millis(600);

/// Runs a test body under a limit, so that a hang fails instead of blocking
/// the run.
pub async fn within<F: Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("test took more than {secs} s"))
}

/// A Message-ID (without brackets) unique in this test run.
pub fn msgid(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{tag}.{}.{}@test.pecgate.invalid",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

// ---------------------------------------------------------------------------
// Starting a sandbox

/// A sandbox running in-process in its own temporary directory.
pub struct Env {
    sandbox: Option<Sandbox>,
    /// What `sandbox.json` says.
    pub info: SandboxInfo,
    /// A verifier whose only anchor is the sandbox CA (`DIR/anchors`).
    pub verifier: Verifier,
    /// The temporary directory (the sandbox lives in `sbx/`, the faults
    /// file is `faults.toml`).
    pub tmp: TempDir,
}

impl Env {
    /// Starts a sandbox with this time scale and, if given, a faults file
    /// with these contents (written to `faults.toml` and passed at start).
    pub async fn start(time_scale: f64, faults: Option<&str>) -> Env {
        let tmp = tempfile::tempdir().expect("tempdir");
        let faults_path = tmp.path().join("faults.toml");
        if let Some(text) = faults {
            std::fs::write(&faults_path, text).expect("write faults file");
        }
        let dir = tmp.path().join("sbx");
        for (path, bytes) in world_template() {
            let to = dir.join(path);
            std::fs::create_dir_all(to.parent().unwrap()).expect("create sandbox dir");
            std::fs::write(&to, bytes).expect("copy the world template");
        }
        let sandbox = Sandbox::start(SandboxOptions {
            dir,
            time_scale,
            faults: faults.map(|_| faults_path),
        })
        .await
        .unwrap_or_else(|e| panic!("sandbox did not start: {e}"));
        let info = sandbox.info().clone();
        let verifier = sandbox_verifier(&info);
        Env {
            sandbox: Some(sandbox),
            info,
            verifier,
            tmp,
        }
    }

    /// The running sandbox.
    pub fn sandbox(&self) -> &Sandbox {
        self.sandbox.as_ref().expect("sandbox running")
    }

    /// The sandbox directory.
    pub fn dir(&self) -> &Path {
        &self.info.dir
    }

    /// The faults file.
    pub fn faults_path(&self) -> PathBuf {
        self.tmp.path().join("faults.toml")
    }

    /// Rewrites the faults file (reload it with `reload_faults`).
    pub fn write_faults(&self, text: &str) {
        std::fs::write(self.faults_path(), text).expect("write faults file");
    }

    /// The password of a mailbox.
    pub fn password(&self, address: &str) -> String {
        password(&self.info, address)
    }

    /// Submits `letter` as `login` (MAIL FROM = login, RCPT = every To, Cc
    /// and Bcc address of the letter) over STARTTLS with AUTH PLAIN.
    pub async fn send(&self, login: &str, letter: &Letter) -> Result<Response, SmtpError> {
        submit(
            &self.info,
            &Submit::new(login, &self.password(login), letter),
        )
        .await
    }

    /// Waits until `address` holds at least `n` messages.
    pub async fn wait(&self, address: &str, n: usize) -> Vec<Fetched> {
        wait_for(&self.info, address, n, ARRIVAL).await
    }

    /// The messages of `address` now.
    pub async fn fetch(&self, address: &str) -> Vec<Fetched> {
        fetch_now(&self.info, address).await
    }

    /// Inspects and verifies a system message, asserting a valid signature
    /// and no inspection problems.
    pub fn certified(&self, f: &Fetched) -> Sys {
        certified(&self.verifier, f)
    }

    /// Stops the sandbox (Dovecot included).
    pub async fn shutdown(mut self) {
        if let Some(s) = self.sandbox.take() {
            s.shutdown().await;
        }
    }
}

/// The files of a sandbox world (CA, provider and TLS certificates and
/// keys, `mailboxes.json`), made once: (relative path, contents).
fn world_template() -> &'static [(PathBuf, Vec<u8>)] {
    static TEMPLATE: OnceLock<Vec<(PathBuf, Vec<u8>)>> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tempdir");
        World::open(tmp.path(), Timestamp::now()).expect("make a sandbox world");
        let mut files = Vec::new();
        for sub in ["pki", ""] {
            for e in std::fs::read_dir(tmp.path().join(sub)).expect("read world") {
                let e = e.expect("read world");
                let name = e.file_name();
                let rel = Path::new(sub).join(&name);
                let keep = if sub.is_empty() {
                    name == "mailboxes.json"
                } else {
                    e.file_type().expect("file type").is_file()
                };
                if keep {
                    files.push((rel, std::fs::read(e.path()).expect("read world file")));
                }
            }
        }
        let names: Vec<&Path> = files.iter().map(|f| f.0.as_path()).collect();
        assert_eq!(
            names.len(),
            9,
            "CA, 3 certificates, their keys, mailboxes: {names:?}"
        );
        files
    })
}

/// The password of a mailbox in `info`.
pub fn password(info: &SandboxInfo, address: &str) -> String {
    info.password(address)
        .unwrap_or_else(|| panic!("no mailbox {address} in sandbox.json"))
        .to_owned()
}

/// A verifier whose only trust anchor is the sandbox CA, loaded from
/// `DIR/anchors` (and checked to be exactly `ca_file`).
pub fn sandbox_verifier(info: &SandboxInfo) -> Verifier {
    let anchors = TrustAnchors::from_dirs(&[info.dir.join("anchors")]).expect("anchors");
    let ca = openssl::x509::X509::from_pem(&std::fs::read(&info.ca_file).expect("ca_file"))
        .expect("ca_file is PEM");
    let certs = anchors.certificates();
    assert_eq!(certs.len(), 1, "DIR/anchors must hold the sandbox CA only");
    assert_eq!(
        certs[0].to_der().unwrap(),
        ca.to_der().unwrap(),
        "DIR/anchors must hold the sandbox CA"
    );
    Verifier::new(anchors)
}

// ---------------------------------------------------------------------------
// Letters

/// One attachment.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// File name.
    pub name: String,
    /// MIME type.
    pub content_type: String,
    /// The file.
    pub data: Vec<u8>,
}

/// A letter as a user agent writes it (CRLF, base64 attachments).
#[derive(Debug, Clone, Default)]
pub struct Letter {
    /// From (one address).
    pub from: String,
    /// To.
    pub to: Vec<String>,
    /// Cc.
    pub cc: Vec<String>,
    /// A Bcc header (the providers refuse it); its addresses are also RCPTs.
    pub bcc: Vec<String>,
    /// Subject (ASCII).
    pub subject: String,
    /// Message-ID without brackets.
    pub message_id: String,
    /// `X-TipoRicevuta`, if any.
    pub tipo_ricevuta: Option<String>,
    /// The text.
    pub body: String,
    /// Attachments.
    pub attachments: Vec<Attachment>,
}

/// A small PDF-like file.
pub fn pdf() -> Attachment {
    let mut data = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\n".to_vec();
    data.extend((0u8..=255).cycle().take(3000));
    data.extend_from_slice(b"\n%%EOF\n");
    Attachment {
        name: "determina-2026-123.pdf".into(),
        content_type: "application/pdf".into(),
        data,
    }
}

impl Letter {
    /// A letter from `from` to `to` with a fresh Message-ID.
    pub fn new(from: &str, to: &[&str], subject: &str) -> Letter {
        Letter {
            from: from.into(),
            to: to.iter().map(|s| (*s).to_owned()).collect(),
            subject: subject.into(),
            message_id: msgid("letter"),
            body: format!("Gentile destinatario,\r\n{subject}.\r\nCordiali saluti.\r\n"),
            ..Letter::default()
        }
    }

    /// Adds Cc recipients.
    pub fn cc(mut self, cc: &[&str]) -> Letter {
        self.cc.extend(cc.iter().map(|s| (*s).to_owned()));
        self
    }

    /// Adds an attachment.
    pub fn attach(mut self, a: Attachment) -> Letter {
        self.attachments.push(a);
        self
    }

    /// Sets `X-TipoRicevuta`.
    pub fn tipo(mut self, t: &str) -> Letter {
        self.tipo_ricevuta = Some(t.into());
        self
    }

    /// Every envelope recipient: To, Cc, Bcc.
    pub fn recipients(&self) -> Vec<String> {
        self.to
            .iter()
            .chain(&self.cc)
            .chain(&self.bcc)
            .cloned()
            .collect()
    }

    /// The message bytes (CRLF line ends).
    pub fn render(&self) -> Vec<u8> {
        let mut h = String::new();
        h.push_str(&format!("From: {}\r\n", self.from));
        h.push_str(&format!("To: {}\r\n", self.to.join(", ")));
        if !self.cc.is_empty() {
            h.push_str(&format!("Cc: {}\r\n", self.cc.join(", ")));
        }
        if !self.bcc.is_empty() {
            h.push_str(&format!("Bcc: {}\r\n", self.bcc.join(", ")));
        }
        h.push_str(&format!("Subject: {}\r\n", self.subject));
        h.push_str("Date: Thu, 26 Nov 2026 10:00:00 +0100\r\n");
        h.push_str(&format!("Message-ID: <{}>\r\n", self.message_id));
        if let Some(t) = &self.tipo_ricevuta {
            h.push_str(&format!("X-TipoRicevuta: {t}\r\n"));
        }
        h.push_str("MIME-Version: 1.0\r\n");
        if self.attachments.is_empty() {
            h.push_str("Content-Type: text/plain; charset=utf-8\r\n");
            h.push_str("Content-Transfer-Encoding: 8bit\r\n\r\n");
            h.push_str(&self.body);
            return h.into_bytes();
        }
        let boundary = format!("=_b_{}", self.message_id.replace(['@', '.'], "_"));
        h.push_str(&format!(
            "Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n"
        ));
        h.push_str("This is a multi-part message in MIME format.\r\n");
        h.push_str(&format!("--{boundary}\r\n"));
        h.push_str("Content-Type: text/plain; charset=utf-8\r\n");
        h.push_str("Content-Transfer-Encoding: 8bit\r\n\r\n");
        h.push_str(&self.body);
        for a in &self.attachments {
            h.push_str(&format!("\r\n--{boundary}\r\n"));
            h.push_str(&format!(
                "Content-Type: {}; name=\"{}\"\r\n",
                a.content_type, a.name
            ));
            h.push_str(&format!(
                "Content-Disposition: attachment; filename=\"{}\"\r\n",
                a.name
            ));
            h.push_str("Content-Transfer-Encoding: base64\r\n\r\n");
            let b64 = openssl::base64::encode_block(&a.data);
            for chunk in b64.as_bytes().chunks(76) {
                h.push_str(std::str::from_utf8(chunk).unwrap());
                h.push_str("\r\n");
            }
        }
        h.push_str(&format!("--{boundary}--\r\n"));
        h.into_bytes()
    }
}

// ---------------------------------------------------------------------------
// SMTP submission with lettre

/// lettre's SMTP error.
pub type SmtpError = lettre::transport::smtp::Error;

/// How to reach the submission service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The STARTTLS port.
    StartTls,
    /// The implicit-TLS port.
    Implicit,
}

/// One submission: credentials, envelope, bytes, transport.
#[derive(Debug, Clone)]
pub struct Submit {
    /// SMTP login.
    pub login: String,
    /// Its password.
    pub password: String,
    /// MAIL FROM.
    pub mail_from: String,
    /// RCPT TO.
    pub rcpts: Vec<String>,
    /// The message.
    pub data: Vec<u8>,
    /// Which port.
    pub via: Via,
    /// AUTH mechanism.
    pub mechanism: Mechanism,
}

impl Submit {
    /// `letter` from `login` (MAIL FROM = login) to its recipients, over
    /// STARTTLS with AUTH PLAIN.
    pub fn new(login: &str, password: &str, letter: &Letter) -> Submit {
        Submit {
            login: login.into(),
            password: password.into(),
            mail_from: login.into(),
            rcpts: letter.recipients(),
            data: letter.render(),
            via: Via::StartTls,
            mechanism: Mechanism::Plain,
        }
    }
}

/// Submits one message with lettre, trusting the sandbox CA; the TLS name
/// checked is `127.0.0.1` (a SAN of the sandbox certificate).
pub async fn submit(info: &SandboxInfo, s: &Submit) -> Result<Response, SmtpError> {
    let ca = std::fs::read(&info.ca_file).expect("read ca_file");
    let params = TlsParameters::builder("127.0.0.1".to_owned())
        .add_root_certificate(Certificate::from_pem(&ca).expect("ca pem"))
        .build()
        .expect("tls parameters");
    let (port, tls) = match s.via {
        Via::StartTls => (info.smtp.port, Tls::Required(params)),
        Via::Implicit => (info.smtps.port, Tls::Wrapper(params)),
    };
    let transport: AsyncSmtpTransport<Tokio1Executor> =
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(port)
            .tls(tls)
            .credentials(Credentials::new(s.login.clone(), s.password.clone()))
            .authentication(vec![s.mechanism])
            .timeout(Some(Duration::from_secs(10)))
            .build();
    let envelope = Envelope::new(
        Some(s.mail_from.parse().expect("MAIL FROM address")),
        s.rcpts
            .iter()
            .map(|r| r.parse().expect("RCPT address"))
            .collect(),
    )
    .expect("envelope");
    transport.send_raw(&envelope, &s.data).await
}

/// The reply code of a failed submission.
pub fn code(e: &SmtpError) -> Option<u16> {
    e.status().map(u16::from)
}

// ---------------------------------------------------------------------------
// Reading mailboxes with async-imap

/// An IMAP session over implicit TLS.
pub type Session = async_imap::Session<tokio_native_tls::TlsStream<TcpStream>>;

/// One message of a mailbox.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Its UID.
    pub uid: u32,
    /// Its bytes.
    pub raw: Vec<u8>,
}

/// Logs into `address` on the implicit-TLS port.
pub async fn imap_login(info: &SandboxInfo, address: &str) -> Result<Session, String> {
    let connector = pecgate::tls::connector(Some(&info.ca_file)).map_err(|e| e.to_string())?;
    let stream = pecgate::tls::connect(&connector, "127.0.0.1", info.imaps.port)
        .await
        .map_err(|e| e.to_string())?;
    let mut client = async_imap::Client::new(stream);
    client
        .read_response()
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "no IMAP greeting".to_owned())?;
    client
        .login(address, password(info, address))
        .await
        .map_err(|(e, _)| e.to_string())
}

/// Every message of INBOX, by UID.
pub async fn fetch_all(s: &mut Session) -> Result<Vec<Fetched>, String> {
    let mb = s.select("INBOX").await.map_err(|e| e.to_string())?;
    if mb.exists == 0 {
        return Ok(Vec::new());
    }
    let fetches: Vec<_> = s
        .uid_fetch("1:*", "(UID BODY.PEEK[])")
        .await
        .map_err(|e| e.to_string())?
        .try_collect()
        .await
        .map_err(|e| e.to_string())?;
    let mut out: Vec<Fetched> = fetches
        .iter()
        .map(|f| Fetched {
            uid: f.uid.expect("UID in FETCH"),
            raw: f.body().expect("BODY[] in FETCH").to_vec(),
        })
        .collect();
    out.sort_by_key(|f| f.uid);
    Ok(out)
}

/// The messages of `address` now.
pub async fn fetch_now(info: &SandboxInfo, address: &str) -> Vec<Fetched> {
    let mut s = imap_login(info, address)
        .await
        .unwrap_or_else(|e| panic!("IMAP login {address}: {e}"));
    let out = fetch_all(&mut s)
        .await
        .unwrap_or_else(|e| panic!("IMAP fetch {address}: {e}"));
    let _ = s.logout().await;
    out
}

/// Polls `address` until it holds at least `n` messages; fails after
/// `limit` naming what is there.
pub async fn wait_for(
    info: &SandboxInfo,
    address: &str,
    n: usize,
    limit: Duration,
) -> Vec<Fetched> {
    let deadline = Instant::now() + limit;
    let mut session: Option<Session> = None;
    let mut last: Vec<Fetched> = Vec::new();
    let mut last_error = String::new();
    loop {
        if session.is_none() {
            match imap_login(info, address).await {
                Ok(s) => session = Some(s),
                Err(e) => last_error = e,
            }
        }
        if let Some(s) = session.as_mut() {
            match fetch_all(s).await {
                Ok(list) => {
                    if list.len() >= n {
                        let _ = s.logout().await;
                        return list;
                    }
                    last = list;
                }
                Err(e) => {
                    last_error = e;
                    session = None;
                }
            }
        }
        if Instant::now() > deadline {
            let kinds: Vec<String> = last.iter().map(|f| describe(&f.raw)).collect();
            panic!(
                "{address}: {} message(s) after {limit:?}, expected {n}: {kinds:?} \
                 (last IMAP error: {last_error:?})",
                last.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A short description of a message for failure messages.
pub fn describe(raw: &[u8]) -> String {
    match inspect(raw) {
        Ok(i) => format!(
            "{} (msgid {:?}, consegna {:?})",
            i.kind(),
            i.daticert.as_ref().and_then(|d| d.msgid.clone()),
            i.daticert.as_ref().and_then(|d| d.consegna.clone())
        ),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------------------
// Taking messages apart

/// What a message found in a mailbox is and says.
#[derive(Debug, Clone)]
pub struct Sys {
    /// Its UID.
    pub uid: u32,
    /// Its bytes.
    pub raw: Vec<u8>,
    /// The PEC kind.
    pub kind: Kind,
    /// The daticert, if any.
    pub daticert: Option<Daticert>,
    /// The address in From.
    pub from: Option<String>,
    /// The To addresses.
    pub to: Vec<String>,
    /// The decoded subject.
    pub subject: Option<String>,
    /// The message's own Message-ID, normalised.
    pub message_id: Option<String>,
    /// `X-Riferimento-Message-ID`, normalised.
    pub refers_to: Option<String>,
    /// `X-TipoRicevuta`, lower case.
    pub tipo_ricevuta: Option<String>,
    /// `X-Trasporto`.
    pub x_trasporto: Option<String>,
    /// `X-VerificaSicurezza: errore`.
    pub virus: bool,
    /// The postacert.eml (or the message wrapped in an anomaly envelope).
    pub postacert: Option<Vec<u8>>,
    /// The human-readable text.
    pub text: Option<String>,
    /// The names of the other parts.
    pub other_parts: Vec<Option<String>>,
    /// Inspection problems.
    pub problems: Vec<String>,
    /// The signature verdict.
    pub verdict: Verdict,
}

impl Sys {
    /// The daticert (asserted present).
    pub fn d(&self) -> &Daticert {
        self.daticert
            .as_ref()
            .unwrap_or_else(|| panic!("{} without daticert", self.kind))
    }

    /// A top-level header, unfolded, trimmed.
    pub fn header(&self, name: &str) -> Option<String> {
        header(&self.raw, name)
    }

    /// The daticert time as Unix seconds.
    pub fn data_secs(&self) -> i64 {
        self.d().data.as_second()
    }
}

/// Inspects and verifies a message (no assertion).
pub fn examine(verifier: &Verifier, f: &Fetched) -> Sys {
    let ins = inspect(&f.raw).unwrap_or_else(|e| panic!("uid {}: {e}", f.uid));
    let verdict = verifier.verify(&ins, Timestamp::now());
    let m = &ins.message;
    let c = &m.classification;
    Sys {
        uid: f.uid,
        raw: f.raw.clone(),
        kind: c.kind.clone(),
        daticert: ins.daticert.clone(),
        from: m.from.clone(),
        to: m.to.clone(),
        subject: m.subject.clone(),
        message_id: m.message_id.clone(),
        refers_to: c.refers_to.clone(),
        tipo_ricevuta: c.tipo_ricevuta.clone(),
        x_trasporto: c.x_trasporto.clone(),
        virus: c.virus,
        postacert: m.postacert.clone(),
        text: m.text.clone(),
        other_parts: m.others.iter().map(|o| o.name.clone()).collect(),
        problems: ins.problems.clone(),
        verdict,
    }
}

/// Inspects and verifies a system message: the signature must be valid
/// with the sandbox CA as the only anchor, and inspect must find no
/// problem.
pub fn certified(verifier: &Verifier, f: &Fetched) -> Sys {
    let s = examine(verifier, f);
    assert_eq!(
        s.verdict.status,
        Status::Valid,
        "{} (uid {}): signature not valid: {:?}",
        s.kind,
        s.uid,
        s.verdict.reason
    );
    assert!(
        s.problems.is_empty(),
        "{} (uid {}): inspect problems {:?}",
        s.kind,
        s.uid,
        s.problems
    );
    s
}

/// A top-level header of `raw`, unfolded and trimmed.
pub fn header(raw: &[u8], name: &str) -> Option<String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    let text = String::from_utf8_lossy(&raw[..end])
        .replace("\r\n ", " ")
        .replace("\r\n\t", " ");
    text.split("\r\n").find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// The attachments of a message: (file name, decoded content).
pub fn attachments(raw: &[u8]) -> Vec<(String, Vec<u8>)> {
    use mail_parser::MimeHeaders;
    let msg = pecgate::pec::classify::parser()
        .parse(raw)
        .expect("parse message");
    msg.attachments()
        .map(|p| {
            (
                p.attachment_name().unwrap_or_default().to_owned(),
                p.contents().to_vec(),
            )
        })
        .collect()
}

/// SHA-1 as lower-case hex.
pub fn sha1_hex(bytes: &[u8]) -> String {
    openssl::sha::sha1(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Only the messages of this kind.
pub fn of_kind<'a>(list: &'a [Sys], kind: &Kind) -> Vec<&'a Sys> {
    list.iter().filter(|s| s.kind == *kind).collect()
}

/// The one message of this kind (asserted).
pub fn one<'a>(list: &'a [Sys], kind: &Kind) -> &'a Sys {
    let found = of_kind(list, kind);
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind}, found {:?}",
        list.iter().map(|s| s.kind.to_string()).collect::<Vec<_>>()
    );
    found[0]
}

// ---------------------------------------------------------------------------
// External programs

/// Finds a program on PATH (or in the usual system directories).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs `kill -SIG pid`.
pub fn signal(pid: u32, sig: &str) {
    let status = Command::new(find_program("kill").expect("kill(1) not found"))
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// Every process whose command line contains `needle`: (pid, command line).
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            out.push((pid, cmd.trim().to_owned()));
        }
    }
    out
}

/// The Dovecot instance name of a sandbox directory (its processes are
/// titled `dovecot-<instance>/<service>`).
pub fn dovecot_instance(dir: &Path) -> String {
    let conf = std::fs::read_to_string(dir.join("dovecot").join("dovecot.conf"))
        .expect("DIR/dovecot/dovecot.conf");
    conf.lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "instance_name").then(|| v.trim().to_owned())
        })
        .expect("instance_name in dovecot.conf")
}

/// A `pecgate sandbox` process.
pub struct BinSandbox {
    child: Option<Child>,
    /// Its directory.
    pub dir: PathBuf,
}

impl BinSandbox {
    /// Spawns `pecgate sandbox --dir DIR` (output to `DIR.log`).
    pub fn spawn(dir: &Path) -> BinSandbox {
        BinSandbox::spawn_with(dir, &[])
    }

    /// Spawns `pecgate sandbox --dir DIR ARGS...` (output to `DIR.log`).
    pub fn spawn_with(dir: &Path, args: &[&std::ffi::OsStr]) -> BinSandbox {
        let log = std::fs::File::create(dir.with_extension("log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_pecgate"))
            .arg("sandbox")
            .arg("--dir")
            .arg(dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn pecgate sandbox");
        BinSandbox {
            child: Some(child),
            dir: dir.to_owned(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// What the process printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    /// Waits until `DIR/sandbox.json` is written by this process and the
    /// start-up summary is printed.
    pub async fn ready(&mut self) -> SandboxInfo {
        let deadline = Instant::now() + Duration::from_secs(30);
        let pid = self.pid();
        loop {
            // sandbox.json is written before the summary is printed: wait
            // for both.
            if let Ok(info) = SandboxInfo::load(&self.dir)
                && info.pid == pid
                && self.log().contains("PEC sandbox running in")
            {
                return info;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                panic!("pecgate sandbox exited early ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no sandbox.json after 30 s: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM and waits (up to `limit`) for the exit status.
    pub async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        signal(self.pid(), "TERM");
        let deadline = Instant::now() + limit;
        let mut child = self.child.take().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("pecgate sandbox still running {limit:?} after SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for BinSandbox {
    fn drop(&mut self) {
        // A failed test must not leave a sandbox (and its Dovecot) running.
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(8);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Asserts that `openssl` is installed and returns its path.
pub fn openssl_cli() -> PathBuf {
    find_program("openssl").unwrap_or_else(|| {
        panic!(
            "openssl not found: install it with `apt-get install openssl` (or run scripts/setup)"
        )
    })
}
