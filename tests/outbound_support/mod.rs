//! Helpers for `tests/outbound.rs`: run the real `pecgate run` binary
//! against an in-process sandbox (`sandbox_support::Env`), drop letters into
//! its outbox, read `pecgate list --json`, the daemon's JSON log (stderr,
//! appended to a file across restarts), the store, the sent folders and the
//! sandbox mailboxes.
//!
//! Every wait polls with a deadline; a fixed pause is used only to be sure
//! that nothing *more* happens (see [`QUIET`]).
#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use pecgate::pec::kind::Kind;
use pecgate::store::Db;
use serde_json::Value;

use crate::sandbox_support::{Env, Sys, certified, fetch_now, signal};

/// The office mailbox's short name in the sandbox's `pecgate.toml`.
pub const MAILBOX: &str = "protocollo";
/// The gateway host name the sandbox configuration sets.
pub const GATEWAY_HOST: &str = "gateway.sandbox.test";
/// How long to watch for something that must *not* happen (or must not
/// happen again) before concluding it did not.
pub const QUIET: Duration = Duration::from_millis(1500);

// ---------------------------------------------------------------------------
// The gateway process

/// `pecgate --config DIR/pecgate.toml --log-format json run`, restartable;
/// stderr of every run is appended to one log file.
pub struct Gateway {
    /// The sandbox directory (holds `pecgate.toml`, `outbox/`, `sent/`, `pecgate.db`).
    pub dir: PathBuf,
    /// `DIR/pecgate.toml`.
    pub config: PathBuf,
    /// The JSON log of every run.
    pub log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// How many times the daemon was started.
    pub starts: usize,
}

impl Gateway {
    /// Starts the daemon for the sandbox of `env`, with these extra
    /// environment variables (configuration overrides), and waits until it
    /// says it is running. The outbound half only: the office mailbox's IMAP
    /// port is pointed at a closed port, so no receipt is taken in (the
    /// daemon keeps retrying, as with an unreachable server) and dispatch
    /// states stop at submitted / uncertain / refused. [`Gateway::start_full`]
    /// runs the whole loop.
    pub async fn start(env: &Env, vars: &[(&str, &str)]) -> Gateway {
        let mut all = vec![("PECGATE__MAILBOX__PROTOCOLLO__IMAP__PORT", "9")];
        all.extend_from_slice(vars);
        Self::start_full(env, &all).await
    }

    /// Like [`Gateway::start`], with the inbound tasks reading the office
    /// mailbox (receipts applied, incoming mail unpacked).
    pub async fn start_full(env: &Env, vars: &[(&str, &str)]) -> Gateway {
        let dir = env.dir().to_path_buf();
        let mut gw = Gateway {
            config: dir.join("pecgate.toml"),
            log: env.tmp.path().join("gateway.log"),
            dir,
            env: vars
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            child: None,
            starts: 0,
        };
        gw.spawn();
        gw.ready().await;
        gw
    }

