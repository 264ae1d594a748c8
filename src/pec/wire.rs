//! Every PEC wire value (Italian, verbatim) in one place.
//!
//! The rest of the crate uses English identifiers and refers to these
//! constants; tests compare against the exact strings found in real receipts.

/// Header carrying the receipt/notice type (`X-Ricevuta`).
pub const H_RICEVUTA: &str = "X-Ricevuta";
/// Header marking a transport or anomaly envelope (`X-Trasporto`).
pub const H_TRASPORTO: &str = "X-Trasporto";
/// Header with the Message-ID of the original message.
pub const H_RIFERIMENTO: &str = "X-Riferimento-Message-ID";
/// Header requesting the delivery receipt flavour (`X-TipoRicevuta`;
/// providers also write `X-Tiporicevuta`).
pub const H_TIPO_RICEVUTA: &str = "X-TipoRicevuta";
/// Header present (value `errore`) on virus notices.
pub const H_VERIFICA_SICUREZZA: &str = "X-VerificaSicurezza";
/// Header naming the original sender on `rilevazione-virus`.
pub const H_MITTENTE: &str = "X-Mittente";

/// `X-Ricevuta` / daticert `tipo` values.
pub const ACCETTAZIONE: &str = "accettazione";
/// Avviso di non accettazione.
pub const NON_ACCETTAZIONE: &str = "non-accettazione";
/// Ricevuta di presa in carico (provider to provider).
pub const PRESA_IN_CARICO: &str = "presa-in-carico";
/// Ricevuta di avvenuta consegna.
pub const AVVENUTA_CONSEGNA: &str = "avvenuta-consegna";
/// Avviso di mancata consegna.
pub const ERRORE_CONSEGNA: &str = "errore-consegna";
/// Avviso di mancata consegna per superamento tempi massimi (12 h and 24 h).
pub const PREAVVISO_ERRORE_CONSEGNA: &str = "preavviso-errore-consegna";
/// Avviso di rilevazione virus (provider to provider).
pub const RILEVAZIONE_VIRUS: &str = "rilevazione-virus";
/// `X-Trasporto` value and daticert `tipo` of a transport envelope.
pub const POSTA_CERTIFICATA: &str = "posta-certificata";
/// `X-Trasporto` value of an anomaly envelope.
pub const TRASPORTO_ERRORE: &str = "errore";
/// Our name for an anomaly envelope (it has no daticert `tipo`).
pub const ANOMALIA: &str = "anomalia";
/// Our name for a message that is not a PEC system message.
pub const NON_PEC: &str = "non-pec";
/// Our name for a message whose `X-Ricevuta` value is not in the rules.
pub const UNKNOWN: &str = "unknown";

/// daticert `errore` values.
pub const ERRORE_NESSUNO: &str = "nessuno";
/// Recipient unknown.
pub const ERRORE_NO_DEST: &str = "no-dest";
/// Domain unknown.
pub const ERRORE_NO_DOMINIO: &str = "no-dominio";
/// Virus found.
pub const ERRORE_VIRUS: &str = "virus";
/// Any other error.
pub const ERRORE_ALTRO: &str = "altro";

/// daticert `destinatari@tipo`: a PEC recipient.
pub const DEST_CERTIFICATO: &str = "certificato";
/// daticert `destinatari@tipo`: an ordinary (non-PEC) recipient.
pub const DEST_ESTERNO: &str = "esterno";

/// Receipt flavours (`X-TipoRicevuta`, daticert `ricevuta@tipo`).
pub const RICEVUTA_COMPLETA: &str = "completa";
/// Breve: attachments replaced by `.hash` parts.
pub const RICEVUTA_BREVE: &str = "breve";
/// Sintetica: no original attached.
pub const RICEVUTA_SINTETICA: &str = "sintetica";

/// Name of the certification data part.
pub const DATICERT_XML: &str = "daticert.xml";
/// Name of the original message part.
pub const POSTACERT_EML: &str = "postacert.eml";
/// Local part of every provider's service address.
pub const SERVICE_LOCAL_PART: &str = "posta-certificata";
/// Display-name prefix of envelopes (`"Per conto di: <sender>"`).
pub const PER_CONTO_DI: &str = "Per conto di: ";

/// Subject prefixes (exact, upper case) of system messages.
pub mod subject {
    /// Acceptance receipt.
    pub const ACCETTAZIONE: &str = "ACCETTAZIONE: ";
    /// Non-acceptance notice.
    pub const NON_ACCETTAZIONE: &str = "AVVISO DI NON ACCETTAZIONE: ";
    /// Non-acceptance notice for a virus.
    pub const NON_ACCETTAZIONE_VIRUS: &str = "AVVISO DI NON ACCETTAZIONE PER VIRUS: ";
    /// Transport envelope.
    pub const POSTA_CERTIFICATA: &str = "POSTA CERTIFICATA: ";
    /// Taken-in-charge receipt.
    pub const PRESA_IN_CARICO: &str = "PRESA IN CARICO: ";
    /// Delivery receipt.
    pub const CONSEGNA: &str = "CONSEGNA: ";
    /// Non-delivery notice.
    pub const MANCATA_CONSEGNA: &str = "AVVISO DI MANCATA CONSEGNA: ";
    /// Non-delivery notice for a virus.
    pub const MANCATA_CONSEGNA_VIRUS: &str = "AVVISO DI MANCATA CONSEGNA PER VIRUS: ";
    /// Timeout notices (12 h and 24 h).
    pub const MANCATA_CONSEGNA_TEMPO: &str = "AVVISO DI MANCATA CONSEGNA PER SUP. TEMPO MASSIMO: ";
    /// Virus detected (provider to provider).
    pub const PROBLEMA_SICUREZZA: &str = "PROBLEMA DI SICUREZZA: ";
    /// Anomaly envelope.
    pub const ANOMALIA: &str = "ANOMALIA MESSAGGIO: ";
}
