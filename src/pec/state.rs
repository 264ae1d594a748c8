//! The sender-side state machine of a dispatch: one letter, its SMTP
//! attempts and its recipients (SPEC.md §2.10, §2.7; DESIGN.md "Names that
//! several parts share").
//!
//! A [`Dispatch`] is a plain value. [`Dispatch::apply`] takes an [`Event`]
//! (an SMTP outcome, a receipt, an operator's decision, a timer's decision)
//! and the current time, and returns either an [`Outcome`] (the new value and
//! the list of [`Change`]s to write to the append-only event log) or a
//! [`Rejected`] that says why the event is impossible. It never panics, never
//! reads the clock and does no I/O; the caller (ingest, smtp, the timer, the
//! CLI) stores the new value and the changes in one transaction.
//!
//! Rules that hold for every event (`docs/state-machine.md` has the tables):
//!
//! * **Total.** Every event in every state gives an `Outcome` or a
//!   `Rejected`; nothing is silently dropped. An event that changes nothing
//!   gives exactly one [`Change::Duplicate`] or [`Change::Ignored`].
//! * **Idempotent.** Applying the same event twice gives no change the
//!   second time (or a `Rejected` for SMTP and operator events that only
//!   make sense once).
//! * **Signed evidence wins, whatever the order.** A provider's receipt
//!   outweighs what pecgate inferred from SMTP, and an acceptance outweighs
//!   a non-acceptance; a delivery receipt outweighs a failure or a time-out
//!   notice. Contradictions are kept as conflicts (a flag plus a
//!   [`Change::Conflict`]), never thrown away.
//! * **Aggregated.** Once accepted, the dispatch state is
//!   [`aggregate`] of its recipients, recomputed after every receipt.
//!
//! Recipient addresses compare case-insensitively
//! ([`same_address`]); Message-IDs compare after
//! [`normalize_message_id`].

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::daticert::Daticert;
use super::ids::{normalize_message_id, same_address};
use super::kind::Kind;
use super::policy;
use super::wire;

// ---------------------------------------------------------------------------
// Names

/// A name (`as_str`) that [`FromStr`] did not recognise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} \"{value}\"")]
pub struct UnknownName {
    /// What was being parsed (`dispatch state`, `recipient field`, ...).
    pub what: &'static str,
    /// The value as given.
    pub value: String,
}

