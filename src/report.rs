//! `pecgate report --month YYYY-MM`: what PEC did for the office in one month.
//!
//! The month is the month **of submission** in Europe/Rome: a letter belongs to the
//! month in which its first SMTP attempt started (letters still `queued` are in no
//! month yet). The computation, [`compute`], is a pure function of the letters'
//! rows; [`load`] is the thin query layer over the store.
//!
//! Counts, per mailbox and per document kind:
//!
//! - `letters`: letters submitted;
//! - `delivered`: recipients with a delivery receipt (avvenuta consegna): each one
//!   replaces one raccomandata A/R (`raccomandate_replaced`, `savings_eur` =
//!   replaced × `[report] unit_price_eur`);
//! - `failed`: recipients with a failure or a final time-out notice, and every
//!   recipient of a letter the provider did not accept (`not-accepted`) or the relay
//!   refused (`refused`);
//! - `external`: recipients that are not PEC mailboxes (the provider says so in
//!   the acceptance): the message reached them as ordinary e-mail, with no legal value;
//! - `pending`: recipients with no outcome yet (an extra key: the month may still be
//!   open, or a letter uncertain).
//!
//! `failed` and `external` recipients must be reached on paper: they are listed in
//! `paper_fallback` with the reason (`failed`, `timed-out`, `not-accepted`,
//! `refused`, `external`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use jiff::Timestamp;
use jiff::civil::Date;
use serde::Serialize;

use crate::store::{Db, ReportLetter};

/// The time zone the month is counted in.
pub const TIME_ZONE: &str = "Europe/Rome";

/// A calendar month, `YYYY-MM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Month {
    /// The year.
    pub year: i16,
    /// 1..=12.
    pub month: i8,
}

impl std::str::FromStr for Month {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("--month {s:?}: expected YYYY-MM, e.g. 2026-03");
        let (y, m) = s.trim().split_once('-').ok_or_else(bad)?;
        if y.len() != 4 || m.len() != 2 {
            return Err(bad());
        }
        let year: i16 = y.parse().map_err(|_| bad())?;
        let month: i8 = m.parse().map_err(|_| bad())?;
        if !(1..=12).contains(&month) || year < 1970 {
            return Err(bad());
        }
        Ok(Month { year, month })
    }
}

impl std::fmt::Display for Month {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl Month {
    /// The instants the month starts and ends at (`[start, end)`) in Europe/Rome.
    ///
    /// # Errors
    ///
    /// The time zone database lacks Europe/Rome (it is bundled) or the date is out of
    /// range.
    pub fn bounds(&self) -> Result<(Timestamp, Timestamp), jiff::Error> {
        let first = Date::new(self.year, self.month, 1)?;
        let next = first.checked_add(jiff::Span::new().months(1))?;
        let start = first.in_tz(TIME_ZONE)?.timestamp();
        let end = next.in_tz(TIME_ZONE)?.timestamp();
        Ok((start, end))
    }
}

/// Counts of one mailbox, or of one document kind within it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Letters submitted.
    pub letters: u64,
    /// Recipients delivered.
    pub delivered: u64,
    /// Recipients failed, timed out, or of a letter not accepted or refused.
    pub failed: u64,
    /// Recipients that are not PEC mailboxes.
    pub external: u64,
    /// Recipients with no outcome yet.
    pub pending: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.letters += o.letters;
        self.delivered += o.delivered;
        self.failed += o.failed;
        self.external += o.external;
        self.pending += o.pending;
    }
}

/// One mailbox of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MailboxReport {
    /// The mailbox's short name.
    pub name: String,
    /// Its totals.
    #[serde(flatten)]
    pub counts: Counts,
    /// The same, by document kind.
    pub by_kind: BTreeMap<String, Counts>,
}

/// A recipient to reach on paper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PaperFallback {
    /// The letter.
    pub dispatch_id: String,
    /// The recipient's address.
    pub recipient: String,
    /// `failed`, `timed-out`, `not-accepted`, `refused` or `external`.
    pub reason: String,
    /// The mailbox (CSV only).
    #[serde(skip)]
    pub mailbox: String,
    /// The document kind (CSV only).
    #[serde(skip)]
    pub kind: String,
    /// The protocol number (CSV only).
    #[serde(skip)]
    pub protocol: Option<String>,
    /// The provider's words, when there are some (CSV only).
    #[serde(skip)]
    pub detail: Option<String>,
}

