//! The sandbox's fixed world: two simulated PEC providers with their
//! domains, the mailboxes, the CA and certificates (made once under the
//! sandbox directory and reused on restart), and the two files other
//! programs rely on: `sandbox.json` and `pecgate.toml`.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use jiff::{SignedDuration, Timestamp};
use openssl::pkey::PKey;
use openssl::x509::X509;
use serde::{Deserialize, Serialize};

use crate::pki::{self, CertKey, ProviderProfile, Validity};

/// A simulated PEC provider.
#[derive(Debug, Clone)]
pub struct ProviderSpec {
    /// Short name (`uno`, `due`): names its key files.
    pub id: &'static str,
    /// gestore-emittente in daticert.
    pub gestore: &'static str,
    /// The PEC domain it manages (one per provider in the sandbox).
    pub domain: &'static str,
}

impl ProviderSpec {
    /// The provider's service address, From of its system messages.
    pub fn service_address(&self) -> String {
        format!("{}@{}", crate::pec::wire::SERVICE_LOCAL_PART, self.domain)
    }
}

/// The two simulated providers.
pub const PROVIDERS: [ProviderSpec; 2] = [
    ProviderSpec {
        id: "uno",
        gestore: "Sandbox PEC Uno S.p.A.",
        domain: "pec.comune.sandbox.test",
    },
    ProviderSpec {
        id: "due",
        gestore: "Sandbox PEC Due S.p.A.",
        domain: "pec.cittadini.sandbox.test",
    },
];

/// The ordinary (non-PEC) mail domain.
pub const ORDINARY_DOMAIN: &str = "posta.sandbox.test";

/// The role of a sandbox mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The municipality's certified mailbox, the one pecgate runs for.
    Office,
    /// A citizen's certified mailbox.
    Citizen,
    /// An ordinary mailbox.
    Ordinary,
}

/// The mailboxes (local part, domain, role).
pub const MAILBOXES: &[(&str, &str, Role)] = &[
    ("protocollo", "pec.comune.sandbox.test", Role::Office),
    ("anagrafe", "pec.comune.sandbox.test", Role::Citizen),
    ("mario.rossi", "pec.cittadini.sandbox.test", Role::Citizen),
    (
        "giulia.bianchi",
        "pec.cittadini.sandbox.test",
        Role::Citizen,
    ),
    ("luca.verdi", "pec.cittadini.sandbox.test", Role::Citizen),
    ("anna.neri", "posta.sandbox.test", Role::Ordinary),
    ("paolo.gialli", "posta.sandbox.test", Role::Ordinary),
];

/// One mailbox with its password.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Mailbox {
    /// The address, which is also the IMAP and SMTP login.
    pub address: String,
    /// The password (sandbox only: it is written to sandbox.json).
    pub password: String,
    /// The provider that manages it (`uno`, `due`, or `ordinary`).
    pub provider: String,
    /// office, citizen or ordinary.
    pub role: Role,
}

/// The persistent part of the world (created once, reused).
pub struct World {
    /// The sandbox directory (absolute).
    pub dir: PathBuf,
    /// The sandbox CA (TLS and PEC signature anchor).
    pub ca: CertKey,
    /// Provider signing certificates, in [`PROVIDERS`] order.
    pub signers: Vec<CertKey>,
    /// The TLS server certificate for 127.0.0.1 / localhost.
    pub tls: CertKey,
    /// Every mailbox.
    pub mailboxes: Vec<Mailbox>,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("dir", &self.dir)
            .field("mailboxes", &self.mailboxes.len())
            .finish_non_exhaustive()
    }
}