/// Declares a fieldless enum whose values have fixed names: `as_str`,
/// `ALL`, `Display`, `FromStr` (trimmed, case-insensitive) and serde as the
/// names.
macro_rules! named {
    (
        $(#[$meta:meta])*
        pub enum $name:ident as $what:literal {
            $($(#[$vmeta:meta])* $variant:ident => $text:expr,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The name of this value, exactly as stored, logged and shown.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let t = s.trim();
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str().eq_ignore_ascii_case(t))
                    .ok_or_else(|| UnknownName { what: $what, value: s.to_owned() })
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

named! {
    /// The state of a dispatch (a letter as a whole).
    ///
    /// `queued` → `sending` → `submitted` → `accepted` → `delivered` /
    /// `partially-delivered` / `failed`; `uncertain`, `not-accepted` and
    /// `refused` on the way. See `docs/state-machine.md`.
    pub enum DispatchState as "dispatch state" {
        /// Waiting for an SMTP attempt (new, after a 4xx, or to be resent).
        Queued => "queued",
        /// An SMTP attempt is committed with its Message-ID and in progress.
        Sending => "sending",
        /// The provider answered 250 to DATA; no acceptance yet.
        Submitted => "submitted",
        /// Nobody knows whether the provider got the letter (crash while
        /// sending, connection lost after DATA). Never resent blindly.
        Uncertain => "uncertain",
        /// Ricevuta di accettazione received: legally sent. Final when every
        /// recipient is external; otherwise waiting for recipient receipts.
        Accepted => "accepted",
        /// Avviso di non accettazione: the provider refused the letter.
        #[doc(alias = "non-accettazione")]
        NotAccepted => "not-accepted",
        /// SMTP 5xx at submission (no signed notice).
        Refused => "refused",
        /// Every certified recipient has a delivery receipt.
        Delivered => "delivered",
        /// A final mix of delivered and failed / timed-out recipients.
        PartiallyDelivered => "partially-delivered",
        /// Every certified recipient failed or timed out.
        Failed => "failed",
    }
}

impl DispatchState {
    /// True for the states where no further event is expected:
    /// `not-accepted`, `refused`, `delivered`, `partially-delivered`,
    /// `failed`.
    ///
    /// `accepted` is final only when every recipient is external, which
    /// this state alone cannot tell: see [`Dispatch::is_final`]. "Final"
    /// means "nothing more is expected", not "immutable": a late delivery
    /// receipt still turns `failed` into `partially-delivered` (with a
    /// conflict recorded).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            DispatchState::NotAccepted
                | DispatchState::Refused
                | DispatchState::Delivered
                | DispatchState::PartiallyDelivered
                | DispatchState::Failed
        )
    }

    /// True for the states that follow an acceptance (`accepted`,
    /// `delivered`, `partially-delivered`, `failed`): the ones [`aggregate`]
    /// computes from the recipients.
    pub fn is_accepted(self) -> bool {
        matches!(
            self,
            DispatchState::Accepted
                | DispatchState::Delivered
                | DispatchState::PartiallyDelivered
                | DispatchState::Failed
        )
    }
}

named! {
    /// The state of one recipient of a dispatch.
    pub enum RecipientState as "recipient state" {
        /// A certified (or not yet classified) recipient with no final
        /// receipt yet.
        Pending => "pending",
        /// Ricevuta di avvenuta consegna received (terminal success).
        #[doc(alias = "avvenuta-consegna")]
        Delivered => "delivered",
        /// A non-final time-out notice (the 12-hour preavviso); delivery can
        /// still happen.
        Warned => "warned",
        /// Avviso di mancata consegna (errore-consegna, also for a virus).
        #[doc(alias = "errore-consegna")]
        Failed => "failed",
        /// A final time-out notice (5.x.x code, or 22 hours after the
        /// acceptance).
        TimedOut => "timed-out",
        /// An ordinary (non-PEC) address, `esterno` in the acceptance: no
        /// receipt will ever come.
        External => "external",
    }
}

impl RecipientState {
    /// True for `delivered`, `failed`, `timed-out` and `external`. As with
    /// dispatches, a late delivery receipt still turns `timed-out` or
    /// `failed` into `delivered` (with a conflict).
    pub fn is_final(self) -> bool {
        !matches!(self, RecipientState::Pending | RecipientState::Warned)
    }
}

named! {
    /// Where a recipient appears in the letter.
    pub enum Field as "recipient field" {
        /// A primary recipient.
        To => "to",
        /// A carbon-copy recipient.
        Cc => "cc",
    }
}

named! {
    /// The state of one SMTP attempt (one Message-ID).
    pub enum AttemptState as "attempt state" {
        /// Committed with its Message-ID before the SMTP transaction.
        Sending => "sending",
        /// 250 after DATA (or proven by a receipt, or marked by an operator).
        Submitted => "submitted",
        /// Found `sending` after a crash, or the connection broke after DATA.
        Uncertain => "uncertain",
        /// 5xx: the provider refused the letter.
        Refused => "refused",
        /// 4xx or a connection failure before DATA: will be retried with a
        /// new attempt.
        FailedTransient => "failed-transient",
    }
}

impl AttemptState {
    /// True for `submitted`, `refused` and `failed-transient`.
    pub fn is_final(self) -> bool {
        !matches!(self, AttemptState::Sending | AttemptState::Uncertain)
    }
}

named! {
    /// Why a change happened: the event that caused it. Receipts use their
    /// wire names (`avvenuta-consegna`, ...).
    pub enum Cause as "cause" {
        /// [`Event::AttemptStarted`].
        AttemptStarted => "attempt-started",
        /// [`Event::Submitted`].
        Submitted => "smtp-submitted",
        /// [`Event::TransientFailure`].
        TransientFailure => "smtp-transient-failure",
        /// [`Event::Refused`].
        Refused => "smtp-refused",
        /// [`Event::ConnectionLostAfterData`].
        ConnectionLostAfterData => "connection-lost-after-data",
        /// [`Event::FoundSendingAtStartup`].
        FoundSendingAtStartup => "found-sending-at-startup",
        /// A ricevuta di accettazione.
        Acceptance => wire::ACCETTAZIONE,
        /// An avviso di non accettazione.
        NonAcceptance => wire::NON_ACCETTAZIONE,
        /// A ricevuta di presa in carico (ignored).
        TakenInCharge => wire::PRESA_IN_CARICO,
        /// A ricevuta di avvenuta consegna.
        Delivery => wire::AVVENUTA_CONSEGNA,
        /// An avviso di mancata consegna.
        DeliveryError => wire::ERRORE_CONSEGNA,
        /// An avviso di mancata consegna per superamento tempi massimi.
        DeliveryTimeout => wire::PREAVVISO_ERRORE_CONSEGNA,
        /// An avviso di rilevazione virus.
        VirusDetected => wire::RILEVAZIONE_VIRUS,
        /// A receipt of a kind that is not a receipt for the sender.
        OtherMessage => "other-message",
        /// [`Event::GraceResend`].
        GraceResend => "grace-resend",
        /// [`Event::ResolveResend`].
        ResolveResend => "resolve-resend",
        /// [`Event::ResolveMarkSent`].
        ResolveMarkSent => "resolve-mark-sent",
        /// [`Event::AttemptRecovered`].
        AttemptRecovered => "attempt-recovered",
    }
}

impl Cause {
    fn of_kind(kind: &Kind) -> Cause {
        match kind {
            Kind::Acceptance => Cause::Acceptance,
            Kind::NonAcceptance => Cause::NonAcceptance,
            Kind::TakenInCharge => Cause::TakenInCharge,
            Kind::Delivery => Cause::Delivery,
            Kind::DeliveryError => Cause::DeliveryError,
            Kind::DeliveryTimeout => Cause::DeliveryTimeout,
            Kind::VirusDetected => Cause::VirusDetected,
            Kind::Transport | Kind::Anomaly | Kind::NotPec | Kind::Unknown(_) => {
                Cause::OtherMessage
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Events

/// Something that can happen to a dispatch.
// Events are short-lived values handed to `apply`, never stored in bulk:
// the size of `Receipt` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The SMTP edge committed a new attempt with this Message-ID
    /// (`queued` → `sending`). Every attempt has its own Message-ID.
    AttemptStarted {
        /// The Message-ID of the letter as sent (with or without angle
        /// brackets).
        message_id: String,
    },
    /// The provider answered 250 to DATA (`sending` → `submitted`).
    Submitted,
    /// A 4xx reply, or a connection failure before DATA: the attempt is
    /// `failed-transient` and the dispatch goes back to `queued`.
    TransientFailure {
        /// The SMTP reply (or error) as text.
        reply: String,
    },
    /// A 5xx reply: the dispatch is `refused` (final).
    Refused {
        /// The SMTP reply as text.
        reply: String,
    },
    /// The connection broke after DATA was sent, before the reply: the
    /// provider may or may not have the letter (`uncertain`).
    ConnectionLostAfterData,
    /// At start-up the attempt was found `sending` (the daemon stopped in
    /// the middle): `uncertain`.
    FoundSendingAtStartup,
    /// A receipt or notice from the provider, already matched to this
    /// dispatch and verified.
    Receipt(ReceiptFacts),
    /// The timer's grace rule decided that an `uncertain` letter is to be
    /// sent again (with a new Message-ID): `uncertain` → `queued`. Allowed
    /// once per dispatch; see [`policy::may_resend_automatically`].
    GraceResend,
    /// An operator decided to send an `uncertain` letter again
    /// (`pecgate resolve --resend`): `uncertain` → `queued`.
    ResolveResend,
    /// An operator declared an `uncertain` letter sent
    /// (`pecgate resolve --mark-sent`): `uncertain` → `submitted`.
    ResolveMarkSent,
    /// A signed receipt names, in its daticert `msgid`, an attempt of this
    /// letter that the store does not know (it was lost by a restore from
    /// backup, or by a reindex from an outdated `dispatch.json`): the
    /// attempt is recorded as `submitted` (the provider signed that it has
    /// it) and a `queued` or `uncertain` letter becomes `submitted`, so that
    /// it is not sent again. The receipt itself is applied afterwards.
    AttemptRecovered {
        /// The Message-ID the receipt names.
        message_id: String,
    },
}

impl Event {
    /// The cause recorded on the changes this event makes.
    pub fn cause(&self) -> Cause {
        match self {
            Event::AttemptStarted { .. } => Cause::AttemptStarted,
            Event::Submitted => Cause::Submitted,
            Event::TransientFailure { .. } => Cause::TransientFailure,
            Event::Refused { .. } => Cause::Refused,
            Event::ConnectionLostAfterData => Cause::ConnectionLostAfterData,
            Event::FoundSendingAtStartup => Cause::FoundSendingAtStartup,
            Event::Receipt(f) => Cause::of_kind(&f.kind),
            Event::GraceResend => Cause::GraceResend,
            Event::ResolveResend => Cause::ResolveResend,
            Event::ResolveMarkSent => Cause::ResolveMarkSent,
            Event::AttemptRecovered { .. } => Cause::AttemptRecovered,
        }
    }
}

/// What the state machine needs from a receipt: its kind and the fields of
/// its (signed) `daticert.xml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptFacts {
    /// The PEC kind (accettazione, avvenuta-consegna, ...).
    pub kind: Kind,
    /// `consegna`: the recipient a per-recipient receipt is about.
    pub recipient: Option<String>,
    /// `identificativo`: the PEC id of the transport envelope.
    pub identificativo: String,
    /// `msgid`: the Message-ID of the attempt this receipt is about
    /// (normalised); tells which attempt reached the provider.
    pub msgid: Option<String>,
    /// The daticert time (`data`), the provider's legal time of the event.
    pub at: Timestamp,
    /// `postacert@errore` (`nessuno`, `no-dest`, `no-dominio`, `virus`,
    /// `altro`).
    pub errore: String,
    /// `errore-esteso`, the provider's short description.
    pub errore_esteso: Option<String>,
    /// The enhanced status code `errore_esteso` starts with (`5.4.1`).
    pub errore_code: Option<String>,
    /// A virus notice (`X-VerificaSicurezza: errore`, or `errore="virus"`).
    pub virus: bool,
    /// Every `destinatari`: the address and whether it is certified
    /// (`tipo="certificato"`) rather than external (`esterno`).
    pub destinatari: Vec<(String, bool)>,
    /// Why a non-acceptance happened, in words.
    pub reason: Option<String>,
}

impl ReceiptFacts {
    /// Facts with only a kind, an identificativo and a time; the rest empty
    /// (`errore` is `nessuno`). Use the `with_*` methods to fill them in.
    pub fn new(kind: Kind, identificativo: impl Into<String>, at: Timestamp) -> ReceiptFacts {
        ReceiptFacts {
            kind,
            recipient: None,
            identificativo: identificativo.into(),
            msgid: None,
            at,
            errore: wire::ERRORE_NESSUNO.to_owned(),
            errore_esteso: None,
            errore_code: None,
            virus: false,
            destinatari: Vec::new(),
            reason: None,
        }
    }

    /// Takes the facts from a parsed `daticert.xml` and the kind the
    /// classification gave. `virus` is the `X-VerificaSicurezza: errore`
    /// header; `errore="virus"` in the daticert also sets it. The reason of
    /// a non-acceptance is `errore-esteso`, else `errore` when it is not
    /// `nessuno`.
    pub fn from_daticert(kind: Kind, d: &Daticert, virus: bool) -> ReceiptFacts {
        let errore_set =
            !d.errore.is_empty() && !d.errore.eq_ignore_ascii_case(wire::ERRORE_NESSUNO);
        let reason = if kind == Kind::NonAcceptance {
            d.errore_esteso
                .clone()
                .or_else(|| errore_set.then(|| d.errore.clone()))
        } else {
            None
        };
        ReceiptFacts {
            recipient: d.consegna.clone(),
            identificativo: d.identificativo.clone(),
            msgid: d.msgid.clone(),
            at: d.data,
            errore: d.errore.clone(),
            errore_esteso: d.errore_esteso.clone(),
            errore_code: d.errore_code.clone(),
            virus: virus || d.errore.eq_ignore_ascii_case(wire::ERRORE_VIRUS),
            destinatari: d
                .destinatari
                .iter()
                .map(|x| (x.address.clone(), x.is_certified()))
                .collect(),
            reason,
            kind,
        }
    }

    /// Sets the recipient (`consegna`).
    pub fn with_recipient(mut self, address: impl Into<String>) -> ReceiptFacts {
        self.recipient = Some(address.into());
        self
    }

    /// Sets the Message-ID of the attempt (`msgid`).
    pub fn with_msgid(mut self, msgid: impl Into<String>) -> ReceiptFacts {
        self.msgid = Some(msgid.into());
        self
    }

    /// Sets `errore` and `errore-esteso`; the status code is taken from the
    /// start of `errore-esteso` when it has one.
    pub fn with_error(mut self, errore: impl Into<String>, esteso: Option<&str>) -> ReceiptFacts {
        self.errore = errore.into();
        self.errore_esteso = esteso.map(str::to_owned);
        self.errore_code = esteso
            .and_then(policy::leading_status_code)
            .map(str::to_owned);
        self
    }

    /// Marks the receipt as a virus notice.
    pub fn with_virus(mut self) -> ReceiptFacts {
        self.virus = true;
        self
    }

    /// Adds a `destinatari` entry.
    pub fn with_destinatario(
        mut self,
        address: impl Into<String>,
        certified: bool,
    ) -> ReceiptFacts {
        self.destinatari.push((address.into(), certified));
        self
    }

    /// Sets the reason of a non-acceptance.
    pub fn with_reason(mut self, reason: impl Into<String>) -> ReceiptFacts {
        self.reason = Some(reason.into());
        self
    }

    /// The status code: `errore_code`, else the one `errore_esteso` starts
    /// with.
    fn code(&self) -> Option<&str> {
        self.errore_code.as_deref().or_else(|| {
            self.errore_esteso
                .as_deref()
                .and_then(policy::leading_status_code)
        })
    }
}

// ---------------------------------------------------------------------------
// The dispatch

/// One SMTP attempt to submit the letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attempt {
    /// The Message-ID of this attempt, as committed; a resend gets a new one.
    pub message_id: String,
    /// Where the attempt stands.
    pub state: AttemptState,
    /// When it was committed as `sending`.
    pub started_at: Timestamp,
    /// When its state last changed (the grace rule counts from the moment
    /// it became `uncertain`).
    pub changed_at: Timestamp,
    /// The SMTP reply of a failed attempt, kept for the operator.
    pub reply: Option<String>,
}

/// One recipient of a dispatch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recipient {
    /// The address as written in the letter.
    pub address: String,
    /// To or Cc.
    pub field: Field,
    /// From the acceptance: `Some(true)` certified, `Some(false)` external;
    /// `None` before the acceptance (or when the acceptance does not list
    /// the address).
    pub certified: Option<bool>,
    /// Where this recipient stands.
    pub state: RecipientState,
    /// The daticert time of the receipt that last set `state`; needed to
    /// re-judge a time-out notice read before the acceptance.
    pub at: Option<Timestamp>,
    /// For the clerk: the error of a failure or time-out, or the
    /// description of the latest conflict.
    pub detail: Option<String>,
    /// Receipts contradicted each other (e.g. a delivery after a final
    /// time-out); `detail` says how.
    pub conflict: bool,
}

impl Recipient {
    /// A recipient that has not been classified yet (`pending`).
    pub fn new(address: impl Into<String>, field: Field) -> Recipient {
        Recipient {
            address: address.into(),
            field,
            certified: None,
            state: RecipientState::Pending,
            at: None,
            detail: None,
            conflict: false,
        }
    }

    /// True when a receipt about this recipient has arrived (which proves
    /// the letter reached the provider).
    fn has_receipt(&self) -> bool {
        matches!(
            self.state,
            RecipientState::Delivered
                | RecipientState::Warned
                | RecipientState::Failed
                | RecipientState::TimedOut
        )
    }
}

/// A letter and everything known about its delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dispatch {
    /// The state of the letter as a whole.
    pub state: DispatchState,
    /// Every SMTP attempt, oldest first; the last one is the current one.
    pub attempts: Vec<Attempt>,
    /// When the provider last answered 250 (or an operator marked the letter
    /// sent, or a receipt proved it): the acceptance deadline counts from
    /// here.
    pub submitted_at: Option<Timestamp>,
    /// The daticert time of the acceptance: the legal time of sending.
    pub accepted_at: Option<Timestamp>,
    /// The PEC identificativo from the acceptance.
    pub identificativo: Option<String>,
    /// Why the letter was not accepted (non-acceptance reason) or refused
    /// (the SMTP reply).
    pub reason: Option<String>,
    /// The latest contradiction at the letter level (e.g. a non-acceptance
    /// after the acceptance, two acceptances with different identificativi).
    pub conflict: Option<String>,
    /// The recipients, in the letter's order (To then Cc as written).
    pub recipients: Vec<Recipient>,
}

/// The result of applying an event: the new dispatch and what changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The dispatch after the event.
    pub dispatch: Dispatch,
    /// Every change, in order, for the event log; never empty (an event
    /// that changes nothing gives one [`Change::Duplicate`] or
    /// [`Change::Ignored`]).
    pub changes: Vec<Change>,
}

impl Outcome {
    /// True when the event changed nothing.
    pub fn is_noop(&self) -> bool {
        self.changes.iter().all(Change::is_noop)
    }
}

/// One change made by an event, for the append-only event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "kebab-case")]
pub enum Change {
    /// The dispatch state changed.
    DispatchChanged {
        /// The state before.
        from: DispatchState,
        /// The state after.
        to: DispatchState,
        /// The event that caused it.
        cause: Cause,
    },
    /// A recipient's state changed.
    RecipientChanged {
        /// The recipient, as written in the letter.
        address: String,
        /// The state before.
        from: RecipientState,
        /// The state after.
        to: RecipientState,
        /// The event that caused it.
        cause: Cause,
    },
    /// An attempt was created (`from` is `None`) or its state changed.
    AttemptChanged {
        /// The attempt's Message-ID.
        message_id: String,
        /// The state before; `None` for a new attempt.
        from: Option<AttemptState>,
        /// The state after.
        to: AttemptState,
        /// The event that caused it.
        cause: Cause,
    },
    /// Evidence contradicts what was known; the rule that decided is in
    /// `detail`.
    Conflict {
        /// The recipient concerned; `None` for the letter as a whole.
        address: Option<String>,
        /// What contradicts what, and what was kept.
        detail: String,
        /// The event that revealed it.
        cause: Cause,
    },
    /// The event was already applied: nothing changed.
    Duplicate {
        /// The event.
        cause: Cause,
        /// The recipient concerned, for per-recipient receipts.
        address: Option<String>,
    },
    /// The event carries nothing new given the current state (e.g. a
    /// 12-hour warning read after the delivery receipt): nothing changed.
    Ignored {
        /// The event.
        cause: Cause,
        /// The recipient concerned, for per-recipient receipts.
        address: Option<String>,
        /// Why it carries nothing new.
        reason: String,
    },
}

impl Change {
    /// True for [`Change::Duplicate`] and [`Change::Ignored`].
    pub fn is_noop(&self) -> bool {
        matches!(self, Change::Duplicate { .. } | Change::Ignored { .. })
    }
}

/// Why an event cannot be applied to a dispatch. Data for the caller to log
/// (and, for operator commands, to show); the dispatch is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejected {
    /// The event makes no sense in this state (e.g. `smtp-submitted` while
    /// `queued`, `resolve-resend` while `accepted`).
    #[error("{cause}: not possible while the dispatch is {state}")]
    WrongState {
        /// The event.
        cause: Cause,
        /// The dispatch state.
        state: DispatchState,
    },
    /// An SMTP outcome arrived but no attempt is `sending`.
    #[error("{cause}: no attempt is in progress (last attempt: {})", last.map_or("none", AttemptState::as_str))]
    NoAttemptInProgress {
        /// The event.
        cause: Cause,
        /// The state of the last attempt, if any.
        last: Option<AttemptState>,
    },
    /// A new attempt must have a Message-ID.
    #[error("attempt-started: empty message-id")]
    EmptyMessageId,
    /// A new attempt reuses the Message-ID of an earlier one.
    #[error("attempt-started: message-id {0} was already used by an earlier attempt")]
    MessageIdReused(String),
    /// A receipt arrived for a letter that was never submitted.
    #[error("{0}: the letter was never submitted")]
    NeverSent(Cause),
    /// The message is not a receipt for the sender (a transport envelope,
    /// an anomaly, ordinary mail, an unknown kind).
    #[error("{kind}: not a receipt for the sender")]
    NotAReceipt {
        /// The kind, as named by [`Kind::as_str`] (or the raw unknown value).
        kind: String,
    },
    /// A per-recipient receipt without `consegna`.
    #[error("{0}: no recipient (consegna) named")]
    MissingRecipient(Cause),
    /// A per-recipient receipt naming an address that is not in the letter.
    #[error("{cause}: {address} is not a recipient of this letter")]
    UnknownRecipient {
        /// The receipt.
        cause: Cause,
        /// The address it names.
        address: String,
    },
    /// A resend was asked for, but a receipt proves the letter was sent.
    #[error("{0}: a receipt shows the letter was already sent")]
    AlreadySent(Cause),
    /// The grace rule may resend a letter only once; an operator decides
    /// after that.
    #[error("grace-resend: the automatic resend was already used; an operator must resolve")]
    AutomaticResendUsed,
}

impl Dispatch {
    /// A new letter, `queued`, with its recipients `pending`.
    ///
    /// Duplicate addresses should not happen (the outbox refuses them); if
    /// they do, receipts apply to the first one.
    pub fn new<A: Into<String>>(recipients: impl IntoIterator<Item = (A, Field)>) -> Dispatch {
        Dispatch {
            state: DispatchState::Queued,
            attempts: Vec::new(),
            submitted_at: None,
            accepted_at: None,
            identificativo: None,
            reason: None,
            conflict: None,
            recipients: recipients
                .into_iter()
                .map(|(a, f)| Recipient::new(a, f))
                .collect(),
        }
    }

    /// The recipient with this address (compared case-insensitively).
    pub fn recipient(&self, address: &str) -> Option<&Recipient> {
        self.recipients
            .iter()
            .find(|r| same_address(&r.address, address))
    }

    /// The current (last) attempt.
    pub fn current_attempt(&self) -> Option<&Attempt> {
        self.attempts.last()
    }

    /// True when nothing more is expected: a final state, or `accepted`
    /// with only external recipients.
    pub fn is_final(&self) -> bool {
        self.state.is_final()
            || (self.state == DispatchState::Accepted
                && self
                    .recipients
                    .iter()
                    .all(|r| r.state == RecipientState::External))
    }