/// The whole report (`--json` prints exactly this).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// `YYYY-MM`.
    pub month: String,
    /// The configured price of one raccomandata A/R.
    pub unit_price_eur: f64,
    /// One per configured mailbox (and any other found in the letters), by name.
    pub mailboxes: Vec<MailboxReport>,
    /// Recipients to reach on paper, in submission order.
    pub paper_fallback: Vec<PaperFallback>,
    /// One per delivered recipient.
    pub raccomandate_replaced: u64,
    /// `raccomandate_replaced × unit_price_eur`.
    pub savings_eur: f64,
}

/// What became of one recipient, for the report.
fn outcome(letter_state: &str, recipient_state: &str) -> (Bucket, Option<&'static str>) {
    match (letter_state, recipient_state) {
        (_, "delivered") => (Bucket::Delivered, None),
        ("not-accepted", _) => (Bucket::Failed, Some("not-accepted")),
        ("refused", _) => (Bucket::Failed, Some("refused")),
        (_, "failed") => (Bucket::Failed, Some("failed")),
        (_, "timed-out") => (Bucket::Failed, Some("timed-out")),
        (_, "external") => (Bucket::External, Some("external")),
        _ => (Bucket::Pending, None),
    }
}

#[derive(Clone, Copy)]
enum Bucket {
    Delivered,
    Failed,
    External,
    Pending,
}

/// Computes the report from the month's letters (pure). `mailboxes` are the configured
/// names: each appears even without letters. Money is counted in cents.
pub fn compute(
    month: Month,
    unit_price_cents: u64,
    mailboxes: &[String],
    letters: &[ReportLetter],
) -> Report {
    let mut by_mailbox: BTreeMap<String, MailboxReport> = mailboxes
        .iter()
        .map(|n| {
            (
                n.clone(),
                MailboxReport {
                    name: n.clone(),
                    counts: Counts::default(),
                    by_kind: BTreeMap::new(),
                },
            )
        })
        .collect();
    let mut paper_fallback = Vec::new();
    for l in letters {
        let mut c = Counts {
            letters: 1,
            ..Counts::default()
        };
        for r in &l.recipients {
            let (bucket, reason) = outcome(&l.state, &r.state);
            match bucket {
                Bucket::Delivered => c.delivered += 1,
                Bucket::Failed => c.failed += 1,
                Bucket::External => c.external += 1,
                Bucket::Pending => c.pending += 1,
            }
            if let Some(reason) = reason {
                paper_fallback.push(PaperFallback {
                    dispatch_id: l.dispatch_id.clone(),
                    recipient: r.address.clone(),
                    reason: reason.to_owned(),
                    mailbox: l.mailbox.clone(),
                    kind: l.kind.clone(),
                    protocol: l.protocol.clone(),
                    detail: r.detail.clone(),
                });
            }
        }
        let m = by_mailbox
            .entry(l.mailbox.clone())
            .or_insert_with(|| MailboxReport {
                name: l.mailbox.clone(),
                counts: Counts::default(),
                by_kind: BTreeMap::new(),
            });
        m.counts.add(&c);
        m.by_kind.entry(l.kind.clone()).or_default().add(&c);
    }
    let raccomandate_replaced: u64 = by_mailbox.values().map(|m| m.counts.delivered).sum();
    let savings_cents = raccomandate_replaced.saturating_mul(unit_price_cents);
    Report {
        month: month.to_string(),
        unit_price_eur: cents_to_eur(unit_price_cents),
        mailboxes: by_mailbox.into_values().collect(),
        paper_fallback,
        raccomandate_replaced,
        savings_eur: cents_to_eur(savings_cents),
    }
}

/// Cents as a JSON number of euro (exact for any realistic sum: below 2^53 cents).
fn cents_to_eur(cents: u64) -> f64 {
    // Precision loss only above 2^53 cents (about 90 000 billion euro).
    #[allow(clippy::cast_precision_loss)]
    let c = cents as f64;
    c / 100.0
}