/// Failures preparing the world.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    /// File system trouble.
    #[error("sandbox {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Certificates or keys.
    #[error("sandbox certificates: {0}")]
    Pki(#[from] pki::PkiError),
    /// openssl.
    #[error("sandbox certificates: {0}")]
    Openssl(#[from] openssl::error::ErrorStack),
    /// A stored file is not what it should be.
    #[error("sandbox {path}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WorldError + '_ {
    move |source| WorldError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes a file atomically (temporary file, fsync, rename) with `mode`.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), WorldError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

impl World {
    /// Loads the world under `dir`, creating what is missing (CA, provider
    /// certificates valid for three years, TLS certificate, passwords).
    ///
    /// # Errors
    /// File system or certificate failures.
    pub fn open(dir: &Path, now: Timestamp) -> Result<World, WorldError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let dir = fs::canonicalize(dir).map_err(io_err(dir))?;
        let pki_dir = dir.join("pki");
        fs::create_dir_all(&pki_dir).map_err(io_err(&pki_dir))?;
        let years = |n: i64| SignedDuration::from_hours(24 * 366 * n);
        let ca = load_or_make(&pki_dir, "ca", || {
            pki::make_ca(
                "Sandbox PEC CA",
                "pecgate sandbox",
                Validity {
                    not_before: now - years(1),
                    not_after: now + years(10),
                },
                2048,
            )
        })?;
        let mut signers = Vec::new();
        for p in &PROVIDERS {
            signers.push(load_or_make(&pki_dir, p.id, || {
                pki::make_provider_cert(
                    &ca,
                    &ProviderProfile {
                        organization: p.gestore.to_owned(),
                        common_name: format!("Posta Certificata {}", p.gestore),
                        email: p.service_address(),
                        validity: Validity {
                            // Back-dated a little so that clocks that differ
                            // by seconds never matter; valid well into the
                            // future so a time-scaled clock stays inside.
                            not_before: now - SignedDuration::from_hours(24),
                            not_after: now + years(3),
                        },
                        pec_policy: true,
                        key_bits: 2048,
                    },
                )
            })?);
        }
        let tls = load_or_make(&pki_dir, "tls", || {
            pki::make_tls_server_cert(
                &ca,
                &["localhost"],
                &["127.0.0.1"],
                Validity {
                    not_before: now - SignedDuration::from_hours(24),
                    not_after: now + years(3),
                },
            )
        })?;
        let mailboxes = load_or_make_mailboxes(&dir.join("mailboxes.json"))?;
        Ok(World {
            dir,
            ca,
            signers,
            tls,
            mailboxes,
        })
    }

    /// The CA certificate file (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("pki").join("ca.pem")
    }

    /// The mailbox with this address (case-insensitive).
    pub fn mailbox(&self, address: &str) -> Option<&Mailbox> {
        self.mailboxes
            .iter()
            .find(|m| crate::pec::ids::same_address(&m.address, address))
    }

    /// The provider managing this address's domain, if it is a PEC domain.
    pub fn provider_of(&self, address: &str) -> Option<(usize, &'static ProviderSpec)> {
        let domain = crate::pec::ids::domain_of(address)?;
        PROVIDERS
            .iter()
            .enumerate()
            .find(|(_, p)| p.domain.eq_ignore_ascii_case(domain))
    }

    /// The office mailbox.
    pub fn office(&self) -> &Mailbox {
        // MAILBOXES has exactly one office entry and load_or_make_mailboxes
        // keeps them all.
        self.mailboxes
            .iter()
            .find(|m| m.role == Role::Office)
            .unwrap_or(&self.mailboxes[0])
    }
}

fn load_or_make(
    dir: &Path,
    name: &str,
    make: impl FnOnce() -> Result<CertKey, pki::PkiError>,
) -> Result<CertKey, WorldError> {
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    if cert_path.exists() && key_path.exists() {
        let cert = X509::from_pem(&fs::read(&cert_path).map_err(io_err(&cert_path))?)?;
        let key = PKey::private_key_from_pem(&fs::read(&key_path).map_err(io_err(&key_path))?)?;
        return Ok(CertKey { cert, key });
    }
    let ck = make()?;
    write_file(&key_path, &pki::key_pem(&ck.key)?, 0o600)?;
    write_file(&cert_path, &pki::cert_pem(&ck.cert)?, 0o644)?;
    Ok(ck)
}