    /// True when a per-recipient receipt has arrived, which proves the
    /// letter reached the provider even if its acceptance has not been read.
    pub fn has_recipient_receipts(&self) -> bool {
        self.recipients.iter().any(Recipient::has_receipt)
    }

    /// Applies an event at time `now` (used for attempt times and
    /// `submitted_at`; receipts carry their own daticert time).
    ///
    /// # Errors
    ///
    /// [`Rejected`] when the event is impossible for this dispatch; see its
    /// variants. The dispatch is then unchanged.
    pub fn apply(&self, event: &Event, now: Timestamp) -> Result<Outcome, Rejected> {
        let cause = event.cause();
        let mut s = Step {
            d: self.clone(),
            changes: Vec::new(),
            cause,
        };
        match event {
            Event::AttemptStarted { message_id } => s.attempt_started(message_id, now)?,
            Event::Submitted => s.smtp_outcome(AttemptState::Submitted, None, now)?,
            Event::TransientFailure { reply } => {
                s.smtp_outcome(AttemptState::FailedTransient, Some(reply), now)?;
            }
            Event::Refused { reply } => s.smtp_outcome(AttemptState::Refused, Some(reply), now)?,
            Event::ConnectionLostAfterData | Event::FoundSendingAtStartup => {
                s.smtp_outcome(AttemptState::Uncertain, None, now)?;
            }
            Event::Receipt(facts) => s.receipt(facts, now)?,
            Event::GraceResend => s.resend(true)?,
            Event::ResolveResend => s.resend(false)?,
            Event::ResolveMarkSent => s.mark_sent(now)?,
            Event::AttemptRecovered { message_id } => s.attempt_recovered(message_id, now)?,
        }
        if s.changes.is_empty() {
            let address = match event {
                Event::Receipt(f) => f.recipient.clone(),
                _ => None,
            };
            s.changes.push(Change::Duplicate { cause, address });
        }
        Ok(Outcome {
            dispatch: s.d,
            changes: s.changes,
        })
    }
}

/// The dispatch state implied by the recipients, for a dispatch that has
/// been accepted; any other dispatch keeps its state.
///
/// External recipients do not count. Among the others (certified, or never
/// classified): any `pending` or `warned` → `accepted`; all `delivered` →
/// `delivered`; all `failed` or `timed-out` → `failed`; a mix of those →
/// `partially-delivered`; none at all (only external recipients) →
/// `accepted`, which is then final ([`Dispatch::is_final`]).
pub fn aggregate(d: &Dispatch) -> DispatchState {
    if !d.state.is_accepted() {
        return d.state;
    }
    let (mut open, mut delivered, mut failed) = (false, false, false);
    for r in &d.recipients {
        match r.state {
            RecipientState::External => {}
            RecipientState::Pending | RecipientState::Warned => open = true,
            RecipientState::Delivered => delivered = true,
            RecipientState::Failed | RecipientState::TimedOut => failed = true,
        }
    }
    match (open, delivered, failed) {
        (true, _, _) | (false, false, false) => DispatchState::Accepted,
        (false, true, false) => DispatchState::Delivered,
        (false, false, true) => DispatchState::Failed,
        (false, true, true) => DispatchState::PartiallyDelivered,
    }
}

// ---------------------------------------------------------------------------
// The transitions

/// One application of an event: the dispatch being changed and the changes
/// recorded so far.
struct Step {
    d: Dispatch,
    changes: Vec<Change>,
    cause: Cause,
}

