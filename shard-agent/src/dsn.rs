//! Connection strings (DSNs), in both forms tokio-postgres and libpq accept:
//! `key=value` pairs (`host=db user=wallet password='x y'`) and URLs
//! (`postgres://wallet:x@db/wallet?sslmode=require`).
//!
//! Two jobs that tokio-postgres's own parser cannot do for us:
//! - [`redact`]: the DSN with its password replaced by `***`, the only form
//!   of a DSN that may go into a log line or an error message;
//! - [`split_tls_params`]: takes out `sslmode` and `sslrootcert`, because
//!   tokio-postgres rejects `sslmode=verify-ca`/`verify-full` and does not know
//!   `sslrootcert` at all, while operators write them as they would for libpq.

use std::borrow::Cow;
use std::ops::Range;

/// What redaction puts in place of a password.
pub const REDACTED: &str = "***";

/// `dsn` with the password (in a `password=` pair, in a URL's user info, or in
/// a URL's `password` query parameter) replaced by `***`. A key=value DSN that
/// cannot be parsed is cut where parsing failed, so that whatever follows (a
/// password, perhaps) is never shown. URLs of other schemes (`redis://`) are
/// redacted the same way; an `env:`/`file:` reference is shown as it is, since
/// it names where the secret is, not the secret.
pub fn redact(dsn: &str) -> String {
    if crate::secret::is_reference(dsn) {
        return dsn.to_owned();
    }
    match url_rest(dsn).or_else(|| any_url_rest(dsn)) {
        Some(rest) => redact_url(dsn, rest),
        None => redact_key_value(dsn),
    }
}

/// The part after `scheme://` of a URL of any scheme. A key=value DSN never
/// matches: its first keyword is followed by `=`, not by `://`.
fn any_url_rest(dsn: &str) -> Option<&str> {
    let (scheme, rest) = dsn.split_once("://")?;
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    valid.then_some(rest)
}

/// The libpq TLS parameters of a DSN, as written (the last one wins, as in libpq).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsParams {
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
}

/// Why a DSN could not be taken apart. Never quotes the DSN itself.
#[derive(Debug, thiserror::Error)]
#[error("malformed DSN: {0}")]
pub struct MalformedDsn(String);

/// `dsn` without its `sslmode` and `sslrootcert` parameters, and those
/// parameters. Everything else is left byte for byte as it was, for
/// tokio-postgres to parse.
pub fn split_tls_params(dsn: &str) -> Result<(String, TlsParams), MalformedDsn> {
    let mut params = TlsParams::default();
    if let Some(rest) = url_rest(dsn) {
        // tokio-postgres ends the user info at the first '@' and the query
        // starts at the first '?' after it; we split exactly where it will.
        let prefix_len = dsn.len() - rest.len();
        let after_creds = rest.find('@').map_or(0, |at| at + 1);
        let Some(q) = rest[after_creds..].find('?') else {
            return Ok((dsn.to_owned(), params));
        };
        let query_start = prefix_len + after_creds + q + 1;
        let mut kept = Vec::new();
        for pair in dsn[query_start..].split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match percent_decode(key)?.as_ref() {
                "sslmode" => params.sslmode = Some(percent_decode(value)?.into_owned()),
                "sslrootcert" => params.sslrootcert = Some(percent_decode(value)?.into_owned()),
                _ => kept.push(pair),
            }
        }
        let mut out = dsn[..query_start - 1].to_owned();
        if !kept.is_empty() {
            out.push('?');
            out.push_str(&kept.join("&"));
        }
        return Ok((out, params));
    }
    let pairs = key_value_pairs(dsn).map_err(|e| MalformedDsn(e.problem.into()))?;
    let mut out = String::with_capacity(dsn.len());
    let mut from = 0;
    for pair in &pairs {
        let slot = match pair.key {
            "sslmode" => &mut params.sslmode,
            "sslrootcert" => &mut params.sslrootcert,
            _ => continue,
        };
        *slot = Some(pair.value.clone());
        out.push_str(&dsn[from..pair.span.start]);
        from = pair.span.end;
    }
    out.push_str(&dsn[from..]);
    Ok((out, params))
}

/// The part of a URL-style DSN after its scheme, `None` for a key=value DSN.
fn url_rest(dsn: &str) -> Option<&str> {
    ["postgres://", "postgresql://"]
        .iter()
        .find_map(|scheme| dsn.strip_prefix(scheme))
}

