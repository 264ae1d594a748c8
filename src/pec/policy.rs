//! Deadlines and the time-based rules of PEC (SPEC.md §2.7, §2.10): when a
//! time-out notice is final, when an acceptance is overdue, when a
//! recipient is stale, when an uncertain letter may be sent again.
//!
//! Pure functions of their arguments: the time is always passed in (`now`,
//! daticert times), the limits come from the configuration (`[deadlines]`).
//! The timer task asks the store for candidates and calls
//! [`Deadlines::due`]; the state machine ([`super::state`]) calls
//! [`timeout_is_final`] and [`may_resend_automatically`].
//!
//! "Stale" and "acceptance overdue" are derived flags, not states: they
//! raise a warning for the operator and change nothing in the dispatch.

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use super::state::{AttemptState, Dispatch, DispatchState, RecipientState};

/// How long after the acceptance a `preavviso-errore-consegna` is the
/// final (24-hour) notice rather than the 12-hour warning: 22 hours.
///
/// The technical rules make the sender's provider send the second notice
/// "not before 22 h and by 24 h" after dispatch, and the two notices carry
/// the same `X-Ricevuta` value; only the time tells them apart reliably.
/// Any notice at least this long after the acceptance is therefore the
/// final one. The first notice comes at 12 hours, well before.
pub const FINAL_TIMEOUT_AFTER: SignedDuration = SignedDuration::from_hours(22);

/// The enhanced status code (RFC 3463, `class.subject.detail`) that a text
/// starts with, e.g. `5.4.1` from `5.4.1 - ARUBA PEC S.p.A. - ...`.
///
/// ```
/// use pecgate::pec::policy::leading_status_code;
/// assert_eq!(leading_status_code("5.4.1 - timeout"), Some("5.4.1"));
/// assert_eq!(leading_status_code(" 4.4.7"), Some("4.4.7"));
/// assert_eq!(leading_status_code("5.4"), None);
/// assert_eq!(leading_status_code("indirizzo non valido"), None);
/// ```
pub fn leading_status_code(text: &str) -> Option<&str> {
    let t = text.trim_start();
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let code = t[..end].strip_suffix('.').unwrap_or(&t[..end]);
    let mut parts = code.split('.');
    let class = parts.next()?;
    let subject = parts.next()?;
    let detail = parts.next()?;
    let ok = parts.next().is_none()
        && class.len() == 1
        && matches!(class, "2" | "4" | "5")
        && (1..=3).contains(&subject.len())
        && (1..=3).contains(&detail.len());
    ok.then_some(code)
}

/// True when `code` (a status code, or a text starting with one) is a
/// permanent failure: class `5`.
pub fn is_permanent_code(code: &str) -> bool {
    leading_status_code(code).is_some_and(|c| c.starts_with("5."))
}

/// Is a `preavviso-errore-consegna` final (the recipient `timed-out`)
/// rather than a warning (`warned`)?
///
/// Final when `errore_code` is a permanent `5.x.x` code (Aruba and Namirial
/// send `5.4.1` on notices that are in effect final), or when the notice's
/// daticert time is at least [`FINAL_TIMEOUT_AFTER`] (22 hours) after the
/// acceptance's. Without an acceptance time only the code can tell; the
/// state machine judges such a notice again when the acceptance arrives.
///
/// A `4.x.x` code does not make a notice at 22 hours or later a warning:
/// the 24-hour notice closes the transaction whatever code the provider
/// writes (`4.4.7`, "delivery time expired", is a usual one).
pub fn timeout_is_final(
    errore_code: Option<&str>,
    notice_at: Timestamp,
    accepted_at: Option<Timestamp>,
) -> bool {
    errore_code.is_some_and(is_permanent_code)
        || accepted_at.is_some_and(|acc| notice_at.duration_since(acc) >= FINAL_TIMEOUT_AFTER)
}

/// True when no acceptance has come `limit` after the submission: at
/// `now >= submitted_at + limit`.
pub fn acceptance_overdue(submitted_at: Timestamp, now: Timestamp, limit: SignedDuration) -> bool {
    now.duration_since(submitted_at) >= limit
}