/// What a per-recipient receipt does to a recipient.
enum RecipientStep {
    /// Move to a state; with a conflict description when it contradicts
    /// earlier evidence.
    To(RecipientState, Option<String>, Option<String>),
    /// Keep the state, record a conflict.
    Conflict(String),
    /// Already in the state the receipt leads to.
    Duplicate,
    /// Nothing new, for the reason given.
    Ignored(&'static str),
}

fn same_message_id(a: &str, b: &str) -> bool {
    match (normalize_message_id(a), normalize_message_id(b)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

fn same_identificativo(a: &str, b: &str) -> bool {
    same_message_id(a, b)
}

impl Step {
    fn set_state(&mut self, to: DispatchState) {
        let from = self.d.state;
        if from != to {
            self.d.state = to;
            self.changes.push(Change::DispatchChanged {
                from,
                to,
                cause: self.cause,
            });
        }
    }

    /// Recomputes an accepted dispatch's state from its recipients.
    fn reaggregate(&mut self) {
        let to = aggregate(&self.d);
        self.set_state(to);
    }

    fn set_recipient(&mut self, i: usize, to: RecipientState, at: Option<Timestamp>) {
        let r = &mut self.d.recipients[i];
        let from = r.state;
        if from != to {
            r.state = to;
            if at.is_some() {
                r.at = at;
            }
            self.changes.push(Change::RecipientChanged {
                address: r.address.clone(),
                from,
                to,
                cause: self.cause,
            });
        }
    }

    fn set_attempt(&mut self, i: usize, to: AttemptState, now: Timestamp) {
        let a = &mut self.d.attempts[i];
        let from = a.state;
        if from != to {
            a.state = to;
            a.changed_at = now;
            self.changes.push(Change::AttemptChanged {
                message_id: a.message_id.clone(),
                from: Some(from),
                to,
                cause: self.cause,
            });
        }
    }

    /// Records a letter-level conflict, once per distinct description.
    fn dispatch_conflict(&mut self, address: Option<String>, detail: String) {
        if self.d.conflict.as_deref() == Some(detail.as_str()) {
            return;
        }
        self.d.conflict = Some(detail.clone());
        self.changes.push(Change::Conflict {
            address,
            detail,
            cause: self.cause,
        });
    }

    /// Records a recipient-level conflict, once per distinct description.
    fn recipient_conflict(&mut self, i: usize, detail: String) {
        let r = &mut self.d.recipients[i];
        if r.conflict && r.detail.as_deref() == Some(detail.as_str()) {
            return;
        }
        r.conflict = true;
        r.detail = Some(detail.clone());
        self.changes.push(Change::Conflict {
            address: Some(r.address.clone()),
            detail,
            cause: self.cause,
        });
    }

    fn ignored(&mut self, address: Option<String>, reason: &str) {
        self.changes.push(Change::Ignored {
            cause: self.cause,
            address,
            reason: reason.to_owned(),
        });
    }

    // -- SMTP -------------------------------------------------------------

    /// A new attempt's Message-ID: not empty, and not one of an earlier
    /// attempt of the letter.
    fn check_new_message_id(&self, message_id: &str) -> Result<(), Rejected> {
        if normalize_message_id(message_id).is_none() {
            return Err(Rejected::EmptyMessageId);
        }
        if self
            .d
            .attempts
            .iter()
            .any(|a| same_message_id(&a.message_id, message_id))
        {
            return Err(Rejected::MessageIdReused(message_id.to_owned()));
        }
        Ok(())
    }

    fn attempt_started(&mut self, message_id: &str, now: Timestamp) -> Result<(), Rejected> {
        if self.d.state != DispatchState::Queued {
            return Err(Rejected::WrongState {
                cause: self.cause,
                state: self.d.state,
            });
        }
        self.check_new_message_id(message_id)?;
        self.d.attempts.push(Attempt {
            message_id: message_id.to_owned(),
            state: AttemptState::Sending,
            started_at: now,
            changed_at: now,
            reply: None,
        });
        self.changes.push(Change::AttemptChanged {
            message_id: message_id.to_owned(),
            from: None,
            to: AttemptState::Sending,
            cause: self.cause,
        });
        self.set_state(DispatchState::Sending);
        Ok(())
    }

    /// The outcome of the current attempt. The attempt must be `sending`;
    /// the dispatch moves only if it is `sending` too (a receipt may have
    /// moved it already, e.g. an acceptance read before the 250 was
    /// committed).
    fn smtp_outcome(
        &mut self,
        target: AttemptState,
        reply: Option<&String>,
        now: Timestamp,
    ) -> Result<(), Rejected> {
        if self.d.state == DispatchState::Queued {
            // Nothing is being sent (no attempt, or the last one is over).
            return Err(Rejected::WrongState {
                cause: self.cause,
                state: self.d.state,
            });
        }
        let Some(i) = self.d.attempts.len().checked_sub(1) else {
            return Err(Rejected::NoAttemptInProgress {
                cause: self.cause,
                last: None,
            });
        };
        let last = self.d.attempts[i].state;
        if last == target {
            return Ok(()); // Duplicate
        }
        if last == AttemptState::Submitted {
            // Already submitted: a receipt proved it (it can be read before
            // the SMTP outcome is committed) or the 250 was recorded.
            self.ignored(None, "the attempt is already submitted");
            return Ok(());
        }
        if last != AttemptState::Sending {
            return Err(Rejected::NoAttemptInProgress {
                cause: self.cause,
                last: Some(last),
            });
        }
        self.set_attempt(i, target, now);
        if let Some(reply) = reply {
            self.d.attempts[i].reply = Some(reply.clone());
        }
        if self.d.state != DispatchState::Sending {
            return Ok(());
        }
        let to = if target == AttemptState::Submitted || self.d.has_recipient_receipts() {
            // A receipt for an earlier attempt proves the letter is out.
            DispatchState::Submitted
        } else {
            match target {
                AttemptState::FailedTransient => DispatchState::Queued,
                AttemptState::Refused => DispatchState::Refused,
                AttemptState::Uncertain => DispatchState::Uncertain,
                AttemptState::Sending | AttemptState::Submitted => DispatchState::Submitted,
            }
        };
        if to == DispatchState::Submitted {
            self.d.submitted_at = Some(now);
        }
        if to == DispatchState::Refused {
            self.d.reason = reply.cloned();
        }
        self.set_state(to);
        Ok(())
    }

    /// [`Event::AttemptRecovered`]: a lost attempt, proven by a receipt.
    fn attempt_recovered(&mut self, message_id: &str, now: Timestamp) -> Result<(), Rejected> {
        self.check_new_message_id(message_id)?;
        let attempt = Attempt {
            message_id: message_id.to_owned(),
            state: AttemptState::Submitted,
            started_at: now,
            changed_at: now,
            reply: None,
        };
        // An attempt in progress stays the current (last) one: its SMTP
        // outcome is still to come.
        match self.d.attempts.last() {
            Some(last) if last.state == AttemptState::Sending => {
                let i = self.d.attempts.len() - 1;
                self.d.attempts.insert(i, attempt);
            }
            _ => self.d.attempts.push(attempt),
        }
        self.changes.push(Change::AttemptChanged {
            message_id: message_id.to_owned(),
            from: None,
            to: AttemptState::Submitted,
            cause: self.cause,
        });
        if matches!(
            self.d.state,
            DispatchState::Queued | DispatchState::Uncertain
        ) {
            if self.d.submitted_at.is_none() {
                self.d.submitted_at = Some(now);
            }
            self.set_state(DispatchState::Submitted);
        }
        Ok(())
    }

    // -- Operator and timer -------------------------------------------------

    fn resend(&mut self, automatic: bool) -> Result<(), Rejected> {
        if self.d.state != DispatchState::Uncertain {
            return Err(Rejected::WrongState {
                cause: self.cause,
                state: self.d.state,
            });
        }
        if self.d.has_recipient_receipts() {
            return Err(Rejected::AlreadySent(self.cause));
        }
        if automatic && !policy::may_resend_automatically(&self.d) {
            return Err(Rejected::AutomaticResendUsed);
        }
        // The uncertain attempt stays uncertain: a late acceptance for its
        // Message-ID still counts.
        self.set_state(DispatchState::Queued);
        Ok(())
    }

    fn mark_sent(&mut self, now: Timestamp) -> Result<(), Rejected> {
        if self.d.state != DispatchState::Uncertain {
            return Err(Rejected::WrongState {
                cause: self.cause,
                state: self.d.state,
            });
        }
        if let Some(i) = self.d.attempts.len().checked_sub(1)
            && self.d.attempts[i].state == AttemptState::Uncertain
        {
            self.set_attempt(i, AttemptState::Submitted, now);
        }
        self.d.submitted_at = Some(now);
        self.set_state(DispatchState::Submitted);
        Ok(())
    }

    // -- Receipts -------------------------------------------------------------

    fn receipt(&mut self, f: &ReceiptFacts, now: Timestamp) -> Result<(), Rejected> {
        match &f.kind {
            Kind::Transport | Kind::Anomaly | Kind::NotPec | Kind::Unknown(_) => {
                return Err(Rejected::NotAReceipt {
                    kind: match &f.kind {
                        Kind::Unknown(raw) => raw.clone(),
                        k => k.as_str().to_owned(),
                    },
                });
            }
            _ => {}
        }
        if self.d.attempts.is_empty() {
            return Err(Rejected::NeverSent(self.cause));
        }
        match &f.kind {
            Kind::Acceptance => self.acceptance(f, now),
            Kind::NonAcceptance => self.non_acceptance(f, now),
            Kind::TakenInCharge => {
                self.ignored(
                    f.recipient.clone(),
                    "presa-in-carico is between providers and carries no state for the sender",
                );
                Ok(())
            }
            _ => self.recipient_receipt(f, now),
        }
    }

    /// The receipt proves the attempt named by its msgid reached the
    /// provider: a `sending` or `uncertain` attempt becomes `submitted`.
    fn attempt_proven(&mut self, f: &ReceiptFacts, now: Timestamp) {
        let Some(msgid) = f.msgid.as_deref() else {
            return;
        };
        if let Some(i) = self
            .d
            .attempts
            .iter()
            .position(|a| same_message_id(&a.message_id, msgid))
            && matches!(
                self.d.attempts[i].state,
                AttemptState::Sending | AttemptState::Uncertain
            )
        {
            self.set_attempt(i, AttemptState::Submitted, now);
        }
    }

    fn acceptance(&mut self, f: &ReceiptFacts, now: Timestamp) -> Result<(), Rejected> {
        if let Some(known) = self.d.identificativo.clone() {
            if same_identificativo(&known, &f.identificativo) {
                return Ok(()); // Duplicate
            }
            // A second acceptance: the letter went out twice (a resend after
            // an uncertain attempt that did reach the provider).
            self.attempt_proven(f, now);
            self.dispatch_conflict(
                None,
                format!(
                    "a second accettazione ({}) after {known}: the letter was sent twice; \
                     the first acceptance is kept",
                    f.identificativo
                ),
            );
            return Ok(());
        }
        self.attempt_proven(f, now);
        let before = self.d.state;
        if matches!(before, DispatchState::NotAccepted | DispatchState::Refused) {
            self.dispatch_conflict(
                None,
                format!("accettazione after the dispatch was {before}: the acceptance stands"),
            );
        }
        self.d.accepted_at = Some(f.at);
        self.d.identificativo = Some(f.identificativo.clone());
        self.set_state(DispatchState::Accepted);

        // Classify the letter's recipients.
        for i in 0..self.d.recipients.len() {
            let listed = f
                .destinatari
                .iter()
                .find(|(a, _)| same_address(a, &self.d.recipients[i].address))
                .map(|(_, certified)| *certified);
            let Some(certified) = listed else {
                self.recipient_conflict(
                    i,
                    "in the letter but not listed by the accettazione".to_owned(),
                );
                continue;
            };
            self.d.recipients[i].certified = Some(certified);
            let r = &self.d.recipients[i];
            match (certified, r.state) {
                (false, RecipientState::Pending) => {
                    self.set_recipient(i, RecipientState::External, None);
                }
                (false, state) if r.has_receipt() => {
                    self.recipient_conflict(
                        i,
                        format!("listed as external by the accettazione, but already {state}"),
                    );
                }
                (true, RecipientState::Warned) => {
                    // A time-out notice read before the acceptance is judged
                    // again now that the acceptance time is known.
                    if let Some(notice_at) = r.at
                        && policy::timeout_is_final(None, notice_at, Some(f.at))
                    {
                        self.set_recipient(i, RecipientState::TimedOut, None);
                    }
                }
                _ => {}
            }
        }
        for (address, _) in &f.destinatari {
            if self.d.recipient(address).is_none() {
                self.dispatch_conflict(
                    Some(address.clone()),
                    format!("{address} is listed by the accettazione but not in the letter"),
                );
            }
        }
        self.reaggregate();
        Ok(())
    }

    fn non_acceptance(&mut self, f: &ReceiptFacts, now: Timestamp) -> Result<(), Rejected> {
        if let Some(known) = self.d.identificativo.clone() {
            // Decision: an acceptance is signed proof that the letter was
            // sent; a non-acceptance cannot undo it. Kept as a conflict.
            self.dispatch_conflict(
                None,
                format!(
                    "non-accettazione ({}) after the accettazione ({known}): the acceptance stands",
                    f.identificativo
                ),
            );
            return Ok(());
        }
        if self.d.state == DispatchState::NotAccepted {
            return Ok(()); // Duplicate
        }
        self.attempt_proven(f, now);
        if self.d.has_recipient_receipts() {
            self.dispatch_conflict(
                None,
                "non-accettazione although a recipient receipt has arrived".to_owned(),
            );
        }
        let reason = f
            .reason
            .clone()
            .or_else(|| f.errore_esteso.clone())
            .unwrap_or_else(|| f.errore.clone());
        self.d.reason = Some(reason);
        self.set_state(DispatchState::NotAccepted);
        Ok(())
    }

    fn recipient_receipt(&mut self, f: &ReceiptFacts, now: Timestamp) -> Result<(), Rejected> {
        let address = f
            .recipient
            .as_deref()
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .ok_or(Rejected::MissingRecipient(self.cause))?;
        let i = self
            .d
            .recipients
            .iter()
            .position(|r| same_address(&r.address, address))
            .ok_or_else(|| Rejected::UnknownRecipient {
                cause: self.cause,
                address: address.to_owned(),
            })?;

        // Any per-recipient receipt proves the letter reached the provider.
        self.attempt_proven(f, now);
        let sending_over = self
            .d
            .current_attempt()
            .is_some_and(|a| a.state != AttemptState::Sending);
        match self.d.state {
            DispatchState::Sending if sending_over => {
                // The receipt proved the attempt in progress.
                self.d.submitted_at = Some(now);
                self.set_state(DispatchState::Submitted);
            }
            DispatchState::Queued | DispatchState::Uncertain => {
                if self.d.submitted_at.is_none() {
                    self.d.submitted_at = Some(now);
                }
                self.set_state(DispatchState::Submitted);
            }
            DispatchState::NotAccepted | DispatchState::Refused => {
                let state = self.d.state;
                self.dispatch_conflict(
                    Some(self.d.recipients[i].address.clone()),
                    format!("{} for a recipient after the dispatch was {state}", f.kind),
                );
            }
            _ => {}
        }

        let r = self.d.recipients[i].clone();
        match recipient_step(&r, f, self.d.accepted_at) {
            RecipientStep::To(to, detail, conflict) => {
                self.set_recipient(i, to, Some(f.at));
                match conflict {
                    Some(c) => self.recipient_conflict(i, c),
                    // A clean change replaces the detail, but never erases
                    // the description of an earlier conflict.
                    None if detail.is_some() || !r.conflict => {
                        self.d.recipients[i].detail = detail;
                    }
                    None => {}
                }
            }
            RecipientStep::Conflict(c) => self.recipient_conflict(i, c),
            RecipientStep::Duplicate => {} // reported as Duplicate by apply
            RecipientStep::Ignored(reason) => self.ignored(Some(r.address.clone()), reason),
        }
        if self.d.state.is_accepted() {
            self.reaggregate();
        }
        Ok(())
    }
}

/// The effect of a per-recipient receipt on one recipient. Same state →
/// nothing (a duplicate). A delivery receipt always wins.
fn recipient_step(
    r: &Recipient,
    f: &ReceiptFacts,
    accepted_at: Option<Timestamp>,
) -> RecipientStep {
    use RecipientState as S;
    let (target, detail) = match f.kind {
        Kind::Delivery => (S::Delivered, None),
        Kind::DeliveryTimeout => {
            let to = if policy::timeout_is_final(f.code(), f.at, accepted_at) {
                S::TimedOut
            } else {
                S::Warned
            };
            (to, Some(timeout_detail(f)))
        }
        // errore-consegna, rilevazione-virus
        _ => (S::Failed, Some(failure_detail(f))),
    };
    let kind = f.kind.as_str();
    match (r.state, target) {
        (from, to) if from == to => RecipientStep::Duplicate,
        (S::External, to) => RecipientStep::To(
            to,
            detail,
            Some(format!(
                "{kind} for a recipient listed as external by the accettazione"
            )),
        ),
        (S::Pending | S::Warned, to) => RecipientStep::To(to, detail, None),
        (S::TimedOut, S::Failed) => RecipientStep::To(S::Failed, detail, None),
        (S::TimedOut | S::Failed, S::Delivered) => RecipientStep::To(
            S::Delivered,
            None,
            Some(format!(
                "{kind} after the recipient was {}{}: the delivery stands",
                r.state,
                r.detail
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            )),
        ),
        (S::TimedOut, _) => RecipientStep::Ignored("a final time-out notice was already received"),
        (S::Failed, _) => RecipientStep::Ignored("the recipient already failed"),
        (S::Delivered, S::Warned) => RecipientStep::Ignored("the recipient was already delivered"),
        (S::Delivered, _) => RecipientStep::Conflict(format!(
            "{kind} after the delivery receipt ({}): the delivery stands",
            detail.unwrap_or_default()
        )),
    }
}

fn failure_detail(f: &ReceiptFacts) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let errore = f.errore.trim();
    if !errore.is_empty() && !errore.eq_ignore_ascii_case(wire::ERRORE_NESSUNO) {
        parts.push(errore);
    }
    if let Some(e) = f
        .errore_esteso
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        parts.push(e);
    }
    if f.virus
        && !parts
            .iter()
            .any(|p| p.eq_ignore_ascii_case(wire::ERRORE_VIRUS))
    {
        parts.push(wire::ERRORE_VIRUS);
    }
    if parts.is_empty() {
        f.kind.as_str().to_owned()
    } else {
        parts.join(": ")
    }
}

fn timeout_detail(f: &ReceiptFacts) -> String {
    f.errore_esteso
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .unwrap_or(wire::PREAVVISO_ERRORE_CONSEGNA)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;

    const A: &str = "alfa@pec.example.it"; // To, certified
    const X: &str = "info@example.com"; // To, external
    const B: &str = "beta@pec.example.it"; // Cc, certified
    const MID: &str = "<01JQ.1.abc@gw.example.it>";
    const MID2: &str = "<01JQ.2.def@gw.example.it>";
    const ID: &str = "opec.20250301.1@pec.example.it";
    const ID2: &str = "opec.20250301.2@pec.example.it";

    /// 2025-03-01T08:00:00Z plus `mins` minutes.
    fn at(mins: i64) -> Timestamp {
        "2025-03-01T08:00:00Z".parse::<Timestamp>().unwrap() + SignedDuration::from_mins(mins)
    }

    fn hours(h: i64) -> Timestamp {
        at(h * 60)
    }

    fn letter() -> Dispatch {
        Dispatch::new([(A, Field::To), (X, Field::To), (B, Field::Cc)])
    }

    fn apply(d: &Dispatch, ev: &Event) -> Outcome {
        d.apply(ev, at(0))
            .unwrap_or_else(|e| panic!("{ev:?} rejected: {e}"))
    }

    fn go(d: &Dispatch, ev: &Event) -> Dispatch {
        apply(d, ev).dispatch
    }

    fn reject(d: &Dispatch, ev: &Event) -> Rejected {
        match d.apply(ev, at(0)) {
            Ok(o) => panic!("{ev:?} accepted: {:?}", o.changes),
            Err(e) => e,
        }
    }

    fn started(mid: &str) -> Event {
        Event::AttemptStarted {
            message_id: mid.into(),
        }
    }

    fn submitted() -> Dispatch {
        go(&go(&letter(), &started(MID)), &Event::Submitted)
    }

    fn receipt(f: ReceiptFacts) -> Event {
        Event::Receipt(f)
    }

    fn acceptance_facts(id: &str, when: Timestamp) -> ReceiptFacts {
        ReceiptFacts::new(Kind::Acceptance, id, when)
            .with_msgid("01JQ.1.abc@gw.example.it")
            .with_destinatario(A, true)
            .with_destinatario(X, false)
            .with_destinatario(B, true)
    }

    fn acceptance(when: Timestamp) -> Event {
        receipt(acceptance_facts(ID, when))
    }

    fn delivery(addr: &str, when: Timestamp) -> Event {
        receipt(
            ReceiptFacts::new(Kind::Delivery, ID, when)
                .with_recipient(addr)
                .with_msgid("01JQ.1.abc@gw.example.it"),
        )
    }

    fn failure(addr: &str, when: Timestamp) -> Event {
        receipt(
            ReceiptFacts::new(Kind::DeliveryError, ID, when)
                .with_recipient(addr)
                .with_error(
                    "no-dest",
                    Some("5.1.1 - ARUBA PEC S.p.A. - indirizzo non valido"),
                ),
        )
    }

    fn timeout(addr: &str, when: Timestamp, esteso: Option<&str>) -> Event {
        receipt(
            ReceiptFacts::new(Kind::DeliveryTimeout, ID, when)
                .with_recipient(addr)
                .with_error("altro", esteso),
        )
    }

    fn non_acceptance(when: Timestamp) -> Event {
        receipt(
            ReceiptFacts::new(Kind::NonAcceptance, ID2, when)
                .with_msgid("01JQ.1.abc@gw.example.it")
                .with_reason("destinatario in Bcc"),
        )
    }

    fn accepted() -> Dispatch {
        go(&submitted(), &acceptance(hours(0)))
    }

    fn rstate(d: &Dispatch, addr: &str) -> RecipientState {
        d.recipient(addr).unwrap().state
    }

    fn dispatch_changes(o: &Outcome) -> Vec<(DispatchState, DispatchState)> {
        o.changes
            .iter()
            .filter_map(|c| match c {
                Change::DispatchChanged { from, to, .. } => Some((*from, *to)),
                _ => None,
            })
            .collect()
    }

    fn conflicts(o: &Outcome) -> usize {
        o.changes
            .iter()
            .filter(|c| matches!(c, Change::Conflict { .. }))
            .count()
    }

    /// Applying `ev` to `d` again changes nothing.
    fn assert_idempotent(d: &Dispatch, ev: &Event) {
        let again = apply(d, ev);
        assert!(again.is_noop(), "{ev:?} again: {:?}", again.changes);
        assert_eq!(&again.dispatch, d);
    }

    // -- Names --------------------------------------------------------------

    #[test]
    fn names_are_the_shared_ones() {
        let names = |all: &[&'static str]| all.join(" ");
        assert_eq!(
            names(
                &DispatchState::ALL
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
            ),
            "queued sending submitted uncertain accepted not-accepted refused delivered \
             partially-delivered failed"
        );
        assert_eq!(
            names(
                &RecipientState::ALL
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
            ),
            "pending delivered warned failed timed-out external"
        );
        assert_eq!(
            names(
                &AttemptState::ALL
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
            ),
            "sending submitted uncertain refused failed-transient"
        );
        assert_eq!(
            names(&Field::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>()),
            "to cc"
        );
        assert_eq!(Cause::Delivery.as_str(), "avvenuta-consegna");
        assert_eq!(Cause::DeliveryTimeout.as_str(), "preavviso-errore-consegna");
    }

    fn round_trip<T>(all: &[T])
    where
        T: Copy + fmt::Display + FromStr<Err = UnknownName> + PartialEq + fmt::Debug,
        T: Serialize + for<'de> Deserialize<'de>,
    {
        for v in all {
            let name = v.to_string();
            assert_eq!(name.parse::<T>().unwrap(), *v);
            assert_eq!(name.to_uppercase().parse::<T>().unwrap(), *v);
            assert_eq!(format!(" {name} ").parse::<T>().unwrap(), *v);
            let json = serde_json::to_string(v).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<T>(&json).unwrap(), *v);
        }
        assert!("nonsense".parse::<T>().is_err());
        assert!(serde_json::from_str::<T>("\"nonsense\"").is_err());
    }

    #[test]
    fn names_round_trip() {
        round_trip(DispatchState::ALL);
        round_trip(RecipientState::ALL);
        round_trip(AttemptState::ALL);
        round_trip(Field::ALL);
        round_trip(Cause::ALL);
        let e = "partialy-delivered".parse::<DispatchState>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown dispatch state \"partialy-delivered\""
        );
    }

