//! Passwords (argon2id) and session tokens.
//!
//! A token is `<username>~<32 random bytes, base64url>`. The username routes the
//! lookup to the one shard holding the session (a user's ID is derived from their
//! name), and it is what `POST /v1/transfer` needs to queue a transfer before the
//! session is read: the read then happens on the payer's shard inside the
//! transfer's own check (`wallet_batch_check`). Only a SHA-256 of the whole token is
//! stored, so a leaked sessions table cannot be replayed. Tokens of the earlier
//! format, `<user id, 32 hex>.<secret>`, still route and are read as before.

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine;
use rand::RngCore;
use router::UserId;
use sha2::{Digest, Sha256};

use crate::inputs::Username;

/// Separates a token's username from its secret; neither may contain it.
const TOKEN_SEPARATOR: char = '~';
/// Longest secret part a token may carry (ours are 43 characters).
const TOKEN_SECRET_LEN_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("argon2 parameters rejected: {0}")]
    Params(String),
    #[error("hash password: {0}")]
    Hash(String),
}

#[derive(Clone, Copy, Debug)]
pub struct PasswordPolicy {
    pub memory_kib: u32,
    pub iterations: u32,
}

impl PasswordPolicy {
    fn argon2(&self) -> Result<Argon2<'static>, AuthError> {
        let params = Params::new(self.memory_kib, self.iterations, 1, None)
            .map_err(|e| AuthError::Params(e.to_string()))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }

    /// Hashes on the blocking pool: argon2 is deliberately slow.
    pub async fn hash(self, password: String) -> Result<String, AuthError> {
        tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut OsRng);
            self.argon2()?
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| AuthError::Hash(e.to_string()))
        })
        .await
        .map_err(|e| AuthError::Hash(e.to_string()))?
    }

    /// Verifies against a stored PHC string (its own parameters apply). With no
    /// stored hash it still does the work, so unknown usernames take as long.
    pub async fn verify(self, password: String, stored: Option<String>) -> bool {
        tokio::task::spawn_blocking(move || {
            let Ok(argon2) = self.argon2() else {
                return false;
            };
            match stored {
                Some(phc) => match PasswordHash::new(&phc) {
                    Ok(parsed) => argon2.verify_password(password.as_bytes(), &parsed).is_ok(),
                    Err(_) => false,
                },
                None => {
                    let salt = SaltString::generate(&mut OsRng);
                    let _ = argon2.hash_password(password.as_bytes(), &salt);
                    false
                }
            }
        })
        .await
        .unwrap_or(false)
    }
}

/// 32 random bytes, base64url: a token's secret, or the dev cluster's admin token.
pub fn random_secret() -> String {
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
}

/// A new session token for the user named `username`.
pub fn new_token(username: &Username) -> String {
    format!("{username}{TOKEN_SEPARATOR}{}", random_secret())
}

/// The user a token names, unverified: only for routing, or for a transfer whose
/// payer's session is read later on the payer's shard. `None` for a token of the
/// earlier format, or one that is malformed.
pub fn token_username(token: &str) -> Option<Username> {
    let (name, secret) = token.split_once(TOKEN_SEPARATOR)?;
    let secret_ok = (1..=TOKEN_SECRET_LEN_MAX).contains(&secret.len())
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !secret_ok {
        return None;
    }
    // Only the canonical spelling `new_token` writes: the name routes the read.
    Username::parse(name).ok().filter(|u| u.as_str() == name)
}

/// The user a token claims to belong to (unverified: only for routing).
pub fn token_user(token: &str) -> Option<UserId> {
    if let Some(name) = token_username(token) {
        return Some(name.user_id());
    }
    let (user, secret) = token.split_once('.')?;
    if user.len() != 32
        || secret.is_empty()
        || secret.len() > TOKEN_SECRET_LEN_MAX
        || secret.contains(TOKEN_SEPARATOR)
    {
        return None;
    }
    uuid::Uuid::try_parse(user).ok().map(UserId)
}

pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_and_routes_to_its_user() {
        let alice = Username::parse("alice.b-2").expect("a valid name");
        let token = new_token(&alice);
        assert_eq!(
            token_username(&token).map(|u| u.as_str().to_owned()),
            Some("alice.b-2".to_owned())
        );
        assert_eq!(token_user(&token), Some(UserId::for_username("alice.b-2")));
        assert_ne!(new_token(&alice), token, "tokens are random");
    }

    #[test]
    fn a_token_of_the_earlier_format_still_routes_but_names_nobody() {
        let user = UserId::for_username("alice");
        let token = format!("{}.{}", user.as_uuid().simple(), random_secret());
        assert_eq!(token_user(&token), Some(user));
        assert_eq!(token_username(&token).map(|u| u.to_string()), None);
    }

    #[test]
    fn malformed_tokens_route_nowhere() {
        for bad in [
            "",
            "abc",
            "x.y",
            ".",
            "~",
            "alice~",
            "~secret",
            "Alice~secret",
            " alice~secret",
            "al ice~secret",
            "a~b~c",
            "abc~b~c",
            "abc~s3cr.t",
            "0123456789abcdef0123456789abcdef.",
            "0123456789abcdef0123456789abcdef.a~b",
            "not-hex-not-hex-not-hex-not-hex!.abc",
        ] {
            assert_eq!(token_user(bad), None, "{bad:?}");
        }
        let long = format!("alice~{}", "x".repeat(TOKEN_SECRET_LEN_MAX + 1));
        assert_eq!(token_user(&long), None, "an overlong secret");
    }

    #[tokio::test]
    async fn passwords_verify_only_against_their_own_hash() {
        let policy = PasswordPolicy {
            memory_kib: 64,
            iterations: 1,
        };
        let hash = policy.hash("correct horse".into()).await.expect("hash");
        assert!(
            policy
                .verify("correct horse".into(), Some(hash.clone()))
                .await
        );
        assert!(!policy.verify("wrong horse".into(), Some(hash)).await);
        assert!(!policy.verify("anything".into(), None).await);
    }
}