fn eur(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// The thin query layer: reads the month's letters and computes the report.
///
/// # Errors
///
/// Store failures; a month outside the time zone database's range.
pub fn load(
    db: &Db,
    month: Month,
    unit_price_cents: u64,
    mailboxes: &[String],
) -> anyhow::Result<Report> {
    let (from, to) = month.bounds()?;
    let letters = db.report_letters(from, to)?;
    Ok(compute(month, unit_price_cents, mailboxes, &letters))
}

/// The readable report.
pub fn render_human(r: &Report, unit_price_cents: u64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "PEC report for {} (month of submission, {TIME_ZONE})",
        r.month
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<14}  {:<16}  {:>7}  {:>9}  {:>6}  {:>8}  {:>7}",
        "mailbox", "kind", "letters", "delivered", "failed", "external", "pending"
    );
    for m in &r.mailboxes {
        let row = |s: &mut String, kind: &str, c: &Counts| {
            let _ = writeln!(
                s,
                "{:<14}  {:<16}  {:>7}  {:>9}  {:>6}  {:>8}  {:>7}",
                m.name, kind, c.letters, c.delivered, c.failed, c.external, c.pending
            );
        };
        for (kind, c) in &m.by_kind {
            row(&mut s, kind, c);
        }
        row(&mut s, "(all)", &m.counts);
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "raccomandate A/R replaced: {} × € {} = € {}",
        r.raccomandate_replaced,
        eur(unit_price_cents),
        eur(r.raccomandate_replaced.saturating_mul(unit_price_cents))
    );
    let _ = writeln!(s);
    if r.paper_fallback.is_empty() {
        let _ = writeln!(s, "to reach on paper: nobody");
    } else {
        let _ = writeln!(s, "to reach on paper ({}):", r.paper_fallback.len());
        for p in &r.paper_fallback {
            let _ = writeln!(
                s,
                "  {}  {:<12}  {:<14}  {}",
                p.dispatch_id, p.reason, p.mailbox, p.recipient
            );
        }
    }
    s
}