    #[test]
    fn finality() {
        use DispatchState as D;
        let finals: Vec<_> = D::ALL.iter().filter(|s| s.is_final()).collect();
        assert_eq!(
            finals,
            [
                &D::NotAccepted,
                &D::Refused,
                &D::Delivered,
                &D::PartiallyDelivered,
                &D::Failed
            ]
        );
        use RecipientState as R;
        let finals: Vec<_> = R::ALL.iter().filter(|s| s.is_final()).collect();
        assert_eq!(
            finals,
            [&R::Delivered, &R::Failed, &R::TimedOut, &R::External]
        );
        use AttemptState as T;
        let finals: Vec<_> = T::ALL.iter().filter(|s| s.is_final()).collect();
        assert_eq!(finals, [&T::Submitted, &T::Refused, &T::FailedTransient]);
        let accepted: Vec<_> = D::ALL.iter().filter(|s| s.is_accepted()).collect();
        assert_eq!(
            accepted,
            [
                &D::Accepted,
                &D::Delivered,
                &D::PartiallyDelivered,
                &D::Failed
            ]
        );
    }

    // -- Sending --------------------------------------------------------------

    #[test]
    fn queued_to_sending_to_submitted() {
        let d = letter();
        assert_eq!(d.state, DispatchState::Queued);
        let o = d.apply(&started(MID), at(1)).unwrap();
        assert_eq!(
            o.changes,
            [
                Change::AttemptChanged {
                    message_id: MID.into(),
                    from: None,
                    to: AttemptState::Sending,
                    cause: Cause::AttemptStarted,
                },
                Change::DispatchChanged {
                    from: DispatchState::Queued,
                    to: DispatchState::Sending,
                    cause: Cause::AttemptStarted,
                },
            ]
        );
        let d = o.dispatch;
        assert_eq!(d.current_attempt().unwrap().started_at, at(1));
        let o = d.apply(&Event::Submitted, at(2)).unwrap();
        assert_eq!(
            dispatch_changes(&o),
            [(DispatchState::Sending, DispatchState::Submitted)]
        );
        let d = o.dispatch;
        assert_eq!(d.submitted_at, Some(at(2)));
        assert_eq!(d.current_attempt().unwrap().state, AttemptState::Submitted);
        assert_eq!(d.current_attempt().unwrap().changed_at, at(2));
        assert_idempotent(&d, &Event::Submitted);
    }

    #[test]
    fn transient_failure_goes_back_to_queued_then_retries() {
        let d = go(&letter(), &started(MID));
        let reply = "421 4.7.0 try again later".to_owned();
        let d = go(
            &d,
            &Event::TransientFailure {
                reply: reply.clone(),
            },
        );
        assert_eq!(d.state, DispatchState::Queued);
        let a = d.current_attempt().unwrap();
        assert_eq!(a.state, AttemptState::FailedTransient);
        assert_eq!(a.reply.as_deref(), Some(reply.as_str()));
        // The same Message-ID may not be used again (brackets or not).
        assert_eq!(
            reject(&d, &started("01JQ.1.abc@gw.example.it")),
            Rejected::MessageIdReused("01JQ.1.abc@gw.example.it".into())
        );
        let d = go(&d, &started(MID2));
        assert_eq!(d.state, DispatchState::Sending);
        assert_eq!(d.attempts.len(), 2);
        let d = go(&d, &Event::Submitted);
        assert_eq!(d.state, DispatchState::Submitted);
    }

    #[test]
    fn refused_is_final() {
        let d = go(&letter(), &started(MID));
        let reply = "550 5.7.1 relay denied".to_owned();
        let d = go(
            &d,
            &Event::Refused {
                reply: reply.clone(),
            },
        );
        assert_eq!(d.state, DispatchState::Refused);
        assert!(d.is_final());
        assert_eq!(d.reason.as_deref(), Some(reply.as_str()));
        assert_eq!(d.current_attempt().unwrap().state, AttemptState::Refused);
        assert_idempotent(&d, &Event::Refused { reply });
        assert!(matches!(
            reject(&d, &started(MID2)),
            Rejected::WrongState {
                state: DispatchState::Refused,
                ..
            }
        ));
    }

    #[test]
    fn lost_connection_and_crash_make_uncertain() {
        for ev in [Event::ConnectionLostAfterData, Event::FoundSendingAtStartup] {
            let d = go(&go(&letter(), &started(MID)), &ev);
            assert_eq!(d.state, DispatchState::Uncertain);
            assert_eq!(d.current_attempt().unwrap().state, AttemptState::Uncertain);
            assert!(!d.is_final());
            assert_idempotent(&d, &Event::ConnectionLostAfterData);
            assert_idempotent(&d, &Event::FoundSendingAtStartup);
            // A 250 can no longer come for it.
            assert_eq!(
                reject(&d, &Event::Submitted),
                Rejected::NoAttemptInProgress {
                    cause: Cause::Submitted,
                    last: Some(AttemptState::Uncertain)
                }
            );
        }
    }

    #[test]
    fn impossible_smtp_events_are_rejected() {
        let q = letter();
        for ev in [
            Event::Submitted,
            Event::TransientFailure {
                reply: "421".into(),
            },
            Event::Refused {
                reply: "550".into(),
            },
            Event::ConnectionLostAfterData,
            Event::FoundSendingAtStartup,
        ] {
            assert_eq!(
                reject(&q, &ev),
                Rejected::WrongState {
                    cause: ev.cause(),
                    state: DispatchState::Queued
                },
                "{ev:?}"
            );
        }
        assert_eq!(reject(&q, &started(" <> ")), Rejected::EmptyMessageId);
        let sending = go(&q, &started(MID));
        assert!(matches!(
            reject(&sending, &started(MID2)),
            Rejected::WrongState {
                state: DispatchState::Sending,
                ..
            }
        ));
    }

    #[test]
    fn outcome_after_submitted_is_ignored() {
        // The 250 was recorded; a later "connection lost" changes nothing.
        let o = apply(&submitted(), &Event::ConnectionLostAfterData);
        assert!(o.is_noop());
        assert!(matches!(o.changes[..], [Change::Ignored { .. }]));
    }

    #[test]
    fn rejections_read_well() {
        let msgs = [
            reject(&letter(), &Event::Submitted).to_string(),
            reject(&letter(), &delivery(A, hours(1))).to_string(),
            reject(&submitted(), &delivery("nobody@pec.example.it", hours(1))).to_string(),
            reject(&submitted(), &Event::ResolveResend).to_string(),
        ];
        assert_eq!(
            msgs,
            [
                "smtp-submitted: not possible while the dispatch is queued",
                "avvenuta-consegna: the letter was never submitted",
                "avvenuta-consegna: nobody@pec.example.it is not a recipient of this letter",
                "resolve-resend: not possible while the dispatch is submitted",
            ]
        );
        for m in msgs {
            assert!(!m.ends_with('.'));
        }
    }

    // -- Uncertain ----------------------------------------------------------

    fn uncertain() -> Dispatch {
        go(
            &go(&letter(), &started(MID)),
            &Event::ConnectionLostAfterData,
        )
    }

    #[test]
    fn uncertain_then_acceptance_for_its_message_id() {
        let o = apply(&uncertain(), &acceptance(hours(0)));
        let d = o.dispatch.clone();
        assert_eq!(d.state, DispatchState::Accepted);
        assert_eq!(d.attempts[0].state, AttemptState::Submitted);
        assert!(o.changes.contains(&Change::AttemptChanged {
            message_id: MID.into(),
            from: Some(AttemptState::Uncertain),
            to: AttemptState::Submitted,
            cause: Cause::Acceptance,
        }));
        assert_eq!(
            dispatch_changes(&o),
            [(DispatchState::Uncertain, DispatchState::Accepted)]
        );
    }

    #[test]
    fn uncertain_resend_by_grace_once_then_operator() {
        let d = go(&uncertain(), &Event::GraceResend);
        assert_eq!(d.state, DispatchState::Queued);
        // The uncertain attempt stays uncertain: a late acceptance still counts.
        assert_eq!(d.attempts[0].state, AttemptState::Uncertain);
        let d = go(&go(&d, &started(MID2)), &Event::FoundSendingAtStartup);
        assert_eq!(d.state, DispatchState::Uncertain);
        // The grace rule resends only once.
        assert_eq!(
            reject(&d, &Event::GraceResend),
            Rejected::AutomaticResendUsed
        );
        // An operator may.
        let d = go(&d, &Event::ResolveResend);
        assert_eq!(d.state, DispatchState::Queued);
        assert_eq!(
            reject(&d, &Event::ResolveResend).to_string(),
            "resolve-resend: not possible while the dispatch is queued"
        );
    }

    #[test]
    fn uncertain_marked_sent_by_operator() {
        let d = uncertain()
            .apply(&Event::ResolveMarkSent, at(30))
            .unwrap()
            .dispatch;
        assert_eq!(d.state, DispatchState::Submitted);
        assert_eq!(d.submitted_at, Some(at(30)));
        assert_eq!(d.attempts[0].state, AttemptState::Submitted);
        assert!(matches!(
            reject(&d, &Event::ResolveMarkSent),
            Rejected::WrongState {
                state: DispatchState::Submitted,
                ..
            }
        ));
    }

    #[test]
    fn resolve_only_from_uncertain() {
        for d in [
            letter(),
            submitted(),
            accepted(),
            go(&letter(), &started(MID)),
        ] {
            for ev in [
                Event::GraceResend,
                Event::ResolveResend,
                Event::ResolveMarkSent,
            ] {
                assert!(
                    matches!(reject(&d, &ev), Rejected::WrongState { .. }),
                    "{ev:?} in {}",
                    d.state
                );
            }
        }
    }

    #[test]
    fn late_acceptance_of_the_uncertain_attempt_cancels_the_resend() {
        let d = go(&uncertain(), &Event::GraceResend);
        let d = go(&d, &acceptance(hours(0)));
        assert_eq!(d.state, DispatchState::Accepted);
        assert_eq!(d.attempts[0].state, AttemptState::Submitted);
        // Nothing left to send.
        assert!(matches!(
            reject(&d, &started(MID2)),
            Rejected::WrongState { .. }
        ));
    }

    #[test]
    fn late_acceptance_while_the_resend_is_in_flight() {
        let d = go(&go(&uncertain(), &Event::GraceResend), &started(MID2));
        let d = go(&d, &acceptance(hours(0)));
        assert_eq!(d.state, DispatchState::Accepted);
        // The resend completes: the attempt is recorded, the dispatch stays.
        let o = apply(&d, &Event::Submitted);
        assert_eq!(dispatch_changes(&o), []);
        let d = o.dispatch;
        assert_eq!(d.attempts[1].state, AttemptState::Submitted);
        assert_eq!(d.state, DispatchState::Accepted);
        // Its own acceptance: the letter went out twice.
        let second = receipt(
            ReceiptFacts::new(Kind::Acceptance, ID2, hours(1))
                .with_msgid("01JQ.2.def@gw.example.it")
                .with_destinatario(A, true)
                .with_destinatario(X, false)
                .with_destinatario(B, true),
        );
        let o = apply(&d, &second);
        assert_eq!(conflicts(&o), 1);
        let d = o.dispatch;
        assert_eq!(d.identificativo.as_deref(), Some(ID));
        assert!(d.conflict.as_deref().unwrap().contains("sent twice"));
        assert_idempotent(&d, &second);
    }

    #[test]
    fn recipient_receipt_proves_an_uncertain_letter_was_sent() {
        let o = apply(&uncertain(), &delivery(A, hours(1)));
        let d = o.dispatch.clone();
        assert_eq!(d.state, DispatchState::Submitted);
        assert_eq!(d.attempts[0].state, AttemptState::Submitted);
        assert_eq!(rstate(&d, A), RecipientState::Delivered);
        // Queued for a resend: the same.
        let q = go(&uncertain(), &Event::GraceResend);
        let d = go(&q, &delivery(A, hours(1)));
        assert_eq!(d.state, DispatchState::Submitted);
        assert!(matches!(
            reject(&d, &started(MID2)),
            Rejected::WrongState { .. }
        ));
    }