/// The recipients of an accepted dispatch that have neither a delivery nor
/// a failure `delivery_limit` after the acceptance (`pending` or `warned`
/// at `now >= accepted_at + delivery_limit`). External recipients are never
/// stale. Empty before the acceptance.
pub fn stale_recipients(d: &Dispatch, now: Timestamp, delivery_limit: SignedDuration) -> Vec<&str> {
    let Some(accepted_at) = d.accepted_at else {
        return Vec::new();
    };
    if now.duration_since(accepted_at) < delivery_limit {
        return Vec::new();
    }
    d.recipients
        .iter()
        .filter(|r| matches!(r.state, RecipientState::Pending | RecipientState::Warned))
        .map(|r| r.address.as_str())
        .collect()
}

/// May the grace rule send this dispatch again by itself? Only once per
/// dispatch: not when an earlier attempt was already left `uncertain`, and
/// never when a recipient receipt proves the letter was sent. (An operator
/// may still decide with `pecgate resolve`.)
pub fn may_resend_automatically(d: &Dispatch) -> bool {
    let earlier = d.attempts.len().saturating_sub(1);
    !d.has_recipient_receipts()
        && !d.attempts[..earlier]
            .iter()
            .any(|a| a.state == AttemptState::Uncertain)
}

/// True when an `uncertain` dispatch has waited `grace` since its attempt
/// became uncertain without an acceptance, and the grace rule may resend it
/// ([`may_resend_automatically`]): the timer then applies
/// [`super::state::Event::GraceResend`].
pub fn grace_expired(d: &Dispatch, now: Timestamp, grace: SignedDuration) -> bool {
    d.state == DispatchState::Uncertain
        && d.current_attempt().is_some_and(|a| {
            a.state == AttemptState::Uncertain && now.duration_since(a.changed_at) >= grace
        })
        && may_resend_automatically(d)
}

/// The configured deadlines (`[deadlines]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// No acceptance this long after submission → warning
    /// (`acceptance_minutes`).
    pub acceptance: SignedDuration,
    /// A certified recipient with neither delivery nor failure this long
    /// after the acceptance → stale (`delivery_hours`; 26 h by default, two
    /// hours past the provider's 24-hour notice).
    pub delivery: SignedDuration,
    /// An uncertain letter without an acceptance this long after it became
    /// uncertain may be resent once (`uncertain_grace_minutes`).
    pub uncertain_grace: SignedDuration,
}

/// Something a deadline says about a dispatch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "due", rename_all = "kebab-case")]
pub enum Due<'a> {
    /// Submitted, and no acceptance within [`Deadlines::acceptance`]
    /// (warning).
    AcceptanceOverdue {
        /// When the letter was submitted.
        submitted_at: Timestamp,
    },
    /// A recipient with neither delivery nor failure within
    /// [`Deadlines::delivery`] of the acceptance (warning; the flag
    /// "stale").
    Stale {
        /// The recipient, as written in the letter.
        address: &'a str,
    },
    /// An uncertain letter whose grace has expired: apply
    /// [`super::state::Event::GraceResend`].
    GraceExpired,
}