/// The CSV form: one row per recipient to reach on paper (the list the office acts
/// on), with the letter's mailbox, kind and protocol and the provider's words.
///
/// # Errors
///
/// Only a failure of the CSV writer (none into memory).
pub fn render_csv(r: &Report) -> anyhow::Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "month",
        "dispatch_id",
        "mailbox",
        "kind",
        "protocol",
        "recipient",
        "reason",
        "detail",
    ])?;
    for p in &r.paper_fallback {
        w.write_record([
            r.month.as_str(),
            &p.dispatch_id,
            &p.mailbox,
            &p.kind,
            p.protocol.as_deref().unwrap_or(""),
            &p.recipient,
            &p.reason,
            p.detail.as_deref().unwrap_or(""),
        ])?;
    }
    Ok(String::from_utf8(w.into_inner()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ReportRecipient;

    fn rcpt(address: &str, state: &str) -> ReportRecipient {
        ReportRecipient {
            address: address.into(),
            state: state.into(),
            certified: None,
            detail: None,
        }
    }

    fn letter(
        id: &str,
        mailbox: &str,
        kind: &str,
        state: &str,
        r: &[(&str, &str)],
    ) -> ReportLetter {
        ReportLetter {
            dispatch_id: id.into(),
            mailbox: mailbox.into(),
            kind: kind.into(),
            protocol: None,
            state: state.into(),
            submitted_at: "2026-03-10T09:00:00Z".parse().unwrap(),
            recipients: r.iter().map(|(a, s)| rcpt(a, s)).collect(),
        }
    }

    #[test]
    fn month_bounds_are_in_rome_time() {
        let m: Month = "2026-03".parse().unwrap();
        let (a, b) = m.bounds().unwrap();
        // CET (+01:00) at the start, CEST (+02:00) at the end of March.
        assert_eq!(a.to_string(), "2026-02-28T23:00:00Z");
        assert_eq!(b.to_string(), "2026-03-31T22:00:00Z");
        let d: Month = "2025-12".parse().unwrap();
        assert_eq!(d.bounds().unwrap().1.to_string(), "2025-12-31T23:00:00Z");
        for bad in ["2026-3", "2026-13", "26-03", "2026/03", "", "2026-00"] {
            assert!(bad.parse::<Month>().is_err(), "{bad}");
        }
    }

    #[test]
    fn counts_fallback_and_savings() {
        let letters = vec![
            letter(
                "A",
                "protocollo",
                "certificato",
                "partially-delivered",
                &[
                    ("a@pec.it", "delivered"),
                    ("b@pec.it", "failed"),
                    ("x@gmail.com", "external"),
                ],
            ),
            letter(
                "B",
                "protocollo",
                "avviso",
                "delivered",
                &[("c@pec.it", "delivered")],
            ),
            letter(
                "C",
                "tributi",
                "avviso",
                "not-accepted",
                &[("d@pec.it", "pending")],
            ),
            letter(
                "D",
                "tributi",
                "avviso",
                "accepted",
                &[("e@pec.it", "timed-out"), ("f@pec.it", "warned")],
            ),
            letter(
                "E",
                "tributi",
                "avviso",
                "uncertain",
                &[("g@pec.it", "pending")],
            ),
        ];
        let r = compute(
            "2026-03".parse().unwrap(),
            650,
            &["protocollo".into(), "tributi".into(), "urp".into()],
            &letters,
        );
        assert_eq!(r.raccomandate_replaced, 2);
        assert_eq!(r.savings_eur, 13.0);
        assert_eq!(r.unit_price_eur, 6.5);
        let names: Vec<_> = r.mailboxes.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["protocollo", "tributi", "urp"]);
        let p = &r.mailboxes[0];
        assert_eq!(
            (
                p.counts.letters,
                p.counts.delivered,
                p.counts.failed,
                p.counts.external
            ),
            (2, 2, 1, 1)
        );
        assert_eq!(p.by_kind["certificato"].letters, 1);
        assert_eq!(p.by_kind["avviso"].delivered, 1);
        let t = &r.mailboxes[1];
        assert_eq!(
            (t.counts.letters, t.counts.failed, t.counts.pending),
            (3, 2, 2)
        );
        assert_eq!(r.mailboxes[2].counts, Counts::default());
        let fb: Vec<_> = r
            .paper_fallback
            .iter()
            .map(|p| {
                (
                    p.dispatch_id.as_str(),
                    p.recipient.as_str(),
                    p.reason.as_str(),
                )
            })
            .collect();
        assert_eq!(
            fb,
            [
                ("A", "b@pec.it", "failed"),
                ("A", "x@gmail.com", "external"),
                ("C", "d@pec.it", "not-accepted"),
                ("D", "e@pec.it", "timed-out"),
            ]
        );
        let v = serde_json::to_value(&r).unwrap();
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            [
                "month",
                "unit_price_eur",
                "mailboxes",
                "paper_fallback",
                "raccomandate_replaced",
                "savings_eur"
            ]
        );
        assert_eq!(
            v["paper_fallback"][0],
            serde_json::json!({"dispatch_id": "A", "recipient": "b@pec.it", "reason": "failed"})
        );
        assert_eq!(v["mailboxes"][0]["by_kind"]["avviso"]["delivered"], 1);
        let csv = render_csv(&r).unwrap();
        assert_eq!(csv.lines().count(), 5);
        assert!(
            csv.lines()
                .nth(1)
                .unwrap()
                .starts_with("2026-03,A,protocollo,certificato,,b@pec.it,failed")
        );
    }

    #[test]
    fn savings_are_exact_in_cents() {
        let letters: Vec<_> = (0..3)
            .map(|i| {
                letter(
                    &format!("L{i}"),
                    "m",
                    "k",
                    "delivered",
                    &[("a@pec.it", "delivered")],
                )
            })
            .collect();
        let r = compute("2026-01".parse().unwrap(), 540, &[], &letters);
        // 3 × 5.40 is 16.200000000000003 in floating point; cents keep it exact.
        assert_eq!(r.savings_eur, 16.2);
        assert!(render_human(&r, 540).contains("3 × € 5.40 = € 16.20"));
    }
}