    #[test]
    fn no_resend_when_a_receipt_proves_sending() {
        let mut d = uncertain();
        d.recipients[0].state = RecipientState::Delivered;
        assert_eq!(
            reject(&d, &Event::ResolveResend),
            Rejected::AlreadySent(Cause::ResolveResend)
        );
        assert_eq!(
            reject(&d, &Event::GraceResend),
            Rejected::AlreadySent(Cause::GraceResend)
        );
    }

    #[test]
    fn acceptance_read_before_the_250_is_committed() {
        let d = go(&letter(), &started(MID));
        let d = go(&d, &acceptance(hours(0)));
        assert_eq!(d.state, DispatchState::Accepted);
        assert_eq!(d.attempts[0].state, AttemptState::Submitted);
        assert_idempotent(&d, &Event::Submitted);
        let o = apply(&d, &Event::ConnectionLostAfterData);
        assert!(o.is_noop());
    }

    #[test]
    fn delivery_read_before_the_250_is_committed() {
        let d = go(&letter(), &started(MID));
        let d = go(&d, &delivery(A, hours(0)));
        assert_eq!(d.state, DispatchState::Submitted);
        assert_eq!(d.attempts[0].state, AttemptState::Submitted);
        assert_idempotent(&d, &Event::Submitted);
    }

    #[test]
    fn smtp_outcome_of_a_resend_after_evidence_keeps_the_letter_submitted() {
        // A receipt for the first attempt arrives while the resend is in flight.
        let d = go(&go(&uncertain(), &Event::ResolveResend), &started(MID2));
        let f = ReceiptFacts::new(Kind::Delivery, ID, hours(1))
            .with_recipient(A)
            .with_msgid("01JQ.1.abc@gw.example.it");
        let d = go(&d, &receipt(f));
        assert_eq!(d.state, DispatchState::Sending);
        let d = go(
            &d,
            &Event::TransientFailure {
                reply: "421".into(),
            },
        );
        assert_eq!(d.state, DispatchState::Submitted);
    }

    // -- Receipts: acceptance -----------------------------------------------

    #[test]
    fn acceptance_classifies_recipients() {
        let o = apply(&submitted(), &acceptance(hours(0)));
        let d = &o.dispatch;
        assert_eq!(d.state, DispatchState::Accepted);
        assert_eq!(d.accepted_at, Some(hours(0)));
        assert_eq!(d.identificativo.as_deref(), Some(ID));
        assert_eq!(d.recipient(A).unwrap().certified, Some(true));
        assert_eq!(d.recipient(B).unwrap().certified, Some(true));
        assert_eq!(d.recipient(X).unwrap().certified, Some(false));
        assert_eq!(rstate(d, X), RecipientState::External);
        assert_eq!(rstate(d, A), RecipientState::Pending);
        assert!(!d.is_final());
        assert_eq!(
            o.changes,
            [
                Change::DispatchChanged {
                    from: DispatchState::Submitted,
                    to: DispatchState::Accepted,
                    cause: Cause::Acceptance
                },
                Change::RecipientChanged {
                    address: X.into(),
                    from: RecipientState::Pending,
                    to: RecipientState::External,
                    cause: Cause::Acceptance
                },
            ]
        );
        assert_idempotent(d, &acceptance(hours(0)));
    }

    #[test]
    fn only_external_recipients_accepted_is_final() {
        let d = Dispatch::new([(X, Field::To), ("altro@example.org", Field::Cc)]);
        let d = go(&go(&d, &started(MID)), &Event::Submitted);
        let f = ReceiptFacts::new(Kind::Acceptance, ID, hours(0))
            .with_destinatario(X, false)
            .with_destinatario("ALTRO@example.org", false);
        let d = go(&d, &receipt(f));
        assert_eq!(d.state, DispatchState::Accepted);
        assert!(d.is_final());
        assert_eq!(aggregate(&d), DispatchState::Accepted);
    }

    #[test]
    fn acceptance_listing_is_checked_against_the_letter() {
        let f = ReceiptFacts::new(Kind::Acceptance, ID, hours(0))
            .with_destinatario(A, true)
            .with_destinatario(X, false)
            .with_destinatario("intruso@pec.example.it", true);
        let o = apply(&submitted(), &receipt(f.clone()));
        assert_eq!(conflicts(&o), 2);
        let d = &o.dispatch;
        let b = d.recipient(B).unwrap();
        assert!(b.conflict);
        assert_eq!(b.certified, None);
        assert_eq!(b.state, RecipientState::Pending);
        assert!(
            d.conflict
                .as_deref()
                .unwrap()
                .contains("intruso@pec.example.it")
        );
        assert_idempotent(d, &receipt(f));
    }

    #[test]
    fn acceptance_with_case_and_brackets() {
        let f = ReceiptFacts::new(Kind::Acceptance, ID, hours(0))
            .with_destinatario("ALFA@PEC.Example.IT", true)
            .with_destinatario(" <info@EXAMPLE.com> ", false)
            .with_destinatario("Beta@pec.example.it", true);
        let o = apply(&submitted(), &receipt(f));
        assert_eq!(conflicts(&o), 0);
        assert_eq!(rstate(&o.dispatch, X), RecipientState::External);
        let d = go(&o.dispatch, &delivery("<ALFA@pec.example.IT>", hours(1)));
        assert_eq!(rstate(&d, A), RecipientState::Delivered);
        // The address as written in the letter is the one reported.
        assert_eq!(d.recipients[0].address, A);
    }

    #[test]
    fn identificativo_compares_without_brackets() {
        let d = accepted();
        let f = acceptance_facts(&format!("<{ID}>"), hours(0));
        assert_idempotent(&d, &receipt(f));
    }

    // -- Receipts: non-acceptance --------------------------------------------

    #[test]
    fn non_acceptance_is_final_with_reason() {
        let o = apply(&submitted(), &non_acceptance(hours(0)));
        let d = &o.dispatch;
        assert_eq!(d.state, DispatchState::NotAccepted);
        assert!(d.is_final());
        assert_eq!(d.reason.as_deref(), Some("destinatario in Bcc"));
        assert_eq!(
            dispatch_changes(&o),
            [(DispatchState::Submitted, DispatchState::NotAccepted)]
        );
        // Recipients stay pending: nothing was sent to them.
        assert!(
            d.recipients
                .iter()
                .all(|r| r.state == RecipientState::Pending)
        );
        assert_idempotent(d, &non_acceptance(hours(0)));
    }

    #[test]
    fn non_acceptance_reason_falls_back_to_errore() {
        let f = ReceiptFacts::new(Kind::NonAcceptance, ID, hours(0)).with_error("virus", None);
        let d = go(&submitted(), &receipt(f));
        assert_eq!(d.reason.as_deref(), Some("virus"));
        let f = ReceiptFacts::new(Kind::NonAcceptance, ID, hours(0))
            .with_error("altro", Some("allegato non ammesso"));
        let d = go(&submitted(), &receipt(f));
        assert_eq!(d.reason.as_deref(), Some("allegato non ammesso"));
    }

    #[test]
    fn non_acceptance_after_acceptance_is_a_recorded_conflict() {
        let d = go(&accepted(), &delivery(A, hours(1)));
        let o = apply(&d, &non_acceptance(hours(2)));
        assert_eq!(conflicts(&o), 1);
        assert_eq!(dispatch_changes(&o), []);
        let d2 = o.dispatch;
        assert_eq!(d2.state, d.state);
        assert!(
            d2.conflict
                .as_deref()
                .unwrap()
                .contains("the acceptance stands")
        );
        assert_idempotent(&d2, &non_acceptance(hours(2)));
    }

    #[test]
    fn acceptance_after_non_acceptance_wins() {
        let d = go(&submitted(), &non_acceptance(hours(0)));
        let o = apply(&d, &acceptance(hours(0)));
        assert_eq!(conflicts(&o), 1);
        assert_eq!(o.dispatch.state, DispatchState::Accepted);
        assert_eq!(o.dispatch.reason.as_deref(), Some("destinatario in Bcc"));
    }

    #[test]
    fn acceptance_after_smtp_refusal_wins() {
        let d = go(
            &go(&letter(), &started(MID)),
            &Event::Refused {
                reply: "554".into(),
            },
        );
        let o = apply(&d, &acceptance(hours(0)));
        assert_eq!(conflicts(&o), 1);
        assert_eq!(o.dispatch.state, DispatchState::Accepted);
    }

    #[test]
    fn recipient_receipt_after_non_acceptance_is_a_conflict() {
        let d = go(&submitted(), &non_acceptance(hours(0)));
        let o = apply(&d, &delivery(A, hours(1)));
        assert_eq!(o.dispatch.state, DispatchState::NotAccepted);
        assert_eq!(rstate(&o.dispatch, A), RecipientState::Delivered);
        assert_eq!(conflicts(&o), 1);
        assert_idempotent(&o.dispatch, &delivery(A, hours(1)));
    }

    #[test]
    fn non_acceptance_after_a_recipient_receipt_is_a_conflict() {
        let d = go(&submitted(), &delivery(A, hours(1)));
        let o = apply(&d, &non_acceptance(hours(0)));
        assert_eq!(o.dispatch.state, DispatchState::NotAccepted);
        assert_eq!(conflicts(&o), 1);
    }

    // -- Receipts: recipients --------------------------------------------------

    #[test]
    fn all_certified_delivered_is_delivered() {
        let d = go(&accepted(), &delivery(A, hours(1)));
        assert_eq!(d.state, DispatchState::Accepted);
        assert_eq!(d.recipient(A).unwrap().at, Some(hours(1)));
        let o = apply(&d, &delivery(B, hours(2)));
        assert_eq!(
            o.changes,
            [
                Change::RecipientChanged {
                    address: B.into(),
                    from: RecipientState::Pending,
                    to: RecipientState::Delivered,
                    cause: Cause::Delivery
                },
                Change::DispatchChanged {
                    from: DispatchState::Accepted,
                    to: DispatchState::Delivered,
                    cause: Cause::Delivery
                },
            ]
        );
        assert!(o.dispatch.is_final());
        assert_idempotent(&o.dispatch, &delivery(B, hours(2)));
    }

    #[test]
    fn failure_keeps_the_provider_error() {
        let d = go(&accepted(), &failure(B, hours(1)));
        let b = d.recipient(B).unwrap();
        assert_eq!(b.state, RecipientState::Failed);
        assert_eq!(
            b.detail.as_deref(),
            Some("no-dest: 5.1.1 - ARUBA PEC S.p.A. - indirizzo non valido")
        );
        assert!(!b.conflict);
        assert_idempotent(&d, &failure(B, hours(1)));
    }

    #[test]
    fn virus_failure() {
        let f = ReceiptFacts::new(Kind::DeliveryError, ID, hours(1))
            .with_recipient(A)
            .with_error("virus", None)
            .with_virus();
        let d = go(&accepted(), &receipt(f));
        assert_eq!(rstate(&d, A), RecipientState::Failed);
        assert_eq!(d.recipient(A).unwrap().detail.as_deref(), Some("virus"));
        let f = ReceiptFacts::new(Kind::DeliveryError, ID, hours(1))
            .with_recipient(B)
            .with_error("altro", Some("rifiutato"))
            .with_virus();
        let d = go(&d, &receipt(f));
        assert_eq!(
            d.recipient(B).unwrap().detail.as_deref(),
            Some("altro: rifiutato: virus")
        );
        assert_eq!(d.state, DispatchState::Failed);
    }

    #[test]
    fn rilevazione_virus_fails_the_recipient() {
        let f = ReceiptFacts::new(Kind::VirusDetected, ID, hours(1))
            .with_recipient(A)
            .with_error("virus", None);
        let d = go(&accepted(), &receipt(f));
        assert_eq!(rstate(&d, A), RecipientState::Failed);
        // The user-facing errore-consegna that follows changes nothing.
        assert!(apply(&d, &failure(A, hours(2))).is_noop());
    }

    #[test]
    fn mixes() {
        // delivered + failed -> partially-delivered
        let d = go(
            &go(&accepted(), &delivery(A, hours(1))),
            &failure(B, hours(1)),
        );
        assert_eq!(d.state, DispatchState::PartiallyDelivered);
        assert!(d.is_final());
        // failed + timed-out -> failed
        let d = go(
            &go(&accepted(), &failure(A, hours(1))),
            &timeout(B, hours(24), Some("5.4.1 - tempo massimo superato")),
        );
        assert_eq!(d.state, DispatchState::Failed);
        // delivered + warned -> still accepted
        let d = go(
            &go(&accepted(), &delivery(A, hours(1))),
            &timeout(B, hours(12), None),
        );
        assert_eq!(d.state, DispatchState::Accepted);
        // delivered + timed-out -> partially-delivered
        let d = go(&d, &timeout(B, hours(24), None));
        assert_eq!(d.state, DispatchState::PartiallyDelivered);
    }

    #[test]
    fn to_and_cc_count_alike() {
        let d = Dispatch::new([(A, Field::To), (B, Field::Cc)]);
        assert_eq!(d.recipients[1].field, Field::Cc);
        let d = go(&go(&d, &started(MID)), &Event::Submitted);
        let d = go(&d, &acceptance(hours(0)));
        // X is listed by the acceptance but not in this letter.
        assert!(d.conflict.is_some());
        let d = go(&d, &delivery(A, hours(1)));
        assert_eq!(d.state, DispatchState::Accepted);
        let d = go(&d, &delivery(B, hours(1)));
        assert_eq!(d.state, DispatchState::Delivered);
    }