fn redact_url(dsn: &str, rest: &str) -> String {
    let scheme = &dsn[..dsn.len() - rest.len()];
    // The last '@', not the first one tokio-postgres would use: a password
    // with an unescaped '@' must not leak its tail as the "host". An '@' in
    // the query instead only makes us hide more than needed.
    let mut out = String::from(scheme);
    let after = match rest.rfind('@') {
        Some(at) => {
            let info = &rest[..at];
            match info.split_once(':') {
                Some((user, _password)) => {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(REDACTED);
                }
                None => out.push_str(info),
            }
            out.push('@');
            &rest[at + 1..]
        }
        None => rest,
    };
    out.push_str(after);
    // Then the query of what is left. A password there hides the rest of the
    // query: an unescaped '&' inside it would otherwise show its tail as a
    // "pair".
    let Some(q) = out[scheme.len()..].find('?').map(|q| q + scheme.len()) else {
        return out;
    };
    let mut kept = Vec::new();
    for pair in out[q + 1..].split('&') {
        let key = pair.split_once('=').map_or(pair, |(key, _)| key);
        if percent_decode(key).map_or(true, |k| k == "password") {
            kept.push(format!("{key}={REDACTED}"));
            break;
        }
        kept.push(pair.to_owned());
    }
    let query = kept.join("&");
    out.truncate(q + 1);
    out.push_str(&query);
    out
}

fn redact_key_value(dsn: &str) -> String {
    let (pairs, cut) = match key_value_pairs(dsn) {
        Ok(pairs) => (pairs, None),
        Err(e) => (e.parsed, Some(e.at)),
    };
    let mut out = String::with_capacity(dsn.len());
    let mut from = 0;
    for pair in pairs.iter().filter(|p| p.key == "password") {
        out.push_str(&dsn[from..pair.value_span.start]);
        out.push_str(REDACTED);
        from = pair.value_span.end;
    }
    match cut {
        None => out.push_str(&dsn[from..]),
        Some(at) => {
            out.push_str(&dsn[from..at]);
            out.push_str(REDACTED);
        }
    }
    out
}

/// One `key=value` pair: `span` covers all of it, `value_span` the value as
/// written (quotes included).
struct Pair<'a> {
    key: &'a str,
    value: String,
    span: Range<usize>,
    value_span: Range<usize>,
}

struct KvError<'a> {
    /// The pairs read before the error.
    parsed: Vec<Pair<'a>>,
    /// Where the pair that failed began: nothing from here on is trusted.
    at: usize,
    problem: &'static str,
}

/// The pairs of a key=value DSN, by libpq's (and tokio-postgres's) rules:
/// whitespace between pairs and around '=', values either bare (ending at
/// whitespace) or in single quotes, a backslash escaping the next character.
fn key_value_pairs(dsn: &str) -> Result<Vec<Pair<'_>>, KvError<'_>> {
    let bytes = dsn.as_bytes();
    let mut pairs = Vec::new();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < bytes.len() && (bytes[i] as char).is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i >= bytes.len() {
            return Ok(pairs);
        }
        let start = i;
        let fail = |pairs, problem| {
            Err(KvError {
                parsed: pairs,
                at: start,
                problem,
            })
        };
        while i < bytes.len() && bytes[i] != b'=' && !(bytes[i] as char).is_ascii_whitespace() {
            i += 1;
        }
        let key = &dsn[start..i];
        i = skip_ws(i);
        if bytes.get(i) != Some(&b'=') {
            return fail(pairs, "expected `=` after a keyword");
        }
        i = skip_ws(i + 1);
        let value_start = i;
        let mut value = String::new();
        if bytes.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => return fail(pairs, "unterminated quoted value"),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < bytes.len() => {
                        let c = next_char(dsn, i + 1);
                        value.push(c);
                        i += 1 + c.len_utf8();
                    }
                    Some(_) => {
                        let c = next_char(dsn, i);
                        value.push(c);
                        i += c.len_utf8();
                    }
                }
            }
        } else {
            while i < bytes.len() && !(bytes[i] as char).is_ascii_whitespace() {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                let c = next_char(dsn, i);
                value.push(c);
                i += c.len_utf8();
            }
            if value.is_empty() {
                return fail(pairs, "a keyword without a value");
            }
        }
        pairs.push(Pair {
            key,
            value,
            span: start..i,
            value_span: value_start..i,
        });
    }
}

fn next_char(s: &str, at: usize) -> char {
    s[at..]
        .chars()
        .next()
        .expect("invariant: `at` is a char boundary inside the string")
}