    /// Spawns the daemon (not waiting for it).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "the gateway is already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("gateway log file");
        let child = Command::new(env!("CARGO_BIN_EXE_pecgate"))
            .arg("--config")
            .arg(&self.config)
            .arg("--log-format")
            .arg("json")
            .arg("run")
            .env_remove("PECGATE_CONFIG")
            .env_remove("PECGATE_LOG_LEVEL")
            .env_remove("PECGATE_LOG_FORMAT")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("gateway log file"))
            .stderr(log)
            .spawn()
            .expect("spawn pecgate run");
        self.child = Some(child);
        self.starts += 1;
    }

    /// Waits until the current run logged `daemon.started`.
    pub async fn ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.events("daemon.started").len() >= self.starts {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("pecgate run exited early ({status}): {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "pecgate run not started after 30 s: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id of the current run.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("gateway running").id()
    }

    /// Whether the current run has exited (panics if none was started).
    pub fn has_exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .expect("gateway running")
            .try_wait()
            .expect("try_wait")
    }

    /// SIGKILL, and reaps the process.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("gateway running");
        child.kill().expect("SIGKILL pecgate run");
        child.wait().expect("wait for pecgate run");
    }

    /// SIGTERM, then waits (up to `limit`) for the exit status.
    pub async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        signal(self.pid(), "TERM");
        let started = Instant::now();
        let mut child = self.child.take().expect("gateway running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "pecgate run still running {limit:?} after SIGTERM: {}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, asserts a clean exit (status 0 within 10 s, `daemon.stopped`
    /// logged) and an intact event chain.
    pub async fn stop_cleanly(&mut self) {
        let status = self.terminate(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(0), "exit status: {}", self.log_text());
        assert!(
            !self.events("daemon.stopped").is_empty(),
            "daemon.stopped logged: {}",
            self.log_text()
        );
        let report = self.db().verify_chain().expect("verify_chain");
        assert!(report.is_intact(), "event chain broken: {report:?}");
    }

    /// Everything the daemon printed so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every JSON line of the log (non-JSON lines are skipped).
    pub fn log_lines(&self) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    }

    /// The log lines whose `event` field is `name`.
    pub fn events(&self, name: &str) -> Vec<Value> {
        self.log_lines()
            .into_iter()
            .filter(|l| l["event"] == name)
            .collect()
    }

    /// Waits until the log holds a line for which `pred` is true.
    pub async fn wait_log(&self, what: &str, limit: Duration, pred: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            if self.log_lines().iter().any(&pred) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no log line {what} after {limit:?}: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `pecgate --config F list --json [--state S]`: one object per letter.
    pub async fn list(&self, state: Option<&str>) -> Vec<Value> {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pecgate"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("list")
            .arg("--json");
        if let Some(s) = state {
            cmd.arg("--state").arg(s);
        }
        let out = cmd
            .env_remove("PECGATE_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run pecgate list");
        assert!(
            out.status.success(),
            "pecgate list failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("pecgate list prints UTF-8")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("list line {l:?}: {e}")))
            .collect()
    }

    /// Polls `pecgate list --json` until `pred` holds; fails after `limit`
    /// showing the last listing.
    pub async fn wait_list(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let list = self.list(None).await;
            if pred(&list) {
                return list;
            }
            if Instant::now() > deadline {
                let states: Vec<String> = list
                    .iter()
                    .map(|d| format!("{} {}", d["subject"], d["state"]))
                    .collect();
                panic!(
                    "{what}: not reached after {limit:?}; list: {states:?}\nlog:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Waits until `n` letters exist and none is `queued` or `sending`.
    pub async fn wait_settled(&self, n: usize, limit: Duration) -> Vec<Value> {
        self.wait_list(
            &format!("{n} letters, none queued or sending"),
            limit,
            |l| {
                l.len() == n
                    && l.iter()
                        .all(|d| d["state"] != "queued" && d["state"] != "sending")
            },
        )
        .await
    }

    /// The store (a second connection; safe while the daemon runs).
    pub fn db(&self) -> Db {
        Db::open(self.dir.join("pecgate.db")).expect("open the store")
    }

    /// `DIR/outbox`.
    pub fn outbox(&self) -> PathBuf {
        self.dir.join("outbox")
    }

    /// `DIR/sent`.
    pub fn sent(&self) -> PathBuf {
        self.dir.join("sent")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // A failed test must not leave a daemon running.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// The outbox

/// Writes `files` into `outbox` the way a careful program does: each to a
/// hidden temporary name, then renamed; documents first, then the CSV, the
/// envelope (`.toml`) last.
pub fn drop_files(outbox: &Path, files: &[(&str, &[u8])]) {
    let rank = |n: &str| {
        if n.ends_with(".toml") {
            2
        } else if n.ends_with(".csv") {
            1
        } else {
            0
        }
    };
    let mut sorted: Vec<&(&str, &[u8])> = files.iter().collect();
    sorted.sort_by_key(|(n, _)| rank(n));
    for (name, bytes) in sorted {
        let tmp = outbox.join(format!(".{name}.part"));
        fs::write(&tmp, bytes).expect("write into the outbox");
        fs::rename(&tmp, outbox.join(name)).expect("rename into the outbox");
    }
}

/// Drops one envelope (`name`, TOML text) with its documents.
pub fn drop_letter(outbox: &Path, name: &str, envelope: &str, documents: &[(&str, &[u8])]) {
    let mut files: Vec<(&str, &[u8])> = documents.to_vec();
    files.push((name, envelope.as_bytes()));
    drop_files(outbox, &files);
}

/// Drops `count` one-recipient letters at once, `lettera-N.toml` with the
/// subject `Lettera N` to `recipient(N)`, for N in 1..=count.
pub fn drop_numbered_letters<'a>(
    outbox: &Path,
    count: usize,
    recipient: impl Fn(usize) -> &'a str,
) {
    let envelopes: Vec<(String, String)> = (1..=count)
        .map(|n| {
            (
                format!("lettera-{n}.toml"),
                format!(
                    "to = [\"{}\"]\nsubject = \"Lettera {n}\"\nbody = \"Testo della lettera numero {n}.\"\nkind = \"avviso\"\n",
                    recipient(n)
                ),
            )
        })
        .collect();
    let files: Vec<(&str, &[u8])> = envelopes
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_bytes()))
        .collect();
    drop_files(outbox, &files);
}

/// Sets a file's modification time `age` into the past.
pub fn age_file(path: &Path, age: Duration) {
    let f = fs::File::options()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.set_modified(pecgate::outbound::system_now() - age)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A PDF-like document whose bytes depend on `name` (binary, with every byte
/// value, so that an encoding mistake shows).
pub fn document(name: &str) -> Vec<u8> {
    let mut data = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n".to_vec();
    data.extend_from_slice(format!("% {name}\n").as_bytes());
    data.extend((0u8..=255).cycle().take(2500));
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(b"\n%%EOF\n");
    data
}

/// The names of the entries of a folder (sorted; empty when it is missing).
pub fn entries(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| {
                e.expect("read folder")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

/// Asserts that the outbox holds nothing but an empty `.processing/` (and
/// `rejected/` when `rejected` is true).
pub fn assert_outbox_drained(outbox: &Path, rejected: bool) {
    let left: Vec<String> = entries(outbox)
        .into_iter()
        .filter(|n| n != ".processing" && !(rejected && n == "rejected"))
        .collect();
    assert!(left.is_empty(), "files left in the outbox: {left:?}");
    let processing = entries(&outbox.join(".processing"));
    assert!(
        processing.is_empty(),
        "claims left in .processing: {processing:?}"
    );
}

// ---------------------------------------------------------------------------
// Mailboxes and messages

/// Every message of `address`, inspected and verified (valid signature, no
/// inspection problem: the sandbox signs everything it delivers).
pub async fn mailbox(env: &Env, address: &str) -> Vec<Sys> {
    fetch_now(&env.info, address)
        .await
        .iter()
        .map(|f| certified(&env.verifier, f))
        .collect()
}

/// Waits until every `(address, n)` mailbox holds at least `n` messages,
/// then watches for [`QUIET`] and returns what each holds (asserting that
/// no more than `n` arrived).
pub async fn mailboxes_exactly(env: &Env, expected: &[(&str, usize)]) -> Vec<Vec<Sys>> {
    for (address, n) in expected {
        crate::sandbox_support::wait_for(&env.info, address, *n, Duration::from_secs(30)).await;
    }
    tokio::time::sleep(QUIET).await;
    let mut out = Vec::new();
    for (address, n) in expected {
        let list = mailbox(env, address).await;
        let kinds: Vec<String> = list
            .iter()
            .map(|s| format!("{} {:?}", s.kind, s.subject))
            .collect();
        assert_eq!(list.len(), *n, "{address}: {kinds:?}");
        out.push(list);
    }
    out
}

/// The messages of `list` of this kind that refer to `message_id`
/// (`X-Riferimento-Message-ID`).
pub fn referring<'a>(list: &'a [Sys], kind: &Kind, message_id: &str) -> Vec<&'a Sys> {
    list.iter()
        .filter(|s| s.kind == *kind && s.refers_to.as_deref() == Some(message_id))
        .collect()
}

/// `raw` without the header fields named in `names` (case-insensitive),
/// continuation lines included; the body is untouched.
pub fn without_fields(raw: &[u8], names: &[&str]) -> Vec<u8> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw.len(), |p| p + 2);
    let (head, body) = raw.split_at(end);
    let mut out = Vec::with_capacity(raw.len());
    let mut keep = true;
    for line in head.split_inclusive(|&b| b == b'\n') {
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if !continuation {
            let name = line
                .iter()
                .position(|&b| b == b':')
                .map(|p| String::from_utf8_lossy(&line[..p]).trim().to_owned())
                .unwrap_or_default();
            keep = !names.iter().any(|n| n.eq_ignore_ascii_case(&name));
        }
        if keep {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(body);
    out
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    openssl::sha::sha256(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Polls `f` until it returns `Some`, failing after `limit` with `what`.
pub async fn eventually<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not after {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The one letter of `list` with this subject (asserted).
pub fn by_subject<'a>(list: &'a [Value], subject: &str) -> &'a Value {
    let found: Vec<&Value> = list.iter().filter(|d| d["subject"] == subject).collect();
    assert_eq!(
        found.len(),
        1,
        "letters with subject {subject:?}: {found:?}"
    );
    found[0]
}

/// Every dispatch in the store, in `list` order.
pub fn all_dispatches(db: &Db) -> Vec<pecgate::store::DispatchDetail> {
    let mut all = Vec::new();
    db.list(None, None, |d| {
        all.push(d);
        std::ops::ControlFlow::Continue(())
    })
    .expect("list");
    all
}

/// The seed of a randomised test: `PECGATE_TEST_SEED` if set, else a fixed
/// one (each test prints it, so that a failing run can be repeated).
pub fn test_seed() -> u64 {
    std::env::var("PECGATE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_2026_u64)
}

/// A `Value` that must be a string.
pub fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

/// A small deterministic random number generator (xorshift64*), so that a
/// failing run can be repeated with the same seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

// ---------------------------------------------------------------------------
// Other commands (added for tests/lifecycle.rs)

impl Gateway {
    /// `pecgate --config F ARGS...` with the daemon's configuration
    /// overrides: (exit code, stdout, stderr).
    pub async fn cli(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = self.command(args).await;
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

// ---------------------------------------------------------------------------
// Other commands against the same configuration

impl Gateway {
    /// `pecgate --config F ARGS...` with this gateway's configuration
    /// overrides (environment), run to completion: its output and status.
    pub async fn command(&self, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pecgate"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("PECGATE_CONFIG")
            .env_remove("PECGATE_LOG_FORMAT")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap_or_else(|e| panic!("run pecgate {args:?}: {e}"))
    }
}