impl Deadlines {
    /// Everything that is due for `d` at `now`.
    pub fn due<'a>(&self, d: &'a Dispatch, now: Timestamp) -> Vec<Due<'a>> {
        let mut out = Vec::new();
        if d.state == DispatchState::Submitted
            && let Some(submitted_at) = d.submitted_at
            && acceptance_overdue(submitted_at, now, self.acceptance)
        {
            out.push(Due::AcceptanceOverdue { submitted_at });
        }
        out.extend(
            stale_recipients(d, now, self.delivery)
                .into_iter()
                .map(|address| Due::Stale { address }),
        );
        if grace_expired(d, now, self.uncertain_grace) {
            out.push(Due::GraceExpired);
        }
        out
    }

    /// When the next deadline of `d` falls (it may be in the past: then
    /// [`Deadlines::due`] reports it), or `None` when none applies. A timer
    /// sleeps until the earliest of these.
    pub fn next(&self, d: &Dispatch) -> Option<Timestamp> {
        match d.state {
            DispatchState::Submitted => d
                .submitted_at
                .and_then(|t| t.checked_add(self.acceptance).ok()),
            DispatchState::Uncertain if may_resend_automatically(d) => d
                .current_attempt()
                .filter(|a| a.state == AttemptState::Uncertain)
                .and_then(|a| a.changed_at.checked_add(self.uncertain_grace).ok()),
            s if s.is_accepted() => {
                let open = d
                    .recipients
                    .iter()
                    .any(|r| matches!(r.state, RecipientState::Pending | RecipientState::Warned));
                if open {
                    d.accepted_at
                        .and_then(|t| t.checked_add(self.delivery).ok())
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pec::kind::Kind;
    use crate::pec::state::{Event, Field, ReceiptFacts};

    const A: &str = "alfa@pec.example.it";
    const B: &str = "beta@pec.example.it";
    const X: &str = "info@example.com";

    fn at(mins: i64) -> Timestamp {
        "2025-03-01T08:00:00Z".parse::<Timestamp>().unwrap() + SignedDuration::from_mins(mins)
    }

    fn hours(h: i64) -> Timestamp {
        at(h * 60)
    }

    fn go(d: &Dispatch, ev: Event, now: Timestamp) -> Dispatch {
        d.apply(&ev, now).unwrap().dispatch
    }

    fn started(mid: &str) -> Event {
        Event::AttemptStarted {
            message_id: mid.into(),
        }
    }

    fn submitted_at(t: Timestamp) -> Dispatch {
        let d = Dispatch::new([(A, Field::To), (X, Field::To), (B, Field::Cc)]);
        go(&go(&d, started("<m1@gw>"), t), Event::Submitted, t)
    }

    fn accepted_at(t: Timestamp) -> Dispatch {
        let f = ReceiptFacts::new(Kind::Acceptance, "id@p", t)
            .with_destinatario(A, true)
            .with_destinatario(X, false)
            .with_destinatario(B, true);
        go(&submitted_at(t), Event::Receipt(f), t)
    }

    fn uncertain_at(t: Timestamp) -> Dispatch {
        let d = Dispatch::new([(A, Field::To)]);
        go(
            &go(&d, started("<m1@gw>"), t),
            Event::ConnectionLostAfterData,
            t,
        )
    }

    fn deadlines() -> Deadlines {
        Deadlines {
            acceptance: SignedDuration::from_mins(30),
            delivery: SignedDuration::from_hours(26),
            uncertain_grace: SignedDuration::from_mins(15),
        }
    }

    #[test]
    fn the_22_hours() {
        assert_eq!(FINAL_TIMEOUT_AFTER, SignedDuration::from_hours(22));
    }

    #[test]
    fn status_codes() {
        assert_eq!(leading_status_code("5.4.1 - ARUBA"), Some("5.4.1"));
        assert_eq!(leading_status_code("5.4.1"), Some("5.4.1"));
        assert_eq!(leading_status_code("5.7.100 x"), Some("5.7.100"));
        assert_eq!(leading_status_code("5.1.1. fine"), Some("5.1.1"));
        assert_eq!(leading_status_code("  4.4.7"), Some("4.4.7"));
        assert_eq!(leading_status_code("5.1.1000"), None);
        assert_eq!(leading_status_code("5.1.1.2"), None);
        assert_eq!(leading_status_code("55.1.1"), None);
        assert_eq!(leading_status_code("3.1.1"), None);
        assert_eq!(leading_status_code("5.1"), None);
        assert_eq!(leading_status_code("5..1"), None);
        assert_eq!(leading_status_code(""), None);
        assert_eq!(leading_status_code("tempo massimo superato"), None);
        assert!(is_permanent_code("5.4.1"));
        assert!(is_permanent_code("5.4.1 - tempo massimo"));
        assert!(!is_permanent_code("4.4.7"));
        assert!(!is_permanent_code("5"));
        assert!(!is_permanent_code("boh"));
    }

    #[test]
    fn timeout_finality() {
        let acc = Some(hours(0));
        // A permanent code is final at any time, even without acceptance.
        assert!(timeout_is_final(Some("5.4.1"), hours(1), acc));
        assert!(timeout_is_final(Some("5.4.1"), hours(1), None));
        // Without a code: the time since the acceptance decides.
        assert!(!timeout_is_final(None, hours(12), acc));
        assert!(!timeout_is_final(None, hours(21), acc));
        assert!(!timeout_is_final(
            None,
            hours(22) - SignedDuration::from_secs(1),
            acc
        ));
        assert!(timeout_is_final(None, hours(22), acc));
        assert!(timeout_is_final(None, hours(23), acc));
        assert!(!timeout_is_final(None, hours(23), None));
        // A transient code does not make a late notice a warning.
        assert!(!timeout_is_final(Some("4.4.7"), hours(12), acc));
        assert!(timeout_is_final(Some("4.4.7"), hours(24), acc));
        // A notice dated before the acceptance (clock skew) is a warning.
        assert!(!timeout_is_final(None, hours(-1), acc));
    }

    #[test]
    fn acceptance_deadline() {
        let limit = SignedDuration::from_mins(30);
        assert!(!acceptance_overdue(at(0), at(29), limit));
        assert!(acceptance_overdue(at(0), at(30), limit));
        assert!(acceptance_overdue(at(0), at(90), limit));
        assert!(!acceptance_overdue(at(0), at(-5), limit));
    }

    #[test]
    fn stale_recipients_after_the_delivery_limit() {
        let limit = SignedDuration::from_hours(26);
        let d = accepted_at(hours(0));
        assert!(stale_recipients(&d, hours(25), limit).is_empty());
        assert_eq!(stale_recipients(&d, hours(26), limit), [A, B]);
        // Delivered and failed recipients are not stale; warned ones are;
        // the external one never is.
        let timeout = ReceiptFacts::new(Kind::DeliveryTimeout, "id@p", hours(12)).with_recipient(B);
        let d = go(&d, Event::Receipt(timeout), hours(12));
        assert_eq!(stale_recipients(&d, hours(27), limit), [A, B]);
        let failed = ReceiptFacts::new(Kind::DeliveryError, "id@p", hours(27)).with_recipient(A);
        let d = go(&d, Event::Receipt(failed), hours(27));
        assert_eq!(stale_recipients(&d, hours(27), limit), [B]);
        let delivered = ReceiptFacts::new(Kind::Delivery, "id@p", hours(27)).with_recipient(B);
        let d = go(&d, Event::Receipt(delivered), hours(27));
        assert!(stale_recipients(&d, hours(28), limit).is_empty());
        // Nothing is stale before the acceptance.
        assert!(stale_recipients(&submitted_at(hours(0)), hours(100), limit).is_empty());
    }

    #[test]
    fn automatic_resend_only_once() {
        let d = uncertain_at(at(0));
        assert!(may_resend_automatically(&d));
        let grace = SignedDuration::from_mins(15);
        assert!(!grace_expired(&d, at(14), grace));
        assert!(grace_expired(&d, at(15), grace));
        let d = go(&d, Event::GraceResend, at(15));
        assert!(!grace_expired(&d, at(60), grace)); // queued
        let d = go(
            &go(&d, started("<m2@gw>"), at(16)),
            Event::FoundSendingAtStartup,
            at(20),
        );
        assert!(!may_resend_automatically(&d));
        assert!(!grace_expired(&d, at(600), grace));
        // A recipient receipt proves sending.
        let mut d = uncertain_at(at(0));
        d.recipients[0].state = RecipientState::Warned;
        assert!(!may_resend_automatically(&d));
        // No attempts at all: nothing to judge, nothing forbidden.
        assert!(may_resend_automatically(&Dispatch::new([(A, Field::To)])));
    }

    #[test]
    fn deadlines_due() {
        let dl = deadlines();
        let d = submitted_at(at(0));
        assert_eq!(dl.next(&d), Some(at(30)));
        assert!(dl.due(&d, at(29)).is_empty());
        assert_eq!(
            dl.due(&d, at(30)),
            [Due::AcceptanceOverdue {
                submitted_at: at(0)
            }]
        );
        let d = accepted_at(at(10));
        assert!(dl.due(&d, at(60)).is_empty());
        assert_eq!(dl.next(&d), Some(at(10) + SignedDuration::from_hours(26)));
        assert_eq!(
            dl.due(&d, at(10) + SignedDuration::from_hours(26)),
            [Due::Stale { address: A }, Due::Stale { address: B }]
        );
        let d = uncertain_at(at(0));
        assert_eq!(dl.next(&d), Some(at(15)));
        assert_eq!(dl.due(&d, at(15)), [Due::GraceExpired]);
        // Nothing pending: no deadline.
        let d = Dispatch::new([(A, Field::To)]);
        assert_eq!(dl.next(&d), None);
        assert!(dl.due(&d, at(1000)).is_empty());
        let v = serde_json::to_value(Due::Stale { address: A }).unwrap();
        assert_eq!(v, serde_json::json!({"due": "stale", "address": A}));
    }

    #[test]
    fn deadlines_after_everything_is_final() {
        let dl = deadlines();
        let mut d = accepted_at(at(0));
        for r in ["alfa@pec.example.it", "beta@pec.example.it"] {
            let f = ReceiptFacts::new(Kind::Delivery, "id@p", hours(1)).with_recipient(r);
            d = go(&d, Event::Receipt(f), hours(1));
        }
        assert_eq!(d.state, DispatchState::Delivered);
        assert_eq!(dl.next(&d), None);
        assert!(dl.due(&d, hours(100)).is_empty());
    }
}
