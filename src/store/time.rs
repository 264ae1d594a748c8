//! How the store writes times: RFC 3339 UTC text, second precision, fixed width.

use jiff::Timestamp;

/// `YYYY-MM-DDTHH:MM:SSZ`; sub-second parts are dropped (floored).
pub(crate) fn fmt(ts: Timestamp) -> String {
    let secs = ts.as_second();
    let secs = if ts.subsec_nanosecond() < 0 {
        secs - 1
    } else {
        secs
    };
    // `secs` comes from a valid Timestamp, floored by at most one second, which stays in
    // range except at Timestamp::MIN, where the original is used instead.
    let whole = Timestamp::from_second(secs).unwrap_or(ts);
    whole.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Reads a time column written by [`fmt`] (any RFC 3339 instant is accepted).
pub(crate) fn parse(text: &str) -> Result<Timestamp, jiff::Error> {
    text.parse()
}

/// The `rusqlite` column reader for a NOT NULL time.
pub(crate) fn col(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Timestamp> {
    let text: String = row.get(idx)?;
    parse(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// The `rusqlite` column reader for a nullable time.
pub(crate) fn col_opt(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Option<Timestamp>> {
    let text: Option<String> = row.get(idx)?;
    text.map(|t| {
        parse(&t).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
        })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_width_utc_seconds() {
        let t: Timestamp = "2026-03-01T09:05:07.999Z".parse().unwrap();
        assert_eq!(fmt(t), "2026-03-01T09:05:07Z");
        let t: Timestamp = "2026-03-01T10:05:07+01:00".parse().unwrap();
        assert_eq!(fmt(t), "2026-03-01T09:05:07Z");
        assert_eq!(
            parse("2026-03-01T09:05:07Z").unwrap(),
            Timestamp::from_second(1_772_355_907).unwrap()
        );
        let before_epoch: Timestamp = "1969-12-31T23:59:59.5Z".parse().unwrap();
        assert_eq!(fmt(before_epoch), "1969-12-31T23:59:59Z");
    }
}
