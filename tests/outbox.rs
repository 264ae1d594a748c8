//! The outbox against real files in temporary folders: scanning, claiming,
//! loading, refusing, recovering. Time is fixed: every file's modification
//! time is set explicitly and `now` is passed in.

use std::fs;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pecgate::config::Limits;
use pecgate::outbox::intake::{self, Candidate, Claim};
use pecgate::outbox::{DocumentKind, Letter, ReceiptType};

/// The fixed "now" of every test: far enough ahead that files whose time
/// cannot be set (a symbolic link, a folder) count as long settled.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(4_000_000_000)
}

const SETTLE: Duration = Duration::from_secs(5);
const GRACE: Duration = Duration::from_secs(3600);

/// An outbox folder inside a temporary folder (so that `../x` has
/// somewhere to point).
struct Outbox {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    dir: PathBuf,
}

impl Outbox {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let dir = root.join("outbox");
        fs::create_dir(&dir).unwrap();
        Self {
            _tmp: tmp,
            root,
            dir,
        }
    }

    /// Writes a file whose last change was a minute ago.
    fn put(&self, name: impl AsRef<Path>, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.dir.join(name);
        fs::write(&p, bytes).unwrap();
        age(&p, Duration::from_secs(60));
        p
    }

    fn scan(&self) -> Vec<Candidate> {
        intake::scan(&self.dir, SETTLE, GRACE, now()).unwrap()
    }

    fn only_candidate(&self) -> Candidate {
        let mut c = self.scan();
        assert_eq!(c.len(), 1, "{c:?}");
        c.remove(0)
    }

    fn claim(&self) -> Claim {
        intake::claim(&self.only_candidate(), &self.dir, now()).unwrap()
    }

    fn rejected(&self, name: &str) -> PathBuf {
        self.dir.join("rejected").join(name)
    }

    /// Names in the outbox folder itself, sorted.
    fn listing(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// Sets a file's modification time to `now() - ago`.
fn age(path: &Path, ago: Duration) {
    let f = fs::File::options().write(true).open(path).unwrap();
    f.set_modified(now() - ago).unwrap();
}

fn never_sent(_: &str) -> Option<String> {
    None
}

fn sha256_hex(bytes: &[u8]) -> String {
    openssl::sha::sha256(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const PDF: &[u8] = b"%PDF-1.4\n% certificato di residenza\n%%EOF\n";

fn load_ok(claim: &Claim) -> Vec<Letter> {
    intake::load(claim, &Limits::default(), &never_sent).unwrap()
}

/// Scan, claim, load; a refused letter is moved to rejected/. Returns the
/// letters, or the rejected folder and the text of its error file.
fn process(o: &Outbox, limits: &Limits, sent: &dyn Fn(&str) -> Option<String>) -> Outcome {
    let claim = o.claim();
    match intake::load(&claim, limits, sent) {
        Ok(letters) => {
            intake::release(&claim).unwrap();
            Outcome::Sent(letters)
        }
        Err(rejection) => {
            let dir = intake::reject(&claim, &o.dir, &rejection.problems).unwrap();
            let reports: Vec<PathBuf> = fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.to_string_lossy().ends_with(".error.txt"))
                .collect();
            assert_eq!(reports.len(), 1, "{reports:?}");
            let text = fs::read_to_string(&reports[0]).unwrap();
            Outcome::Rejected(dir, text)
        }
    }
}

#[derive(Debug)]
enum Outcome {
    Sent(Vec<Letter>),
    Rejected(PathBuf, String),
}

impl Outcome {
    fn letters(self) -> Vec<Letter> {
        match self {
            Outcome::Sent(l) => l,
            Outcome::Rejected(_, text) => panic!("rejected:\n{text}"),
        }
    }

    fn rejected(self) -> (PathBuf, String) {
        match self {
            Outcome::Rejected(d, t) => (d, t),
            Outcome::Sent(l) => panic!("sent: {l:?}"),
        }
    }
}

const ENVELOPE: &str = r#"
to = ["Mario.Rossi@PEC.example.it", "ufficio@pec.example.it"]
cc = ["mario.rossi@pec.example.it", "archivio@pec.comune.example.it"]
subject = "Certificato di residenza"
body = "Gentile signor Rossi,\nin allegato il certificato richiesto."
attachments = ["certificato.pdf"]
kind = "certificato"
protocol = "2026/0001234"
reference = "pratica-77"
receipt = "breve"
in_reply_to = "<opec292.20260101120000.1234.56.1.7@pec.example.it>"
"#;

#[test]
fn a_valid_letter_becomes_a_letter_with_hashes() {
    let o = Outbox::new();
    o.put("certificato.pdf", PDF);
    o.put("certificato-77.toml", ENVELOPE);
    o.put("unrelated.odt", b"not named by anyone");
    let c = o.only_candidate();
    assert_eq!(c.envelope, "certificato-77.toml");
    assert_eq!(c.files, ["certificato.pdf"]);
    let claim = intake::claim(&c, &o.dir, now()).unwrap();
    assert!(claim.dir.starts_with(o.dir.join(".processing")));
    assert!(claim.dir.join("certificato.pdf").is_file());
    assert!(claim.dir.join("certificato-77.toml").is_file());
    assert_eq!(o.listing(), [".processing", "unrelated.odt"]);

    let letters = load_ok(&claim);
    assert_eq!(letters.len(), 1);
    let l = &letters[0];
    assert_eq!(l.name, "certificato-77.toml");
    assert_eq!(
        l.to,
        ["mario.rossi@pec.example.it", "ufficio@pec.example.it"]
    );
    assert_eq!(l.cc, ["archivio@pec.comune.example.it"]);
    assert_eq!(l.subject, "Certificato di residenza");
    assert!(l.body.starts_with("Gentile signor Rossi,\n"));
    assert_eq!(l.kind, DocumentKind::Certificate);
    assert_eq!(l.protocol.as_deref(), Some("2026/0001234"));
    assert_eq!(l.reference.as_deref(), Some("pratica-77"));
    assert_eq!(l.receipt, ReceiptType::Breve);
    assert_eq!(
        l.in_reply_to.as_deref(),
        Some("opec292.20260101120000.1234.56.1.7@pec.example.it")
    );
    assert!(!l.allow_duplicate);
    assert_eq!(l.attachments.len(), 1);
    let d = &l.attachments[0];
    assert_eq!(d.name, "certificato.pdf");
    assert_eq!(d.path, claim.dir.join("certificato.pdf"));
    assert_eq!(d.size, PDF.len() as u64);
    assert_eq!(d.sha256, sha256_hex(PDF));
    assert_eq!(l.content_hash.len(), 64);
    assert_eq!(l.content_hash, pecgate::outbox::content_hash(l));

    intake::release(&claim).unwrap();
    assert!(!claim.dir.exists());
    assert_eq!(o.listing(), [".processing", "unrelated.odt"]);
}

#[test]
fn body_file_reads_the_text_and_hashes_like_body() {
    let text = "Gentile signora,\r\nla pratica è conclusa.\r\n";
    let a = Outbox::new();
    a.put("esito.pdf", PDF);
    a.put("lettera.txt", format!("\u{FEFF}{text}"));
    a.put(
        "esito.toml",
        "to = [\"anna.bianchi@pec.example.it\"]\nsubject = \"Esito\"\nbody_file = \"lettera.txt\"\nattachments = [\"esito.pdf\"]\n",
    );
    let claim = a.claim();
    assert!(
        claim.dir.join("lettera.txt").is_file(),
        "the text file is claimed too"
    );
    let la = load_ok(&claim).remove(0);
    assert_eq!(la.body, text);
    assert!(la.attachments.iter().all(|d| d.name != "lettera.txt"));
    assert_eq!(la.kind, DocumentKind::Other);
    assert_eq!(la.receipt, ReceiptType::Completa);

    // The same letter with the text inline, keys in another order, LF line
    // ends, another envelope name and other modification times.
    let b = Outbox::new();
    b.put("esito.pdf", PDF);
    age(&b.dir.join("esito.pdf"), Duration::from_secs(5000));
    b.put(
        "altro-nome.toml",
        "attachments = [\"esito.pdf\"]\nbody = \"Gentile signora,\\nla pratica è conclusa.\\n\"\nsubject = \"Esito\"\nto = \"ANNA.BIANCHI@pec.example.it\"\n",
    );
    let lb = load_ok(&b.claim()).remove(0);
    assert_eq!(la.content_hash, lb.content_hash);
}

#[test]
fn a_letter_of_documents_only_needs_no_text() {
    let o = Outbox::new();
    o.put("avviso.pdf", PDF);
    o.put(
        "avviso.toml",
        "to = [\"a@pec.example.it\"]\nsubject = \"Avviso\"\nattachments = [\"avviso.pdf\"]\nkind = \"avviso\"",
    );
    let l = process(&o, &Limits::default(), &never_sent).letters();
    assert_eq!(l[0].body, "");
    assert_eq!(l[0].kind, DocumentKind::Notice);
}

fn csv_batch(o: &Outbox, csv: &str) {
    o.put("comune-info.pdf", b"%PDF informativa");
    o.put("avviso-anna.pdf", b"%PDF anna");
    o.put("avviso-bruno.pdf", b"%PDF bruno");
    o.put("massivo.csv", csv);
    o.put(
        "massivo.toml",
        r#"
subject = "Avviso di pagamento {codice} per {nome}"
body = "Gentile {nome},\nin allegato l'avviso {codice}. Importo: {{vedi allegato}}."
attachments = ["comune-info.pdf"]
kind = "tributi"
protocol = "2026/{codice}"
reference = "tari-{codice}"
"#,
    );
}

fn check_batch(letters: &[Letter]) {
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[0].name, "massivo.csv#2");
    assert_eq!(letters[1].name, "massivo.csv#3");
    assert_eq!(letters[0].to, ["anna.verdi@pec.example.it"]);
    assert_eq!(letters[1].to, ["bruno@pec.example.it"]);
    assert_eq!(letters[0].subject, "Avviso di pagamento A-1 per Anna Verdi");
    assert_eq!(
        letters[1].body,
        "Gentile Bruno, jr.,\nin allegato l'avviso B-2. Importo: {vedi allegato}."
    );
    assert_eq!(letters[1].protocol.as_deref(), Some("2026/B-2"));
    assert_eq!(letters[1].reference.as_deref(), Some("tari-B-2"));
    assert_eq!(letters[1].kind, DocumentKind::Taxes);
    let names: Vec<_> = letters[0]
        .attachments
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(names, ["comune-info.pdf", "avviso-anna.pdf"]);
    assert_eq!(letters[1].attachments[1].sha256, sha256_hex(b"%PDF bruno"));
    assert_ne!(letters[0].content_hash, letters[1].content_hash);
}

#[test]
fn a_semicolon_csv_makes_one_letter_per_row() {
    let o = Outbox::new();
    csv_batch(
        &o,
        "\u{FEFF}to;nome;codice;attachment\r\nAnna.Verdi@pec.example.it;Anna Verdi;A-1;avviso-anna.pdf\r\nbruno@pec.example.it;Bruno, jr.;B-2;avviso-bruno.pdf\r\n;;;\r\n",
    );
    let c = o.only_candidate();
    assert_eq!(c.csv.as_deref(), Some(std::ffi::OsStr::new("massivo.csv")));
    let mut files = c.files.clone();
    files.sort();
    assert_eq!(
        files,
        ["avviso-anna.pdf", "avviso-bruno.pdf", "comune-info.pdf"]
    );
    let letters = process(&o, &Limits::default(), &never_sent).letters();
    check_batch(&letters);
    assert_eq!(o.listing(), [".processing"]);
}

#[test]
fn a_comma_csv_makes_one_letter_per_row() {
    let o = Outbox::new();
    csv_batch(
        &o,
        "to,nome,codice,attachment\nAnna.Verdi@pec.example.it,Anna Verdi,A-1,avviso-anna.pdf\nbruno@pec.example.it,\"Bruno, jr.\",B-2,avviso-bruno.pdf\n",
    );
    check_batch(&process(&o, &Limits::default(), &never_sent).letters());
}

#[test]
fn one_bad_row_rejects_the_whole_batch() {
    let o = Outbox::new();
    let csv = "to;nome;codice;attachment\nanna@pec.example.it;Anna;A-1;avviso-anna.pdf\nbruno@pec.example.it;;B-2;avviso-bruno.pdf\n";
    csv_batch(&o, csv);
    let originals: Vec<(String, Vec<u8>)> = [
        "massivo.csv",
        "massivo.toml",
        "avviso-anna.pdf",
        "avviso-bruno.pdf",
        "comune-info.pdf",
    ]
    .iter()
    .map(|n| (n.to_string(), fs::read(o.dir.join(n)).unwrap()))
    .collect();
    let (dir, text) = process(&o, &Limits::default(), &never_sent).rejected();
    assert_eq!(dir, o.rejected("massivo"));
    assert!(text.contains("[csv row 3, column nome]"), "{text}");
    assert!(
        text.contains("nessuna lettera di questa spedizione"),
        "{text}"
    );
    assert!(
        text.contains("no letter of this mailing has left"),
        "{text}"
    );
    for (name, bytes) in originals {
        assert_eq!(
            fs::read(dir.join(&name)).unwrap(),
            bytes,
            "{name} untouched"
        );
    }
    assert_eq!(o.listing(), [".processing", "rejected"]);
}

#[test]
fn identical_rows_of_a_batch_are_duplicates() {
    let o = Outbox::new();
    o.put(
        "m.csv",
        "to;nome\na@pec.example.it;Anna\nb@pec.example.it;Bo\nA@pec.example.it;Anna\n",
    );
    o.put("m.toml", "subject = \"Per {nome}\"\nbody = \"Ciao {nome}\"");
    let (_, text) = process(&o, &Limits::default(), &never_sent).rejected();
    assert!(text.contains("[csv row 4, allow_duplicate]"), "{text}");
    assert!(text.contains("m.csv#2"), "{text}");
}

#[test]
fn a_template_document_missing_on_every_row_is_said_once() {
    let o = Outbox::new();
    o.put(
        "m.csv",
        "to;nome\na@pec.example.it;Anna\nb@pec.example.it;Bo\n",
    );
    o.put(
        "m.toml",
        "subject = \"Per {nome}\"\nattachments = [\"manca.pdf\"]",
    );
    age(&o.dir.join("m.toml"), GRACE + Duration::from_secs(1));
    age(&o.dir.join("m.csv"), GRACE + Duration::from_secs(1));
    let (_, text) = process(&o, &Limits::default(), &never_sent).rejected();
    assert!(
        text.contains("[attachments[0]] il file \"manca.pdf\""),
        "{text}"
    );
    assert_eq!(
        text.matches("manca.pdf\" non è nella cartella").count(),
        1,
        "{text}"
    );
}

/// One refusal: the envelope (and extra files), the field the error file
/// must name, a piece of the Italian and of the English text.
struct Case {
    envelope: &'static str,
    files: &'static [(&'static str, &'static [u8])],
    field: &'static str,
    it: &'static str,
    en: &'static str,
}

const CASES: &[Case] = &[
    Case {
        envelope: "to = [\"mario.rossi@pec\"]\nsubject = \"x\"\nbody = \"y\"",
        files: &[],
        field: "[to[0]]",
        it: "manca il dominio completo (es. nome@pec.esempio.it)",
        en: "the complete domain is missing",
    },
    Case {
        envelope: "to = [\"Mario Rossi <mario@pec.example.it>\"]\nsubject = \"x\"\nbody = \"y\"",
        files: &[],
        field: "[to[0]]",
        it: "senza nome né parentesi angolari",
        en: "without a name or angle brackets",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\", \"b@pec.example.it\"]\ncc = [\"c@pec.example.it\"]\nsubject = \"x\"\nbody = \"y\"",
        files: &[],
        field: "[to]",
        it: "troppi destinatari: 3",
        en: "too many recipients: 3",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\", \"b@pec.example.it\"]\nsubject = \"x\"\nattachments = [\"grande.pdf\"]",
        files: &[("grande.pdf", &[b'x'; 600])],
        field: "[attachments]",
        it: "con 2 destinatari fanno 1200 byte",
        en: "with 2 recipients make 1200 byte",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\"]\nsubject = \"x\"\nattachments = [\"fattura.pdf.exe\"]",
        files: &[("fattura.pdf.exe", b"MZ")],
        field: "[attachments[0]]",
        it: "i file .exe non si possono inviare",
        en: ".exe files cannot be sent",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\"]\nsubject = \"x\"\nattachments = [\"vuoto.pdf\"]",
        files: &[("vuoto.pdf", b"")],
        field: "[attachments[0]]",
        it: "è vuoto (0 byte)",
        en: "is empty (0 bytes)",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\"]\nsubject = \"   \"\nbody = \"y\"",
        files: &[],
        field: "[subject]",
        it: "l'oggetto è vuoto",
        en: "the subject is empty",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\"]\nbody = \"y\"",
        files: &[],
        field: "[subject]",
        it: "manca l'oggetto",
        en: "the subject is missing",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\"]\nsubject = \"riga uno\\nriga due\"\nbody = \"y\"",
        files: &[],
        field: "[subject]",
        it: "una riga sola",
        en: "a single line",
    },
    Case {
        envelope: "subject = \"x\"\nbody = \"y\"",
        files: &[],
        field: "[to]",
        it: "manca \"to\"",
        en: "\"to\", the recipient's PEC address, is missing",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\"]\nsubject = \"x\"",
        files: &[],
        field: "[body]",
        it: "né testo né documenti",
        en: "neither text nor documents",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\"]\nsubject = \"x\"\nbody = \"y\"\nbody_file = \"t.txt\"",
        files: &[("t.txt", b"text")],
        field: "[body_file]",
        it: "sia body sia body_file",
        en: "both body and body_file",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\"]\nsubject = \"x\"\nbody_file = \"t.txt\"",
        files: &[("t.txt", b"caff\xe8")],
        field: "[body_file, line 1]",
        it: "non è in UTF-8",
        en: "is not UTF-8",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\"]\nsubject = \"x\"\nbody = \"y\"\nkind = \"Certificato\"",
        files: &[],
        field: "[kind]",
        it: "certificato, raccomandata, avviso, tributi, altro",
        en: "is not an allowed value for kind",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\"]\nsubject = \"x\"\nbody = \"y\"\nreceipt = \"lunga\"",
        files: &[],
        field: "[receipt]",
        it: "completa, breve, sintetica",
        en: "is not an allowed value for receipt",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\"]\nsubject = \"x\"\nbody = \"y\"\nin_reply_to = \"senza-chiocciola\"",
        files: &[],
        field: "[in_reply_to]",
        it: "non è un identificativo",
        en: "is not a message identifier",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\"]\nsubjet = \"x\"\nbody = \"y\"",
        files: &[],
        field: "[subjet]",
        it: "chiave sconosciuta \"subjet\" (riga 2) (forse \"subject\"?)",
        en: "unknown key \"subjet\" (line 2) (did you mean \"subject\"?)",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\"]\nsubject = \"x\nbody = \"y\"",
        files: &[],
        field: "[line 2]",
        it: "non è un file TOML valido alla riga 2",
        en: "is not valid TOML at line 2",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\"]\nsubject = \"Per {nome}\"\nbody = \"y\"",
        files: &[],
        field: "[subject]",
        it: "non c'è il file lettera.csv",
        en: "there is no lettera.csv next to the envelope",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\"]\nsubject = \"x\"\nprotocol = 1234\nbody = \"y\"",
        files: &[],
        field: "[protocol]",
        it: "deve essere un testo tra virgolette",
        en: "must be a quoted text",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\"]\nsubject = \"x\"\nattachments = [\"Certificato.PDF\"]",
        files: &[("certificato.pdf", b"%PDF")],
        field: "[attachments[0]]",
        it: "c'è \"certificato.pdf\"",
        en: "there is \"certificato.pdf\"",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\"]\nsubject = \"x\"\nattachments = [\"a.pdf\", \"a.pdf\"]",
        files: &[("a.pdf", b"%PDF")],
        field: "[attachments[1]]",
        it: "elencato due volte",
        en: "listed twice",
    },
    Case {
        envelope: "to = [\"a@pec.example.it\"]\nsubject = \"x\"\nattachments = [\"lettera.toml\"]",
        files: &[],
        field: "[attachments[0]]",
        it: "non può esserne un allegato",
        en: "cannot be attached to it",
    },
];

fn limits_for_cases() -> Limits {
    Limits {
        max_recipients: 2,
        max_total_bytes: 1000,
        ..Limits::default()
    }
}

#[test]
fn every_rejection_writes_its_error_file_and_keeps_the_files() {
    for (i, case) in CASES.iter().enumerate() {
        let o = Outbox::new();
        for (name, bytes) in case.files {
            o.put(name, bytes);
        }
        o.put("lettera.toml", case.envelope);
        // Letters with missing files are refused after the grace.
        age(&o.dir.join("lettera.toml"), GRACE);
        let (dir, text) = process(&o, &limits_for_cases(), &never_sent).rejected();
        let ctx = format!("case {i}: {}\n---\n{text}", case.envelope);
        assert_eq!(dir, o.rejected("lettera"), "{ctx}");
        assert!(text.contains(case.field), "field {}: {ctx}", case.field);
        assert!(text.contains(case.it), "it {:?}: {ctx}", case.it);
        assert!(text.contains(case.en), "en {:?}: {ctx}", case.en);
        let it_at = text.find("=== ITALIANO ===").unwrap();
        let en_at = text.find("=== ENGLISH ===").unwrap();
        assert!(
            it_at < en_at && text[it_at..en_at].contains(case.it),
            "{ctx}"
        );
        assert!(text[en_at..].contains(case.en), "{ctx}");
        assert!(
            text.contains("spostarli di nuovo nella cartella outbox"),
            "{ctx}"
        );
        assert!(
            text.contains("move them back into the outbox folder"),
            "{ctx}"
        );
        assert_eq!(
            fs::read(dir.join("lettera.toml")).unwrap(),
            case.envelope.as_bytes(),
            "{ctx}"
        );
        for (name, bytes) in case.files {
            let moved = dir.join(name);
            let kept = o.dir.join(name);
            let found = if moved.exists() { moved } else { kept };
            assert_eq!(fs::read(found).unwrap(), *bytes, "{ctx}");
        }
        let mode = fs::metadata(dir.join("lettera.error.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640, "{ctx}");
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o750
        );
    }
}

#[test]
fn a_folder_or_a_link_named_as_attachment_is_refused() {
    let o = Outbox::new();
    fs::create_dir(o.dir.join("documenti")).unwrap();
    fs::write(o.root.join("segreto.txt"), "secret").unwrap();
    std::os::unix::fs::symlink(o.root.join("segreto.txt"), o.dir.join("link.pdf")).unwrap();
    o.put(
        "lettera.toml",
        "to = [\"a@pec.example.it\"]\nsubject = \"x\"\nattachments = [\"documenti\", \"link.pdf\"]",
    );
    let (dir, text) = process(&o, &Limits::default(), &never_sent).rejected();
    assert!(
        text.contains("[attachments[0]] \"documenti\" è una cartella"),
        "{text}"
    );
    assert!(
        text.contains("[attachments[1]] \"link.pdf\" è un collegamento simbolico"),
        "{text}"
    );
    assert!(o.dir.join("documenti").is_dir(), "folders are never moved");
    assert!(
        fs::symlink_metadata(dir.join("link.pdf"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::read(o.root.join("segreto.txt")).unwrap(), b"secret");
}

#[test]
fn an_unreadable_attachment_is_refused() {
    let o = Outbox::new();
    let p = o.put("chiuso.pdf", PDF);
    fs::set_permissions(&p, fs::Permissions::from_mode(0o000)).unwrap();
    if fs::read(&p).is_ok() {
        // Running as root: permissions do not stop reading.
        eprintln!("skipped: running with CAP_DAC_OVERRIDE");
        return;
    }
    o.put(
        "lettera.toml",
        "to = [\"a@pec.example.it\"]\nsubject = \"x\"\nattachments = [\"chiuso.pdf\"]",
    );
    let (dir, text) = process(&o, &Limits::default(), &never_sent).rejected();
    assert!(
        text.contains("non ha il permesso di leggere \"chiuso.pdf\""),
        "{text}"
    );
    assert!(
        text.contains("is not allowed to read \"chiuso.pdf\""),
        "{text}"
    );
    fs::set_permissions(dir.join("chiuso.pdf"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::read(dir.join("chiuso.pdf")).unwrap(), PDF);
}

#[test]
fn hostile_names_are_refused_and_nothing_outside_is_touched() {
    let o = Outbox::new();
    fs::write(o.root.join("x"), "outside").unwrap();
    o.put("CON", b"con");
    o.put("a\nb", b"newline");
    o.put("fattura.pdf.exe", b"MZ");
    o.put(
        "lettera.toml",
        "to = [\"a@pec.example.it\"]\nsubject = \"x\"\nattachments = [\"../x\", \"/etc/passwd\", \"a\\nb\", \"CON\", \"fattura.pdf.exe\", \"C:\\\\Windows\\\\x.pdf\", \"sub/doc.pdf\", \".nascosto\"]",
    );
    let (dir, text) = process(&o, &Limits::default(), &never_sent).rejected();
    for (field, it) in [
        ("[attachments[0]]", "\"..\""),
        ("[attachments[1]]", "percorso assoluto"),
        ("[attachments[2]]", "caratteri di controllo"),
        ("[attachments[3]]", "nome riservato in Windows"),
        ("[attachments[4]]", "i file .exe"),
        ("[attachments[5]]", "percorso assoluto"),
        ("[attachments[6]]", "niente sottocartelle"),
        ("[attachments[7]]", "file nascosto"),
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(field))
            .unwrap_or_else(|| panic!("{field} missing:\n{text}"));
        assert!(line.contains(it), "{field}: {line}");
    }
    // Badly named files are never moved; a blocked one goes with its letter.
    let mut moved: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    moved.sort();
    assert_eq!(
        moved,
        ["fattura.pdf.exe", "lettera.error.txt", "lettera.toml"]
    );
    assert_eq!(fs::read(o.root.join("x")).unwrap(), b"outside");
    assert!(o.dir.join("CON").exists() && o.dir.join("a\nb").exists());
}

#[test]
fn a_non_utf8_envelope_name_is_refused_into_a_safe_folder() {
    let o = Outbox::new();
    let name = std::ffi::OsStr::from_bytes(b"lettera\xff.toml");
    o.put(
        name,
        "to = [\"a@pec.example.it\"]\nsubject = \"x\"\nbody = \"y\"",
    );
    let (dir, text) = process(&o, &Limits::default(), &never_sent).rejected();
    assert_eq!(dir, o.rejected("lettera_"));
    assert!(text.contains("[envelope name]"), "{text}");
    assert!(text.contains("non validi in UTF-8"), "{text}");
    assert!(dir.join(name).is_file(), "the file keeps its name");
}

#[test]
fn a_non_utf8_envelope_is_refused_naming_the_line() {
    let o = Outbox::new();
    let bytes = b"to = [\"a@pec.example.it\"]\nsubject = \"Citt\xe0\"\nbody = \"y\"";
    o.put("lettera.toml", bytes);
    let (dir, text) = process(&o, &Limits::default(), &never_sent).rejected();
    assert!(text.contains("[envelope, line 2]"), "{text}");
    assert!(
        text.contains("salvarlo di nuovo scegliendo la codifica UTF-8"),
        "{text}"
    );
    assert_eq!(fs::read(dir.join("lettera.toml")).unwrap(), bytes);
}

#[test]
fn rejected_names_get_a_numeric_suffix() {
    let o = Outbox::new();
    for expected in ["lettera", "lettera-2", "lettera-3"] {
        o.put("lettera.toml", "subject = \"x\"");
        let (dir, text) = process(&o, &Limits::default(), &never_sent).rejected();
        assert_eq!(dir, o.rejected(expected));
        assert!(text.contains("[to]"));
        assert!(dir.join("lettera.error.txt").is_file());
    }
}

#[test]
fn a_file_still_changing_is_not_picked() {
    let o = Outbox::new();
    o.put("certificato.pdf", PDF);
    o.put("certificato-77.toml", ENVELOPE);
    age(&o.dir.join("certificato.pdf"), Duration::from_secs(2));
    assert!(
        o.scan().is_empty(),
        "an attachment changed 2 s ago (settle 5 s)"
    );
    age(&o.dir.join("certificato.pdf"), Duration::from_secs(5));
    assert_eq!(o.scan().len(), 1);
    age(&o.dir.join("certificato-77.toml"), Duration::from_secs(1));
    assert!(o.scan().is_empty(), "the envelope changed 1 s ago");
    // A time in the future (a file server ahead of us) counts as "just changed".
    let f = fs::File::options()
        .write(true)
        .open(o.dir.join("certificato-77.toml"))
        .unwrap();
    f.set_modified(now() + Duration::from_secs(30)).unwrap();
    assert!(o.scan().is_empty());
}

#[test]
fn a_changing_csv_holds_back_its_batch() {
    let o = Outbox::new();
    o.put("m.toml", "subject = \"Per {nome}\"\nbody = \"x\"");
    o.put("m.csv", "to;nome\na@pec.example.it;Anna\n");
    age(&o.dir.join("m.csv"), Duration::from_secs(1));
    assert!(o.scan().is_empty());
}

#[test]
fn temporary_and_hidden_files_are_ignored() {
    let o = Outbox::new();
    for n in [
        ".lettera.toml",
        "~$lettera.toml",
        "lettera.toml.part",
        "lettera.toml.tmp",
        "x.toml.swp",
    ] {
        o.put(n, "subject = \"x\"");
    }
    fs::create_dir(o.dir.join("cartella.toml")).unwrap();
    assert!(o.scan().is_empty());
}

#[test]
fn a_letter_with_a_missing_attachment_waits_then_is_refused() {
    let o = Outbox::new();
    o.put("certificato-77.toml", ENVELOPE);
    assert!(o.scan().is_empty(), "waits for certificato.pdf");
    age(
        &o.dir.join("certificato-77.toml"),
        GRACE - Duration::from_secs(1),
    );
    assert!(o.scan().is_empty(), "still within the grace");
    age(&o.dir.join("certificato-77.toml"), GRACE);
    let c = o.only_candidate();
    assert_eq!(c.missing, ["certificato.pdf"]);
    let (_, text) = process(&o, &Limits::default(), &never_sent).rejected();
    assert!(
        text.contains("[attachments[0]] il file \"certificato.pdf\" non è nella cartella outbox"),
        "{text}"
    );
}

#[test]
fn the_missing_file_arrives_and_the_letter_goes() {
    let o = Outbox::new();
    o.put("certificato-77.toml", ENVELOPE);
    assert!(o.scan().is_empty());
    o.put("certificato.pdf", PDF);
    assert_eq!(
        process(&o, &Limits::default(), &never_sent).letters().len(),
        1
    );
}

#[test]
fn a_file_named_by_two_letters_goes_with_the_first() {
    let o = Outbox::new();
    o.put("comune.pdf", PDF);
    let env = "to = [\"a@pec.example.it\"]\nsubject = \"x\"\nattachments = [\"comune.pdf\"]";
    o.put("uno.toml", env);
    o.put("due.toml", env.replace("\"x\"", "\"y\""));
    age(&o.dir.join("uno.toml"), Duration::from_secs(100));
    age(&o.dir.join("comune.pdf"), Duration::from_secs(200));
    let cands = o.scan();
    assert_eq!(cands.len(), 2);
    assert_eq!(cands[0].envelope, "uno.toml", "oldest first");
    let first = intake::claim(&cands[0], &o.dir, now()).unwrap();
    assert!(first.dir.join("comune.pdf").is_file());
    // The second envelope now waits for comune.pdf.
    assert!(o.scan().is_empty());
    let second = intake::claim(&cands[1], &o.dir, now()).unwrap();
    assert!(!second.dir.join("comune.pdf").exists());
    let rejection = intake::load(&second, &Limits::default(), &never_sent).unwrap_err();
    assert_eq!(rejection.problems[0].field, "attachments[0]");
}

#[test]
fn two_racing_claims_give_the_letter_to_exactly_one() {
    for round in 0..40 {
        let o = Outbox::new();
        o.put("certificato.pdf", PDF);
        o.put("certificato-77.toml", ENVELOPE);
        let c = o.only_candidate();
        let barrier = Barrier::new(2);
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        intake::claim(&c, &o.dir, now())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let won: Vec<&Claim> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(won.len(), 1, "round {round}: {results:?}");
        let lost = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert!(lost.is_taken(), "round {round}: {lost}");
        let claims: Vec<_> = fs::read_dir(o.dir.join(".processing")).unwrap().collect();
        assert_eq!(claims.len(), 1, "the loser left no folder");
        let letters = load_ok(won[0]);
        assert_eq!(letters[0].attachments[0].size, PDF.len() as u64);
    }
}

#[test]
fn recover_takes_up_claims_left_by_a_crash() {
    let o = Outbox::new();
    o.put("certificato.pdf", PDF);
    o.put("certificato-77.toml", ENVELOPE);
    let claim = o.claim();
    // Simulate a crash after the envelope's rename but before the
    // attachment's: put it back in the outbox.
    fs::rename(
        claim.dir.join("certificato.pdf"),
        o.dir.join("certificato.pdf"),
    )
    .unwrap();
    // And a crash right after the marker of another claim was written.
    let early = o.dir.join(".processing").join("0000000000001-aaaaaaaaaaaa");
    fs::create_dir(&early).unwrap();
    fs::write(early.join(".claim"), "altra.toml").unwrap();

    let recovered = intake::recover(&o.dir).unwrap();
    assert_eq!(recovered, vec![claim.clone()]);
    assert!(!early.exists(), "a claim without its envelope is removed");
    assert!(
        claim.dir.join("certificato.pdf").is_file(),
        "the claim is completed"
    );
    assert_eq!(o.listing(), [".processing"]);
    let letters = load_ok(&recovered[0]);
    assert_eq!(letters[0].attachments[0].sha256, sha256_hex(PDF));
    intake::release(&recovered[0]).unwrap();
    assert!(intake::recover(&o.dir).unwrap().is_empty());
}

#[test]
fn recover_keeps_the_csv_of_a_batch() {
    let o = Outbox::new();
    o.put("m.csv", "to;nome;attachment\na@pec.example.it;Anna;a.pdf\n");
    o.put("a.pdf", PDF);
    o.put("m.toml", "subject = \"Per {nome}\"");
    let claim = o.claim();
    let recovered = intake::recover(&o.dir).unwrap();
    assert_eq!(recovered, vec![claim]);
    let letters = load_ok(&recovered[0]);
    assert_eq!(letters[0].name, "m.csv#2");
}

#[test]
fn duplicates_are_refused_through_the_callback() {
    let hash = {
        let o = Outbox::new();
        o.put("certificato.pdf", PDF);
        o.put("certificato-77.toml", ENVELOPE);
        process(&o, &Limits::default(), &never_sent).letters()[0]
            .content_hash
            .clone()
    };
    let known = hash.clone();
    let sent = move |h: &str| (h == known).then(|| "01JAX3K5Q8ZT7C2M9N4P6R8S0V".to_owned());

    let o = Outbox::new();
    o.put("certificato.pdf", PDF);
    o.put("di-nuovo.toml", ENVELOPE);
    let (dir, text) = process(&o, &Limits::default(), &sent).rejected();
    assert!(text.contains("[allow_duplicate]"), "{text}");
    assert!(text.contains("01JAX3K5Q8ZT7C2M9N4P6R8S0V"), "{text}");
    assert!(text.contains("allow_duplicate = true"), "{text}");
    assert_eq!(fs::read(dir.join("certificato.pdf")).unwrap(), PDF);

    // Moved back with allow_duplicate = true, it goes.
    let o = Outbox::new();
    o.put("certificato.pdf", PDF);
    o.put(
        "di-nuovo.toml",
        format!("{ENVELOPE}allow_duplicate = true\n"),
    );
    let l = process(&o, &Limits::default(), &sent).letters();
    assert!(l[0].allow_duplicate);
    assert_eq!(l[0].content_hash, hash, "allow_duplicate is not content");
}

#[test]
fn files_the_gateway_writes_have_mode_0640() {
    let o = Outbox::new();
    o.put("certificato.pdf", PDF);
    o.put("certificato-77.toml", ENVELOPE);
    let claim = o.claim();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&claim.dir.join(".claim")), 0o640);
    assert_eq!(mode(&claim.dir), 0o750);
    assert_eq!(mode(&o.dir.join(".processing")), 0o750);
    intake::reject(
        &claim,
        &o.dir,
        &[pecgate::outbox::Problem::new("to", "a", "b")],
    )
    .unwrap();
    let r = o.rejected("certificato-77");
    assert_eq!(mode(&r.join("certificato-77.error.txt")), 0o640);
    assert_eq!(mode(&r), 0o750);
    assert_eq!(mode(&o.dir.join("rejected")), 0o750);
    let leftovers: Vec<_> = fs::read_dir(&r)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(
        leftovers.is_empty(),
        "no temporary file left: {leftovers:?}"
    );
}

#[test]
fn the_example_files_are_valid() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
    for (dir, letters) in [("lettera-singola", 1), ("spedizione-massiva", 3)] {
        let o = Outbox::new();
        for e in fs::read_dir(examples.join(dir)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name();
            let bytes = fs::read(e.path()).unwrap();
            o.put(&name, bytes);
        }
        // The PDF names are placeholders: put small PDFs there.
        assert!(o.scan().is_empty(), "{dir}: waits for its documents");
        for missing in missing_documents(&o) {
            o.put(&missing, PDF);
        }
        let l = process(&o, &Limits::default(), &never_sent).letters();
        assert_eq!(l.len(), letters, "{dir}");
    }
}

/// The documents the letters of an outbox name that are not there (found
/// by letting the grace pass and reading the refusal).
fn missing_documents(o: &Outbox) -> Vec<String> {
    let mut c = intake::scan(&o.dir, SETTLE, Duration::ZERO, now()).unwrap();
    assert_eq!(c.len(), 1);
    c.remove(0).missing
}

#[tokio::test]
async fn watching_ticks_when_a_file_arrives() {
    let o = Outbox::new();
    let (_watcher, mut ticks) = intake::watch(&o.dir).unwrap();
    fs::write(o.dir.join("lettera.toml"), "subject = \"x\"").unwrap();
    tokio::time::timeout(Duration::from_secs(10), ticks.recv())
        .await
        .expect("a tick within 10 s")
        .expect("the channel is open");
    // Many changes coalesce into at most one waiting tick.
    for i in 0..20 {
        fs::write(o.dir.join(format!("doc-{i}.pdf")), "x").unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), ticks.recv())
        .await
        .expect("a tick within 10 s");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut waiting = 0;
    while ticks.try_recv().is_ok() {
        waiting += 1;
    }
    assert!(waiting <= 1, "{waiting} ticks waiting");
}

