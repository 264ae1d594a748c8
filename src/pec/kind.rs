//! The PEC classification of a message found in a certified mailbox.

use std::fmt;

use serde::Serialize;

use super::wire;

/// What a message is, as far as PEC is concerned.
///
/// The wire names (Italian) are the `X-Ricevuta` / daticert `tipo` values;
/// [`Kind::Anomaly`], [`Kind::NotPec`] and [`Kind::Unknown`] use the
/// project's own names `anomalia`, `non-pec` and `unknown`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Ricevuta di accettazione: the sender's provider accepted the message.
    #[doc(alias = "accettazione")]
    Acceptance,
    /// Avviso di non accettazione: refused by the sender's provider.
    #[doc(alias = "non-accettazione")]
    NonAcceptance,
    /// Ricevuta di presa in carico (provider to provider; not expected by a user).
    #[doc(alias = "presa-in-carico")]
    TakenInCharge,
    /// Ricevuta di avvenuta consegna: delivered to one recipient.
    #[doc(alias = "avvenuta-consegna")]
    Delivery,
    /// Avviso di mancata consegna: not delivered to one recipient.
    #[doc(alias = "errore-consegna")]
    DeliveryError,
    /// Avviso di mancata consegna per superamento tempi massimi (12 h or 24 h).
    #[doc(alias = "preavviso-errore-consegna")]
    DeliveryTimeout,
    /// Avviso di rilevazione virus (provider to provider).
    #[doc(alias = "rilevazione-virus")]
    VirusDetected,
    /// Busta di trasporto: an incoming certified message.
    #[doc(alias = "posta-certificata")]
    Transport,
    /// Busta di anomalia (`X-Trasporto: errore`): mail without legal value.
    #[doc(alias = "anomalia")]
    Anomaly,
    /// No PEC header at the top level: not a PEC system message.
    #[doc(alias = "non-pec")]
    NotPec,
    /// An `X-Ricevuta` (or `X-Trasporto`) value the rules do not define; the
    /// raw value is kept.
    Unknown(String),
}

impl Kind {
    /// The wire (or project) name of this kind.
    pub fn as_str(&self) -> &str {
        match self {
            Kind::Acceptance => wire::ACCETTAZIONE,
            Kind::NonAcceptance => wire::NON_ACCETTAZIONE,
            Kind::TakenInCharge => wire::PRESA_IN_CARICO,
            Kind::Delivery => wire::AVVENUTA_CONSEGNA,
            Kind::DeliveryError => wire::ERRORE_CONSEGNA,
            Kind::DeliveryTimeout => wire::PREAVVISO_ERRORE_CONSEGNA,
            Kind::VirusDetected => wire::RILEVAZIONE_VIRUS,
            Kind::Transport => wire::POSTA_CERTIFICATA,
            Kind::Anomaly => wire::ANOMALIA,
            Kind::NotPec => wire::NON_PEC,
            Kind::Unknown(_) => wire::UNKNOWN,
        }
    }

    /// Parses an `X-Ricevuta` value (trimmed, case-insensitive). An unknown
    /// value gives [`Kind::Unknown`] with the raw value.
    pub fn from_ricevuta(value: &str) -> Kind {
        let v = value.trim();
        Self::from_daticert_tipo(v)
            .filter(|k| *k != Kind::Transport)
            .unwrap_or_else(|| Kind::Unknown(v.to_owned()))
    }

    /// Parses a daticert `tipo` attribute (trimmed, case-insensitive).
    pub fn from_daticert_tipo(value: &str) -> Option<Kind> {
        let v = value.trim();
        let known = [
            (wire::ACCETTAZIONE, Kind::Acceptance),
            (wire::NON_ACCETTAZIONE, Kind::NonAcceptance),
            (wire::PRESA_IN_CARICO, Kind::TakenInCharge),
            (wire::AVVENUTA_CONSEGNA, Kind::Delivery),
            (wire::ERRORE_CONSEGNA, Kind::DeliveryError),
            (wire::PREAVVISO_ERRORE_CONSEGNA, Kind::DeliveryTimeout),
            (wire::RILEVAZIONE_VIRUS, Kind::VirusDetected),
            (wire::POSTA_CERTIFICATA, Kind::Transport),
        ];
        known
            .into_iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(v))
            .map(|(_, k)| k)
    }

    /// True for the receipts and notices a provider sends to the sender of a
    /// letter (the ones pecgate matches to its dispatches).
    pub fn is_receipt(&self) -> bool {
        matches!(
            self,
            Kind::Acceptance
                | Kind::NonAcceptance
                | Kind::TakenInCharge
                | Kind::Delivery
                | Kind::DeliveryError
                | Kind::DeliveryTimeout
                | Kind::VirusDetected
        )
    }

    /// True for messages a PEC provider generates and signs.
    pub fn is_pec(&self) -> bool {
        !matches!(self, Kind::NotPec)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Kind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ricevuta_values_round_trip() {
        for k in [
            Kind::Acceptance,
            Kind::NonAcceptance,
            Kind::TakenInCharge,
            Kind::Delivery,
            Kind::DeliveryError,
            Kind::DeliveryTimeout,
            Kind::VirusDetected,
        ] {
            assert_eq!(Kind::from_ricevuta(k.as_str()), k);
            assert_eq!(Kind::from_ricevuta(&k.as_str().to_uppercase()), k);
        }
    }

    #[test]
    fn unknown_ricevuta_keeps_raw_value() {
        assert_eq!(
            Kind::from_ricevuta(" mancata-consegna "),
            Kind::Unknown("mancata-consegna".into())
        );
        // posta-certificata is an X-Trasporto value, never an X-Ricevuta one
        assert_eq!(
            Kind::from_ricevuta("posta-certificata"),
            Kind::Unknown("posta-certificata".into())
        );
    }
}