    #[test]
    fn timeout_at_12h_then_delivery() {
        let d = go(&accepted(), &timeout(A, hours(12), None));
        let a = d.recipient(A).unwrap();
        assert_eq!(a.state, RecipientState::Warned);
        assert_eq!(a.detail.as_deref(), Some("preavviso-errore-consegna"));
        assert_idempotent(&d, &timeout(A, hours(12), None));
        let o = apply(&d, &delivery(A, hours(13)));
        assert_eq!(conflicts(&o), 0);
        let a = o.dispatch.recipient(A).unwrap();
        assert_eq!(a.state, RecipientState::Delivered);
        assert!(!a.conflict);
    }

    #[test]
    fn final_timeout_at_24h_then_late_delivery() {
        let d = go(&accepted(), &delivery(B, hours(1)));
        let d = go(
            &d,
            &timeout(
                A,
                hours(24),
                Some("5.4.1 - ARUBA PEC S.p.A. - tempo massimo superato"),
            ),
        );
        assert_eq!(rstate(&d, A), RecipientState::TimedOut);
        assert_eq!(d.state, DispatchState::PartiallyDelivered);
        let o = apply(&d, &delivery(A, hours(30)));
        assert_eq!(conflicts(&o), 1);
        let a = o.dispatch.recipient(A).unwrap();
        assert_eq!(a.state, RecipientState::Delivered);
        assert!(a.conflict);
        assert!(
            a.detail.as_deref().unwrap().contains("timed-out"),
            "{:?}",
            a.detail
        );
        assert_eq!(
            dispatch_changes(&o),
            [(DispatchState::PartiallyDelivered, DispatchState::Delivered)]
        );
        assert_idempotent(&o.dispatch, &delivery(A, hours(30)));
    }

    #[test]
    fn timeout_without_code_judged_by_time() {
        let d = go(&accepted(), &timeout(A, hours(21), None));
        assert_eq!(rstate(&d, A), RecipientState::Warned);
        let o = apply(&d, &timeout(A, hours(23), None));
        assert_eq!(
            o.changes[0],
            Change::RecipientChanged {
                address: A.into(),
                from: RecipientState::Warned,
                to: RecipientState::TimedOut,
                cause: Cause::DeliveryTimeout
            }
        );
        // Straight from pending at 23 h.
        let d = go(&accepted(), &timeout(A, hours(23), None));
        assert_eq!(rstate(&d, A), RecipientState::TimedOut);
        // The boundary: 22 h exactly is final, a second less is not.
        let d = go(&accepted(), &timeout(A, at(22 * 60), None));
        assert_eq!(rstate(&d, A), RecipientState::TimedOut);
        let just_before = hours(22) - SignedDuration::from_secs(1);
        let d = go(&accepted(), &timeout(A, just_before, None));
        assert_eq!(rstate(&d, A), RecipientState::Warned);
    }

    #[test]
    fn timeout_with_permanent_code_is_final_at_once() {
        let d = go(
            &accepted(),
            &timeout(A, hours(1), Some("5.4.1 - tempo superato")),
        );
        assert_eq!(rstate(&d, A), RecipientState::TimedOut);
        // The code may come only in errore_code.
        let mut f = ReceiptFacts::new(Kind::DeliveryTimeout, ID, hours(1)).with_recipient(B);
        f.errore_code = Some("5.4.1".into());
        let d = go(&d, &receipt(f));
        assert_eq!(rstate(&d, B), RecipientState::TimedOut);
        assert_eq!(d.state, DispatchState::Failed);
    }

    #[test]
    fn timeout_with_transient_code() {
        let d = go(
            &accepted(),
            &timeout(A, hours(12), Some("4.4.7 - in attesa")),
        );
        assert_eq!(rstate(&d, A), RecipientState::Warned);
        // At 22 h or later the time decides, whatever the code.
        let d = go(&d, &timeout(A, hours(23), Some("4.4.7 - tempo massimo")));
        assert_eq!(rstate(&d, A), RecipientState::TimedOut);
    }

    #[test]
    fn failure_refines_a_timeout_and_not_the_reverse() {
        let d = go(&accepted(), &timeout(A, hours(24), None));
        let o = apply(&d, &failure(A, hours(25)));
        assert_eq!(rstate(&o.dispatch, A), RecipientState::Failed);
        assert_eq!(conflicts(&o), 0);
        let d = go(&accepted(), &failure(A, hours(2)));
        let o = apply(&d, &timeout(A, hours(24), None));
        assert!(o.is_noop());
        assert!(matches!(o.changes[..], [Change::Ignored { .. }]));
        let o = apply(&d, &timeout(A, hours(12), None));
        assert!(o.is_noop());
        // A warning after a final notice.
        let d = go(&accepted(), &timeout(A, hours(24), None));
        assert!(apply(&d, &timeout(A, hours(12), None)).is_noop());
    }

    #[test]
    fn delivery_wins_over_a_failure_either_way() {
        let d = go(&accepted(), &failure(A, hours(1)));
        let o = apply(&d, &delivery(A, hours(2)));
        assert_eq!(rstate(&o.dispatch, A), RecipientState::Delivered);
        assert_eq!(conflicts(&o), 1);
        let d = go(&accepted(), &delivery(A, hours(1)));
        let o = apply(&d, &failure(A, hours(2)));
        assert_eq!(rstate(&o.dispatch, A), RecipientState::Delivered);
        assert_eq!(conflicts(&o), 1);
        assert!(o.dispatch.recipient(A).unwrap().conflict);
        assert_idempotent(&o.dispatch, &failure(A, hours(2)));
        // A final time-out after the delivery: also a conflict.
        let o = apply(&d, &timeout(A, hours(24), None));
        assert_eq!(conflicts(&o), 1);
        assert_eq!(rstate(&o.dispatch, A), RecipientState::Delivered);
    }

    #[test]
    fn warning_after_delivery_is_ignored() {
        let d = go(&accepted(), &delivery(A, hours(13)));
        let o = apply(&d, &timeout(A, hours(12), None));
        assert!(o.is_noop());
        assert!(matches!(o.changes[..], [Change::Ignored { .. }]));
    }

    #[test]
    fn receipts_for_an_external_recipient() {
        let o = apply(&accepted(), &delivery(X, hours(1)));
        assert_eq!(rstate(&o.dispatch, X), RecipientState::Delivered);
        assert_eq!(conflicts(&o), 1);
        // Delivery first, then the acceptance calls it external.
        let d = go(&submitted(), &delivery(X, hours(1)));
        let o = apply(&d, &acceptance(hours(0)));
        assert_eq!(rstate(&o.dispatch, X), RecipientState::Delivered);
        assert_eq!(conflicts(&o), 1);
    }

    #[test]
    fn bad_receipts_are_rejected() {
        let d = accepted();
        assert_eq!(
            reject(&d, &delivery("nobody@pec.example.it", hours(1))),
            Rejected::UnknownRecipient {
                cause: Cause::Delivery,
                address: "nobody@pec.example.it".into()
            }
        );
        let f = ReceiptFacts::new(Kind::DeliveryError, ID, hours(1));
        assert_eq!(
            reject(&d, &receipt(f)),
            Rejected::MissingRecipient(Cause::DeliveryError)
        );
        let f = ReceiptFacts::new(Kind::Delivery, ID, hours(1)).with_recipient("  ");
        assert_eq!(
            reject(&d, &receipt(f)),
            Rejected::MissingRecipient(Cause::Delivery)
        );
        for kind in [Kind::Transport, Kind::Anomaly, Kind::NotPec] {
            let name = kind.as_str().to_owned();
            let f = ReceiptFacts::new(kind, ID, hours(1)).with_recipient(A);
            assert_eq!(
                reject(&d, &receipt(f)),
                Rejected::NotAReceipt { kind: name }
            );
        }
        let f = ReceiptFacts::new(Kind::Unknown("mancata-consegna".into()), ID, hours(1));
        assert_eq!(
            reject(&d, &receipt(f)),
            Rejected::NotAReceipt {
                kind: "mancata-consegna".into()
            }
        );
        // Never sent at all.
        assert_eq!(
            reject(&letter(), &acceptance(hours(0))),
            Rejected::NeverSent(Cause::Acceptance)
        );
    }

    #[test]
    fn presa_in_carico_is_ignored() {
        let f = ReceiptFacts::new(Kind::TakenInCharge, ID, hours(1));
        let o = apply(&accepted(), &receipt(f));
        assert!(o.is_noop());
        assert!(matches!(o.changes[..], [Change::Ignored { .. }]));
    }

    // -- Out of order -----------------------------------------------------------

    #[test]
    fn delivery_before_acceptance() {
        let d = go(&submitted(), &delivery(A, hours(1)));
        assert_eq!(d.state, DispatchState::Submitted);
        assert_eq!(rstate(&d, A), RecipientState::Delivered);
        let d = go(&d, &delivery(B, hours(1)));
        let o = apply(&d, &acceptance(hours(0)));
        assert_eq!(
            dispatch_changes(&o),
            [
                (DispatchState::Submitted, DispatchState::Accepted),
                (DispatchState::Accepted, DispatchState::Delivered)
            ]
        );
        assert_eq!(o.dispatch.recipient(A).unwrap().certified, Some(true));
    }

    #[test]
    fn failure_before_acceptance() {
        let d = go(
            &go(&submitted(), &failure(A, hours(1))),
            &delivery(B, hours(1)),
        );
        let d = go(&d, &acceptance(hours(0)));
        assert_eq!(d.state, DispatchState::PartiallyDelivered);
    }

    #[test]
    fn timeout_notice_before_acceptance_is_judged_again() {
        // Read before the acceptance: no acceptance time, so a warning.
        let d = go(&submitted(), &timeout(A, hours(23), None));
        assert_eq!(rstate(&d, A), RecipientState::Warned);
        let o = apply(&d, &acceptance(hours(0)));
        assert_eq!(rstate(&o.dispatch, A), RecipientState::TimedOut);
        // A 12-hour one stays a warning.
        let d = go(&submitted(), &timeout(A, hours(12), None));
        let d = go(&d, &acceptance(hours(0)));
        assert_eq!(rstate(&d, A), RecipientState::Warned);
    }

    // -- Aggregation --------------------------------------------------------

    #[test]
    fn aggregate_table() {
        use RecipientState as R;
        let cases: &[(&[R], DispatchState)] = &[
            (&[], DispatchState::Accepted),
            (&[R::External], DispatchState::Accepted),
            (&[R::Pending, R::Delivered], DispatchState::Accepted),
            (&[R::Warned, R::Failed], DispatchState::Accepted),
            (&[R::Delivered, R::External], DispatchState::Delivered),
            (&[R::Failed, R::TimedOut], DispatchState::Failed),
            (&[R::TimedOut, R::External], DispatchState::Failed),
            (
                &[R::Delivered, R::TimedOut],
                DispatchState::PartiallyDelivered,
            ),
            (
                &[R::Delivered, R::Failed, R::External],
                DispatchState::PartiallyDelivered,
            ),
        ];
        for (states, want) in cases {
            let mut d = Dispatch::new(
                states
                    .iter()
                    .enumerate()
                    .map(|(i, _)| (format!("r{i}@pec.example.it"), Field::To)),
            );
            for (r, s) in d.recipients.iter_mut().zip(states.iter()) {
                r.state = *s;
            }
            for base in [
                DispatchState::Accepted,
                DispatchState::Delivered,
                DispatchState::PartiallyDelivered,
                DispatchState::Failed,
            ] {
                d.state = base;
                assert_eq!(aggregate(&d), *want, "{states:?} from {base}");
            }
            // Not accepted: the state is kept.
            for base in [
                DispatchState::Queued,
                DispatchState::Submitted,
                DispatchState::Uncertain,
                DispatchState::NotAccepted,
                DispatchState::Refused,
            ] {
                d.state = base;
                assert_eq!(aggregate(&d), base);
            }
        }
    }

    // -- From daticert, serialisation --------------------------------------

    #[test]
    fn facts_from_daticert() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<postacert tipo="errore-consegna" errore="virus">
  <intestazione>
    <mittente>protocollo@pec.comune.example.it</mittente>
    <destinatari tipo="certificato">alfa@pec.example.it</destinatari>
    <destinatari tipo="esterno">info@example.com</destinatari>
    <risposte>protocollo@pec.comune.example.it</risposte>
  </intestazione>
  <dati>
    <gestore-emittente>ARUBA PEC S.p.A.</gestore-emittente>
    <data zona="+0100"><giorno>01/03/2025</giorno><ora>10:00:00</ora></data>
    <identificativo>opec.20250301.1@pec.example.it</identificativo>
    <msgid>&lt;01JQ.1.abc@gw.example.it&gt;</msgid>
    <consegna>alfa@pec.example.it</consegna>
    <errore-esteso>5.7.1 - virus rilevato</errore-esteso>
  </dati>
</postacert>"#;
        let dc = Daticert::parse(xml.as_bytes()).unwrap();
        let f = ReceiptFacts::from_daticert(Kind::DeliveryError, &dc, false);
        assert_eq!(f.kind, Kind::DeliveryError);
        assert_eq!(f.recipient.as_deref(), Some(A));
        assert_eq!(f.identificativo, ID);
        assert_eq!(f.msgid.as_deref(), Some("01JQ.1.abc@gw.example.it"));
        assert_eq!(f.at, "2025-03-01T09:00:00Z".parse::<Timestamp>().unwrap());
        assert_eq!(f.errore, "virus");
        assert_eq!(f.errore_esteso.as_deref(), Some("5.7.1 - virus rilevato"));
        assert_eq!(f.errore_code.as_deref(), Some("5.7.1"));
        assert!(f.virus);
        assert_eq!(f.destinatari, [(A.to_owned(), true), (X.to_owned(), false)]);
        assert_eq!(f.reason, None);
        let d = go(&accepted(), &receipt(f));
        assert_eq!(
            d.recipient(A).unwrap().detail.as_deref(),
            Some("virus: 5.7.1 - virus rilevato")
        );