#[test]
fn a_release_interrupted_by_a_crash_is_finished_not_taken_in_again() {
    // `release` renames the claim to `.released-<id>` before deleting it: a
    // crash during the deletion leaves that folder, which `recover` only
    // removes (the letter is already stored).
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path();
    let half = outbox
        .join(".processing")
        .join(".released-1795671484426-abcdef");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join(".claim"), b"lettera.toml").unwrap();
    std::fs::write(half.join("lettera.toml"), b"to = [\"a@pec.example.it\"]\n").unwrap();
    let claims = intake::recover(outbox).unwrap();
    assert!(claims.is_empty(), "{claims:?}");
    assert!(!half.exists());
}

/// A configuration with one mailbox whose folders are under `dir`.
fn gateway_config(dir: &Path) -> pecgate::config::Config {
    let d = dir.display();
    let toml = format!(
        r#"[gateway]
hostname = "gateway.test"

[store]
database = "{d}/pecgate.db"
archive = "{d}/archive"

[mailbox.protocollo]
address = "protocollo@pec.comune.example.it"
outbox = "{d}/outbox"
sent = "{d}/sent"
inbox = "{d}/inbox"
smtp = {{ host = "127.0.0.1", port = 1, tls = "implicit", username = "protocollo@pec.comune.example.it", password_env = "OUTBOX_TEST_PASSWORD" }}
imap = {{ host = "127.0.0.1", port = 1, tls = "implicit", username = "protocollo@pec.comune.example.it", password_env = "OUTBOX_TEST_PASSWORD" }}
"#
    );
    let path = dir.join("pecgate.toml");
    fs::write(&path, toml).unwrap();
    let mut config = pecgate::config::Config::load_with_env(
        &path,
        [("OUTBOX_TEST_PASSWORD".to_owned(), "secret".to_owned())],
    )
    .unwrap();
    config.outbox.settle = Duration::ZERO;
    for m in config.mailboxes.values() {
        for folder in [&m.outbox, &m.sent, &m.inbox] {
            fs::create_dir_all(folder).unwrap();
        }
    }
    config
}