fn random_password() -> Result<String, WorldError> {
    let mut bytes = [0u8; 12];
    openssl::rand::rand_bytes(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn load_or_make_mailboxes(path: &Path) -> Result<Vec<Mailbox>, WorldError> {
    let mut known: Vec<Mailbox> = if path.exists() {
        let bytes = fs::read(path).map_err(io_err(path))?;
        serde_json::from_slice(&bytes).map_err(|e| WorldError::Corrupt {
            path: path.to_owned(),
            message: e.to_string(),
        })?
    } else {
        Vec::new()
    };
    let mut out = Vec::new();
    for (local, domain, role) in MAILBOXES {
        let address = format!("{local}@{domain}");
        let provider = PROVIDERS
            .iter()
            .find(|p| p.domain == *domain)
            .map_or("ordinary", |p| p.id)
            .to_owned();
        let password = match known.iter().position(|m| m.address == address) {
            Some(i) => known.swap_remove(i).password,
            None => random_password()?,
        };
        out.push(Mailbox {
            address,
            password,
            provider,
            role: *role,
        });
    }
    let json = serde_json::to_vec_pretty(&out).map_err(|e| WorldError::Corrupt {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    write_file(path, &json, 0o600)?;
    Ok(out)
}

/// One listening endpoint in `sandbox.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Endpoint {
    /// Always 127.0.0.1.
    pub host: String,
    /// The port.
    pub port: u16,
    /// `starttls` or `implicit`.
    pub tls: String,
}

/// The contents of `DIR/sandbox.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SandboxInfo {
    /// SMTP submission with STARTTLS.
    pub smtp: Endpoint,
    /// SMTP submission with implicit TLS.
    pub smtps: Endpoint,
    /// IMAP with STARTTLS.
    pub imap: Endpoint,
    /// IMAP with implicit TLS.
    pub imaps: Endpoint,
    /// The CA to trust for TLS and as the PEC signature anchor.
    pub ca_file: PathBuf,
    /// Simulated seconds per real second.
    pub time_scale: f64,
    /// The simulated PEC domains.
    pub pec_domains: Vec<String>,
    /// The ordinary domains.
    pub ordinary_domains: Vec<String>,
    /// Every mailbox with its password.
    pub mailboxes: Vec<Mailbox>,
    /// The sandbox process id (to send it SIGHUP or SIGTERM).
    pub pid: u32,
    /// The sandbox directory.
    pub dir: PathBuf,
}

impl SandboxInfo {
    /// Reads `DIR/sandbox.json`.
    ///
    /// # Errors
    /// Missing or malformed file.
    pub fn load(dir: &Path) -> Result<SandboxInfo, WorldError> {
        let path = dir.join("sandbox.json");
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        serde_json::from_slice(&bytes).map_err(|e| WorldError::Corrupt {
            path,
            message: e.to_string(),
        })
    }

    /// The password of a mailbox.
    pub fn password(&self, address: &str) -> Option<&str> {
        self.mailboxes
            .iter()
            .find(|m| crate::pec::ids::same_address(&m.address, address))
            .map(|m| m.password.as_str())
    }
}

/// Writes `sandbox.json`, the office's password file and `pecgate.toml`.
///
/// # Errors
/// File system failures.
pub fn write_files(world: &World, info: &SandboxInfo) -> Result<(), WorldError> {
    let json = serde_json::to_vec_pretty(info).map_err(|e| WorldError::Corrupt {
        path: world.dir.join("sandbox.json"),
        message: e.to_string(),
    })?;
    let secrets = world.dir.join("secrets");
    fs::create_dir_all(&secrets).map_err(io_err(&secrets))?;
    fs::set_permissions(&secrets, fs::Permissions::from_mode(0o700)).map_err(io_err(&secrets))?;
    let office = world.office();
    let password_file = secrets.join("protocollo.password");
    write_file(&password_file, office.password.as_bytes(), 0o600)?;
    for sub in ["outbox", "sent", "inbox", "archive"] {
        let p = world.dir.join(sub);
        fs::create_dir_all(&p).map_err(io_err(&p))?;
    }
    let toml = pecgate_toml(world, info, &password_file);
    write_file(&world.dir.join("pecgate.toml"), toml.as_bytes(), 0o640)?;
    write_file(&world.dir.join("sandbox.json"), &json, 0o600)
}

/// The gateway configuration for the office mailbox, in the schema of
/// `crate::config`, with a pace and deadlines that suit tests.
fn pecgate_toml(world: &World, info: &SandboxInfo, password_file: &Path) -> String {
    let d = world.dir.display();
    let ca = info.ca_file.display();
    let pw = password_file.display();
    let office = &world.office().address;
    let scale = info.time_scale.max(1.0);
    // Provider timeouts are 12 h / 24 h simulated; the gateway's deadlines
    // follow the same clock, shortened for tests.
    let delivery_hours = 26.0 / scale;
    format!(
        r#"# Written by `pecgate sandbox` for its office mailbox; rewritten at each start
# (the ports change). Safe to use as is: `pecgate run --config {d}/pecgate.toml`.

[gateway]
hostname = "gateway.sandbox.test"

[store]
database = "{d}/pecgate.db"
archive = "{d}/archive"

[trust]
anchors = ["{d}/anchors"]

[outbox]
settle_seconds = 0.2
rescan_seconds = 2

[deadlines]
acceptance_minutes = 0.5
delivery_hours = {delivery_hours}
uncertain_grace_minutes = 0.1

[logging]
level = "info"
format = "auto"

[mailbox.protocollo]
address = "{office}"
outbox = "{d}/outbox"
sent = "{d}/sent"
inbox = "{d}/inbox"
smtp = {{ host = "127.0.0.1", port = {smtps}, tls = "implicit", username = "{office}", password_file = "{pw}", ca_file = "{ca}", timeout_seconds = 30 }}
imap = {{ host = "127.0.0.1", port = {imaps}, tls = "implicit", username = "{office}", password_file = "{pw}", ca_file = "{ca}", idle = true, poll_seconds = 5 }}
pace = {{ per_minute = 600, per_day = 100000 }}
limits = {{ max_recipients = 500, max_total_bytes = 100000000 }}
"#,
        smtps = info.smtps.port,
        imaps = info.imaps.port,
    )
}

/// Writes the trust-anchor directory (the sandbox CA only).
///
/// # Errors
/// File system failures.
pub fn write_anchors(world: &World) -> Result<(), WorldError> {
    let anchors = world.dir.join("anchors");
    fs::create_dir_all(&anchors).map_err(io_err(&anchors))?;
    write_file(
        &anchors.join("sandbox-ca.pem"),
        &pki::cert_pem(&world.ca.cert)?,
        0o644,
    )
}