/// Percent-decoding as tokio-postgres does it for URL parts.
fn percent_decode(s: &str) -> Result<Cow<'_, str>, MalformedDsn> {
    if !s.contains('%') {
        return Ok(Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| MalformedDsn("a percent-encoded part is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn key_value_passwords_are_redacted_quoted_or_not() {
        assert_eq!(
            redact("host=db user=u password=hunter2 dbname=w"),
            "host=db user=u password=*** dbname=w"
        );
        assert_eq!(
            redact("host=db password = 'a b\\' c' dbname=w"),
            "host=db password = *** dbname=w"
        );
        assert_eq!(redact("host=db password='never closed"), "host=db ***");
        assert_eq!(redact("host=db garbage password=x"), "host=db ***");
    }

    #[test]
    fn url_passwords_are_redacted_in_user_info_and_query() {
        assert_eq!(
            redact("postgres://u:hunter2@db:5432/w?sslmode=require"),
            "postgres://u:***@db:5432/w?sslmode=require"
        );
        assert_eq!(
            redact("postgresql://db/w?sslmode=require&password=hunter2&x=y"),
            "postgresql://db/w?sslmode=require&password=***"
        );
        assert_eq!(redact("postgres://u@db/w"), "postgres://u@db/w");
        assert_eq!(
            redact("redis://:hunter2@cache:6379/0"),
            "redis://:***@cache:6379/0"
        );
        assert_eq!(redact("redis://cache:6379/"), "redis://cache:6379/");
        assert_eq!(redact("env:SHARD0_DSN"), "env:SHARD0_DSN");
        assert_eq!(redact("postgres://u:p@ss@db/w"), "postgres://u:***@db/w");
    }

    #[test]
    fn tls_params_are_taken_out_of_key_value_dsns() {
        let (rest, params) = split_tls_params(
            "host=db sslmode=verify-full user=u sslrootcert='/etc/my ca.pem' dbname=w",
        )
        .unwrap();
        assert_eq!(rest, "host=db  user=u  dbname=w");
        assert_eq!(params.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(params.sslrootcert.as_deref(), Some("/etc/my ca.pem"));
        rest.parse::<tokio_postgres::Config>()
            .expect("the rest parses");
    }

    #[test]
    fn tls_params_are_taken_out_of_url_dsns() {
        let (rest, params) = split_tls_params(
            "postgres://u:p%3Fq@db/w?sslmode=verify-ca&application_name=x&sslrootcert=%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p%3Fq@db/w?application_name=x");
        assert_eq!(params.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(params.sslrootcert.as_deref(), Some("/ca.pem"));
        let (rest, params) = split_tls_params("postgres://db/w?sslmode=require").unwrap();
        assert_eq!(rest, "postgres://db/w");
        assert_eq!(params.sslmode.as_deref(), Some("require"));
        let (rest, params) = split_tls_params("postgres://db/w").unwrap();
        assert_eq!(rest, "postgres://db/w");
        assert_eq!(params, TlsParams::default());
    }

    /// Passwords are the only part with upper-case letters, so any leak,
    /// even of one character, shows up as an upper-case letter in the output.
    fn password() -> impl Strategy<Value = String> {
        "[A-Z][A-Z '\\\\@:/?&=%#]{0,16}"
    }

    fn word() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9_]{0,8}"
    }

    /// libpq quoting: a value in single quotes, backslash before `'` and `\`.
    fn quoted(s: &str) -> String {
        format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
    }

    /// Percent-encodes everything but unreserved characters, lower-case hex
    /// (so that the encoding adds no upper-case letters of its own).
    fn encoded(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02x}"),
            })
            .collect()
    }

    proptest! {
        #[test]
        fn key_value_redaction_never_shows_the_password(
            host in word(), user in word(), db in word(), pw in password(),
            pw_first in any::<bool>(),
        ) {
            let pw_pair = format!("password={}", quoted(&pw));
            let dsn = if pw_first {
                format!("{pw_pair} host={host} user={user} dbname={db}")
            } else {
                format!("host={host} user={user} {pw_pair} dbname={db} sslmode=require")
            };
            let parsed: tokio_postgres::Config = dsn.parse().expect("generated DSNs are valid");
            prop_assert_eq!(parsed.get_password(), Some(pw.as_bytes()));
            let shown = redact(&dsn);
            prop_assert!(!shown.chars().any(|c| c.is_ascii_uppercase()), "{}", shown);
            let host_pair = format!("host={host}");
            prop_assert!(shown.contains(&host_pair));
        }

        #[test]
        fn url_redaction_never_shows_the_password(
            host in word(), user in word(), db in word(), pw in password(),
            in_query in any::<bool>(), raw in any::<bool>(),
        ) {
            // `raw`: the password pasted without percent-encoding, which is an
            // invalid DSN but must not leak either.
            let pw_text = if raw { pw.clone() } else { encoded(&pw) };
            let dsn = if in_query {
                format!("postgres://{user}@{host}/{db}?sslmode=require&password={pw_text}")
            } else {
                format!("postgresql://{user}:{pw_text}@{host}:5432/{db}?sslmode=require")
            };
            if !raw {
                let parsed: tokio_postgres::Config = dsn.parse().expect("generated DSNs are valid");
                prop_assert_eq!(parsed.get_password(), Some(pw.as_bytes()));
            }
            let shown = redact(&dsn);
            prop_assert!(!shown.chars().any(|c| c.is_ascii_uppercase()), "{}", shown);
            prop_assert!(shown.contains(&host));
        }

        #[test]
        fn splitting_keeps_every_other_parameter(
            host in word(), user in word(), db in word(), pw in password(),
        ) {
            let dsn = format!(
                "host={host} sslmode=verify-full user={user} password={} sslrootcert=/ca.pem dbname={db}",
                quoted(&pw)
            );
            let (rest, params) = split_tls_params(&dsn).expect("valid");
            prop_assert_eq!(params.sslmode.as_deref(), Some("verify-full"));
            let parsed: tokio_postgres::Config = rest.parse().expect("the rest parses");
            prop_assert_eq!(parsed.get_password(), Some(pw.as_bytes()));
            prop_assert_eq!(parsed.get_user(), Some(user.as_str()));
            prop_assert_eq!(parsed.get_dbname(), Some(db.as_str()));
        }
    }
}