#[test]
fn a_large_drop_is_taken_in_group_by_group_each_letter_once() {
    // More letters than one intake group, two of them identical (different
    // file names, same recipients, subject, text and document): every
    // distinct letter is stored once with its sent folder, the copy is
    // refused as a duplicate even though both were claimed in one group,
    // and nothing is left claimed.
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path());
    let mailbox = config.mailboxes.values().next().unwrap().clone();
    let total = pecgate::outbound::INTAKE_GROUP * 2 + 5;
    // Letter 3 has no document, so that its copy can be identical.
    let letter = |i: usize| {
        let attachments = if i == 3 {
            String::new()
        } else {
            format!("attachments = [\"doc-{i}.pdf\"]\n")
        };
        format!(
            "to = [\"mario.rossi@pec.example.it\"]\nsubject = \"Lettera {i}\"\nbody = \"Testo {i}\"\n{attachments}"
        )
    };
    for i in 0..total {
        if i != 3 {
            fs::write(
                mailbox.outbox.join(format!("doc-{i}.pdf")),
                format!("%PDF {i}"),
            )
            .unwrap();
        }
        fs::write(
            mailbox.outbox.join(format!("lettera-{i:03}.toml")),
            letter(i),
        )
        .unwrap();
    }
    // The copy of letter 3 under another name.
    fs::write(mailbox.outbox.join("copia.toml"), letter(3)).unwrap();
    let mut db = pecgate::store::Db::open(&config.store.database).unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let stored = pecgate::outbound::intake_pass(&mut db, &config, &mailbox, false, &cancel);
    assert_eq!(stored, total, "every distinct letter stored");
    let rejected: Vec<_> = fs::read_dir(mailbox.outbox.join("rejected"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    let report = fs::read_to_string(
        mailbox
            .outbox
            .join("rejected")
            .join(&rejected[0])
            .join(format!("{}.error.txt", rejected[0])),
    )
    .unwrap();
    assert!(report.contains("allow_duplicate"), "{report}");
    // Each stored letter has its folder with the document and dispatch.json.
    let mut by_source = std::collections::BTreeMap::new();
    for year in fs::read_dir(&mailbox.sent).unwrap() {
        for month in fs::read_dir(year.unwrap().path()).unwrap() {
            for folder in fs::read_dir(month.unwrap().path()).unwrap() {
                let folder = folder.unwrap().path();
                let record: serde_json::Value =
                    serde_json::from_slice(&fs::read(folder.join("dispatch.json")).unwrap())
                        .unwrap();
                let source = record["source"].as_str().unwrap().to_owned();
                assert!(folder.join("status.txt").is_file());
                assert!(by_source.insert(source, folder).is_none(), "stored twice");
            }
        }
    }
    assert_eq!(by_source.len(), total);
    for i in 0..total {
        let name = format!("lettera-{i:03}.toml");
        let folder = match by_source.get(&name) {
            Some(f) => f,
            None if rejected[0] == format!("lettera-{i:03}") => &by_source["copia.toml"],
            None => panic!("{name} not stored"),
        };
        if i == 3 {
            continue;
        }
        assert_eq!(
            fs::read(folder.join(format!("doc-{i}.pdf"))).unwrap(),
            format!("%PDF {i}").into_bytes()
        );
    }
    // Nothing is left in the outbox or claimed.
    let left: Vec<_> = fs::read_dir(&mailbox.outbox)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "rejected" && n != ".processing")
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(
        fs::read_dir(mailbox.outbox.join(".processing"))
            .unwrap()
            .count(),
        0
    );
    // A second pass finds nothing to do.
    assert_eq!(
        pecgate::outbound::intake_pass(&mut db, &config, &mailbox, true, &cancel),
        0
    );
}

