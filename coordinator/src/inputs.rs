//! Validating newtypes for what clients send, parsed once at the edge.

use std::fmt;

pub const USERNAME_LEN_MIN: usize = 3;
pub const USERNAME_LEN_MAX: usize = 32;
pub const PASSWORD_LEN_MIN: usize = 8;
pub const PASSWORD_LEN_MAX: usize = 128;
pub const EMAIL_LEN_MAX: usize = 254;
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 255;

/// A username, normalized to lower case. Its user ID (and so its shard) is derived
/// from this normalized form, which is why the alphabet is strict.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Username(String);

impl Username {
    pub fn parse(raw: &str) -> Result<Username, String> {
        let name = raw.trim().to_ascii_lowercase();
        let len_ok = (USERNAME_LEN_MIN..=USERNAME_LEN_MAX).contains(&name.len());
        let chars_ok = name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.' || b == b'-'
        });
        if !len_ok || !chars_ok {
            return Err(format!(
                "username must be {USERNAME_LEN_MIN}-{USERNAME_LEN_MAX} characters of a-z, 0-9, '_', '.', '-'"
            ));
        }
        Ok(Username(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn user_id(&self) -> router::UserId {
        router::UserId::for_username(&self.0)
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    /// A light syntactic check: one '@' with text on both sides and a dot in the
    /// domain. Real verification is a confirmation mail, not a regex.
    pub fn parse(raw: &str) -> Result<Email, String> {
        let email = raw.trim();
        let ok = email.len() <= EMAIL_LEN_MAX
            && !email.chars().any(char::is_whitespace)
            && matches!(email.split_once('@'), Some((local, domain))
                if !local.is_empty() && domain.contains('.') && !domain.contains('@')
                   && !domain.starts_with('.') && !domain.ends_with('.'));
        if !ok {
            return Err("email must look like name@example.com".into());
        }
        Ok(Email(email.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub struct Password(String);

impl Password {
    pub fn parse(raw: &str) -> Result<Password, String> {
        let n = raw.chars().count();
        if !(PASSWORD_LEN_MIN..=PASSWORD_LEN_MAX).contains(&n) {
            return Err(format!(
                "password must be {PASSWORD_LEN_MIN}-{PASSWORD_LEN_MAX} characters"
            ));
        }
        Ok(Password(raw.to_owned()))
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// The Idempotency-Key header: 1-255 visible ASCII characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdemKey(String);

impl IdemKey {
    pub fn parse(raw: &str) -> Result<IdemKey, String> {
        let ok = (1..=IDEMPOTENCY_KEY_LEN_MAX).contains(&raw.len())
            && raw.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(format!(
                "Idempotency-Key must be 1-{IDEMPOTENCY_KEY_LEN_MAX} visible ASCII characters"
            ));
        }
        Ok(IdemKey(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn usernames_are_normalized_to_lower_case() {
        assert_eq!(
            Username::parse(" Alice_1 ").expect("valid").as_str(),
            "alice_1"
        );
        assert_eq!(
            Username::parse("ALICE").expect("valid").user_id(),
            Username::parse("alice").expect("valid").user_id()
        );
    }

    #[test]
    fn bad_usernames_are_rejected() {
        for bad in ["", "ab", "a b", "ålice", "bob!", &"x".repeat(33)] {
            assert!(Username::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn emails_need_a_local_part_and_a_dotted_domain() {
        assert!(Email::parse("a@example.com").is_ok());
        for bad in [
            "",
            "a",
            "@example.com",
            "a@",
            "a@example",
            "a@@example.com",
            "a b@example.com",
            "a@.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn passwords_have_length_bounds() {
        assert!(Password::parse("short").is_err());
        assert!(Password::parse("long enough").is_ok());
        assert!(Password::parse(&"p".repeat(129)).is_err());
    }

    proptest! {
        #[test]
        fn any_valid_username_round_trips(name in "[a-z0-9_.-]{3,32}") {
            let parsed = Username::parse(&name).expect("valid by construction");
            prop_assert_eq!(parsed.as_str(), name.as_str());
        }

        #[test]
        fn idempotency_keys_accept_visible_ascii_only(key in "\\PC{0,300}") {
            let ok = !key.is_empty() && key.len() <= 255 && key.bytes().all(|b| b.is_ascii_graphic());
            prop_assert_eq!(IdemKey::parse(&key).is_ok(), ok);
        }
    }
}
