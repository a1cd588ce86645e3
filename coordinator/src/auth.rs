//! Passwords (argon2id) and session tokens.
//!
//! A token is `<user id, 32 hex>.<32 random bytes, base64url>`: the user ID part
//! routes the lookup to the one shard holding the session, and only a SHA-256 of the
//! whole token is stored, so a leaked sessions table cannot be replayed.

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine;
use rand::RngCore;
use router::UserId;
use sha2::{Digest, Sha256};

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

/// A new session token for `user`.
pub fn new_token(user: UserId) -> String {
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    format!(
        "{}.{}",
        user.as_uuid().simple(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    )
}

/// The user a token claims to belong to (unverified: only for routing).
pub fn token_user(token: &str) -> Option<UserId> {
    let (user, secret) = token.split_once('.')?;
    if user.len() != 32 || secret.is_empty() || secret.len() > 64 {
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
    fn a_token_routes_to_its_user() {
        let user = UserId::for_username("alice");
        let token = new_token(user);
        assert_eq!(token_user(&token), Some(user));
        assert_ne!(new_token(user), token, "tokens are random");
    }

    #[test]
    fn malformed_tokens_route_nowhere() {
        for bad in [
            "",
            "abc",
            "x.y",
            ".",
            "0123456789abcdef0123456789abcdef.",
            "not-hex-not-hex-not-hex-not-hex!.abc",
        ] {
            assert_eq!(token_user(bad), None, "{bad:?}");
        }
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