#[tokio::test]
async fn the_daemon_intake_stores_group_by_group_and_wakes_the_sender() {
    // `intake_round` (the daemon's pass) takes the letters in as separate
    // store jobs and wakes the sender as soon as a group is queued.
    let dir = tempfile::tempdir().unwrap();
    let config = std::sync::Arc::new(gateway_config(dir.path()));
    let mailbox = config.mailboxes.values().next().unwrap().clone();
    let total = pecgate::outbound::INTAKE_GROUP + 7;
    for i in 0..total {
        fs::write(
            mailbox.outbox.join(format!("lettera-{i:03}.toml")),
            format!("to = [\"mario.rossi@pec.example.it\"]\nsubject = \"Lettera {i}\"\nbody = \"Testo {i}\"\n"),
        )
        .unwrap();
    }
    let store = pecgate::store::Store::open(&config.store.database)
        .await
        .unwrap();
    let queued = tokio::sync::Notify::new();
    let cancel = tokio_util::sync::CancellationToken::new();
    let stored =
        pecgate::outbound::intake_round(&store, &config, &mailbox, true, &cancel, &queued).await;
    assert_eq!(stored, total);
    tokio::time::timeout(Duration::from_secs(1), queued.notified())
        .await
        .expect("the sender was woken");
    let n = store
        .call(|db| db.next_queued("protocollo", 1000))
        .await
        .unwrap()
        .len();
    assert_eq!(n, total);
    store.close().await.unwrap();
}