        let xml = xml
            .replace("errore-consegna", "non-accettazione")
            .replace("errore=\"virus\"", "errore=\"altro\"");
        let dc = Daticert::parse(xml.as_bytes()).unwrap();
        let f = ReceiptFacts::from_daticert(Kind::NonAcceptance, &dc, true);
        assert!(f.virus);
        assert_eq!(f.reason.as_deref(), Some("5.7.1 - virus rilevato"));
    }

    #[test]
    fn changes_serialise_for_the_event_log() {
        let o = apply(&accepted(), &delivery(A, hours(1)));
        let v = serde_json::to_value(&o.changes).unwrap();
        assert_eq!(
            v,
            serde_json::json!([{
                "change": "recipient-changed",
                "address": A,
                "from": "pending",
                "to": "delivered",
                "cause": "avvenuta-consegna"
            }])
        );
        let v = serde_json::to_value(&o.dispatch).unwrap();
        assert_eq!(v["state"], "accepted");
        assert_eq!(v["recipients"][1]["state"], "external");
        assert_eq!(v["recipients"][2]["field"], "cc");
    }

    // -- Properties -----------------------------------------------------------

    /// splitmix64: deterministic, dependency-free randomness for the
    /// property tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
    }

    fn random_event(rng: &mut Rng) -> Event {
        let mids = ["<m0@gw>", "<m1@gw>", "<m2@gw>", "<m3@gw>"];
        match rng.below(16) {
            0 | 1 => Event::AttemptStarted {
                message_id: rng.pick(&mids).to_string(),
            },
            2 | 3 => Event::Submitted,
            4 => Event::TransientFailure {
                reply: "421 later".into(),
            },
            5 => Event::Refused {
                reply: "550 no".into(),
            },
            6 => Event::ConnectionLostAfterData,
            7 => Event::FoundSendingAtStartup,
            8 => rng
                .pick(&[
                    Event::GraceResend,
                    Event::ResolveResend,
                    Event::ResolveMarkSent,
                    Event::AttemptRecovered {
                        message_id: "<m3@gw>".into(),
                    },
                ])
                .clone(),
            _ => {
                let kind = rng
                    .pick(&[
                        Kind::Acceptance,
                        Kind::Acceptance,
                        Kind::NonAcceptance,
                        Kind::TakenInCharge,
                        Kind::Delivery,
                        Kind::Delivery,
                        Kind::DeliveryError,
                        Kind::DeliveryTimeout,
                        Kind::DeliveryTimeout,
                        Kind::VirusDetected,
                        Kind::Transport,
                        Kind::Unknown("x".into()),
                    ])
                    .clone();
                let mut f = ReceiptFacts::new(
                    kind,
                    *rng.pick(&["id-1@p", "<id-1@p>", "id-2@p"]),
                    at(rng.below(30 * 60) as i64),
                );
                if let Some(r) = rng.pick(&[
                    Some(A),
                    Some(B),
                    Some(X),
                    Some("ALFA@PEC.EXAMPLE.IT"),
                    Some("nobody@x"),
                    None,
                ]) {
                    f = f.with_recipient(*r);
                }
                if let Some(m) = rng.pick(&[Some("m0@gw"), Some("m1@gw"), Some("m2@gw"), None]) {
                    f = f.with_msgid(*m);
                }
                let esteso = *rng.pick(&[None, Some("5.4.1 - x"), Some("4.4.7 - y"), Some("boh")]);
                f = f.with_error(*rng.pick(&["nessuno", "no-dest", "virus", "altro"]), esteso);
                if rng.below(4) == 0 {
                    f = f.with_virus();
                }
                let listings: [&[(&str, bool)]; 4] = [
                    &[(A, true), (X, false), (B, true)],
                    &[(A, true), (X, true), (B, true)],
                    &[(A, true), ("intruso@x", true)],
                    &[],
                ];
                for (a, c) in *rng.pick(&listings) {
                    f = f.with_destinatario(*a, *c);
                }
                Event::Receipt(f)
            }
        }
    }

    fn check_invariants(before: &Dispatch, ev: &Event, o: &Outcome) {
        let d = &o.dispatch;
        assert!(!o.changes.is_empty());
        assert_eq!(o.is_noop(), d == before, "{ev:?}: {:?}", o.changes);
        assert_eq!(d.state.is_accepted(), d.accepted_at.is_some());
        assert_eq!(d.accepted_at.is_some(), d.identificativo.is_some());
        if d.state.is_accepted() {
            assert_eq!(d.state, aggregate(d), "{d:#?}");
        }
        let addresses = |d: &Dispatch| {
            d.recipients
                .iter()
                .map(|r| r.address.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(addresses(d), addresses(before));
        if d.state == DispatchState::Sending {
            assert_eq!(
                d.current_attempt().unwrap().state,
                AttemptState::Sending,
                "{ev:?}"
            );
        }
        if d.state == DispatchState::Uncertain {
            assert_eq!(d.current_attempt().unwrap().state, AttemptState::Uncertain);
        }
        if d.state == DispatchState::Submitted {
            assert!(d.submitted_at.is_some());
        }
        // The dispatch changes chain from the old state to the new one.
        let mut state = before.state;
        for c in &o.changes {
            if let Change::DispatchChanged { from, to, .. } = c {
                assert_eq!(*from, state);
                assert_ne!(from, to);
                state = *to;
            }
        }
        assert_eq!(state, d.state);
        // Recipient changes likewise.
        for (b, a) in before.recipients.iter().zip(&d.recipients) {
            let mut state = b.state;
            for c in &o.changes {
                if let Change::RecipientChanged {
                    address, from, to, ..
                } = c
                    && *address == a.address
                {
                    assert_eq!(*from, state);
                    state = *to;
                }
            }
            assert_eq!(state, a.state);
        }
        // Applying the same event again changes nothing.
        match d.apply(ev, at(0)) {
            Err(_) => {}
            Ok(again) => {
                assert!(again.is_noop(), "{ev:?} twice: {:?}", again.changes);
                assert_eq!(&again.dispatch, d);
            }
        }
    }

    #[test]
    fn random_sequences_keep_the_invariants() {
        let mut rng = Rng(0x5EED_1234);
        let mut applied = 0;
        let mut seen_dispatch = std::collections::BTreeSet::new();
        let mut seen_recipient = std::collections::BTreeSet::new();
        let mut seen_change = std::collections::BTreeSet::new();
        for _ in 0..3000 {
            let mut d = letter();
            for _ in 0..40 {
                let ev = random_event(&mut rng);
                let now = at(rng.below(2000) as i64);
                match d.apply(&ev, now) {
                    Ok(o) => {
                        check_invariants(&d, &ev, &o);
                        applied += 1;
                        seen_dispatch.insert(o.dispatch.state.as_str());
                        for r in &o.dispatch.recipients {
                            seen_recipient.insert(r.state.as_str());
                        }
                        for c in &o.changes {
                            let v = serde_json::to_value(c).unwrap();
                            seen_change.insert(v["change"].as_str().unwrap().to_owned());
                        }
                        d = o.dispatch;
                    }
                    Err(e) => assert!(!e.to_string().is_empty()),
                }
            }
        }
        assert!(applied > 30_000, "only {applied} events applied");
        // The walk reaches every state and every kind of change.
        assert_eq!(
            seen_dispatch.len(),
            DispatchState::ALL.len(),
            "{seen_dispatch:?}"
        );
        assert_eq!(
            seen_recipient.len(),
            RecipientState::ALL.len(),
            "{seen_recipient:?}"
        );
        assert_eq!(seen_change.len(), 6, "{seen_change:?}");
    }

    fn permutations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
        if items.len() <= 1 {
            return vec![items.to_vec()];
        }
        let mut out = Vec::new();
        for i in 0..items.len() {
            let mut rest = items.to_vec();
            let first = rest.remove(i);
            for mut p in permutations(&rest) {
                p.insert(0, first.clone());
                out.push(p);
            }
        }
        out
    }

    /// Final states do not depend on the order in which receipts are read.
    #[test]
    fn receipt_order_does_not_matter() {
        let sets: Vec<(Vec<Event>, DispatchState, [RecipientState; 3], bool)> = vec![
            (
                vec![
                    acceptance(hours(0)),
                    delivery(A, hours(1)),
                    timeout(B, hours(12), None),
                    timeout(B, hours(23), None),
                    delivery(B, hours(25)),
                ],
                DispatchState::Delivered,
                [
                    RecipientState::Delivered,
                    RecipientState::External,
                    RecipientState::Delivered,
                ],
                false,
            ),
            (
                vec![
                    acceptance(hours(0)),
                    delivery(A, hours(1)),
                    failure(B, hours(2)),
                    timeout(B, hours(24), Some("5.4.1 - x")),
                    non_acceptance(hours(0)),
                ],
                DispatchState::PartiallyDelivered,
                [
                    RecipientState::Delivered,
                    RecipientState::External,
                    RecipientState::Failed,
                ],
                true,
            ),
            (
                vec![
                    acceptance(hours(0)),
                    failure(A, hours(2)),
                    delivery(A, hours(3)),
                    timeout(B, hours(12), None),
                    failure(B, hours(13)),
                ],
                DispatchState::PartiallyDelivered,
                [
                    RecipientState::Delivered,
                    RecipientState::External,
                    RecipientState::Failed,
                ],
                false,
            ),
        ];
        for (events, state, recipients, dispatch_conflict) in sets {
            for order in permutations(&events) {
                let mut d = submitted();
                for ev in &order {
                    let o = apply(&d, ev);
                    check_invariants(&d, ev, &o);
                    d = o.dispatch;
                }
                assert_eq!(d.state, state, "{order:?}");
                let got: Vec<_> = d.recipients.iter().map(|r| r.state).collect();
                assert_eq!(got, recipients, "{order:?}");
                assert_eq!(d.conflict.is_some(), dispatch_conflict, "{order:?}");
                assert_eq!(d.identificativo.as_deref(), Some(ID));
            }
        }
    }

    fn recovered(mid: &str) -> Event {
        Event::AttemptRecovered {
            message_id: mid.into(),
        }
    }

    #[test]
    fn a_lost_attempt_is_recovered_and_its_acceptance_applies() {
        // Restored from a backup taken before the attempt: queued, no attempt.
        let d = letter();
        assert_eq!(
            reject(&d, &receipt(acceptance_facts(ID, at(5)))),
            Rejected::NeverSent(Cause::Acceptance)
        );
        let o = apply(&d, &recovered(MID));
        assert_eq!(o.dispatch.state, DispatchState::Submitted);
        assert_eq!(o.dispatch.submitted_at, Some(at(0)));
        assert_eq!(
            o.changes,
            vec![
                Change::AttemptChanged {
                    message_id: MID.into(),
                    from: None,
                    to: AttemptState::Submitted,
                    cause: Cause::AttemptRecovered,
                },
                Change::DispatchChanged {
                    from: DispatchState::Queued,
                    to: DispatchState::Submitted,
                    cause: Cause::AttemptRecovered,
                },
            ]
        );
        let d = go(&o.dispatch, &receipt(acceptance_facts(ID, at(5))));
        assert_eq!(d.state, DispatchState::Accepted);
        assert_eq!(d.identificativo.as_deref(), Some(ID));
        // The sender would start a new attempt only from queued.
        assert!(matches!(
            reject(&d, &started(MID2)),
            Rejected::WrongState { .. }
        ));
        // The same Message-ID cannot be recovered twice.
        assert_eq!(
            reject(&d, &recovered(MID)),
            Rejected::MessageIdReused(MID.into())
        );
        assert_eq!(reject(&d, &recovered("<>")), Rejected::EmptyMessageId);
    }

    #[test]
    fn recovery_keeps_an_attempt_in_progress_current() {
        // Uncertain → recovered attempt makes it submitted.
        let d = go(&uncertain(), &recovered(MID2));
        assert_eq!(d.state, DispatchState::Submitted);
        // Sending: the attempt in progress stays the last one, its 250 still
        // counts, and the dispatch state is its business.
        let s = go(&letter(), &started(MID));
        let d = go(&s, &recovered(MID2));
        assert_eq!(d.state, DispatchState::Sending);
        assert_eq!(d.current_attempt().unwrap().message_id, MID);
        assert_eq!(d.attempts[0].message_id, MID2);
        let d = go(&d, &Event::Submitted);
        assert_eq!(d.state, DispatchState::Submitted);
        assert_eq!(d.current_attempt().unwrap().state, AttemptState::Submitted);
        // Already accepted: recorded, the state stays.
        let a = go(&submitted(), &receipt(acceptance_facts(ID, at(5))));
        let d = go(&a, &recovered(MID2));
        assert_eq!(d.state, DispatchState::Accepted);
        assert_eq!(d.attempts.len(), 2);
    }
}
