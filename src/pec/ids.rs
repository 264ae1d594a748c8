//! Identifiers and addresses: the one place where Message-IDs are
//! normalised and addresses compared.

/// Normalises a Message-ID (or identificativo) for storage and comparison:
/// surrounding whitespace and one pair of angle brackets are removed, as are
/// whitespace characters inside (folding). Returns `None` when nothing is left.
///
/// ```
/// use pecgate::pec::ids::normalize_message_id;
/// assert_eq!(normalize_message_id(" <a.b@c> ").as_deref(), Some("a.b@c"));
/// assert_eq!(normalize_message_id("a.b@c").as_deref(), Some("a.b@c"));
/// assert_eq!(normalize_message_id("<>"), None);
/// ```
pub fn normalize_message_id(raw: &str) -> Option<String> {
    let trimmed = raw.trim();
    let inner = trimmed
        .strip_prefix('<')
        .map(|s| s.strip_suffix('>').unwrap_or(s))
        .unwrap_or(trimmed);
    let cleaned: String = inner.chars().filter(|c| !c.is_whitespace()).collect();
    if cleaned.is_empty() {
        None
    } else {
        Some(cleaned)
    }
}

/// Compares two e-mail addresses the way PEC needs: case-insensitively
/// (providers change case between headers and daticert), ignoring
/// surrounding whitespace and angle brackets.
pub fn same_address(a: &str, b: &str) -> bool {
    bare_address(a).eq_ignore_ascii_case(bare_address(b))
}

/// The canonical form of an address for storage and lookup: trimmed,
/// without angle brackets, lower case.
pub fn canonical_address(a: &str) -> String {
    bare_address(a).to_ascii_lowercase()
}

fn bare_address(a: &str) -> &str {
    let t = a.trim();
    t.strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(t)
        .trim()
}

/// The domain part of an address, if it has one.
pub fn domain_of(address: &str) -> Option<&str> {
    let bare = bare_address(address);
    bare.rsplit_once('@')
        .map(|(_, d)| d)
        .filter(|d| !d.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_lose_brackets_and_folding() {
        assert_eq!(
            normalize_message_id("<RZLFE1$D00882600B@pec.example.it>").as_deref(),
            Some("RZLFE1$D00882600B@pec.example.it")
        );
        assert_eq!(
            normalize_message_id("\r\n <opec.1.2@pec\r\n .example.it>").as_deref(),
            Some("opec.1.2@pec.example.it")
        );
        assert_eq!(normalize_message_id("   "), None);
        assert_eq!(normalize_message_id("<x@y"), Some("x@y".to_owned()));
    }

    #[test]
    fn addresses_compare_case_insensitively() {
        assert!(same_address(
            "Mario.Rossi@PEC.example.it",
            " <mario.rossi@pec.example.it>"
        ));
        assert!(!same_address("a@b.it", "a@c.it"));
        assert_eq!(canonical_address(" <A@B.IT> "), "a@b.it");
        assert_eq!(domain_of("x@pec.example.it"), Some("pec.example.it"));
        assert_eq!(domain_of("nodomain"), None);
    }
}
