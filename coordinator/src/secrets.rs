//! Secrets in the configuration: where they may come from, and how they are
//! kept out of logs.
//!
//! Any of these configuration values may be written as `env:NAME` (read from
//! the environment variable `NAME`) or `file:/path` (read from that file,
//! trailing line breaks dropped) instead of the value itself:
//! - `catalog_dsn` and every `shards[].dsn`: the variable or file holds the
//!   whole DSN. These are checked here but resolved only when a connection is
//!   made ([`shard_agent::tls`]), so the catalog records a shard's DSN as
//!   written (`env:...`) and never holds its password;
//! - `admin_token` and `redis.url`: resolved here, once, at load time.
//!
//! A new secret setting (a payment provider's key, say) gets the type
//! [`Secret`] and one line in [`resolve_config`].
//!
//! Values are never printed: [`Secret`] shows as `***` and [`Dsn`] with its
//! password redacted, so `Config`'s Debug output can be logged as it is.

use std::ops::Deref;

use serde::{Deserialize, Serialize};
pub use shard_agent::secret::{resolve, SecretError};

use crate::config::Config;

/// A value that must not be logged: Debug and Display show `***`. Read it
/// with [`Secret::expose`] (or through `Deref`), only where it is used.
///
/// It serializes as the value itself, since the one place a config is
/// written back is `wallet dev`'s cluster.json, which holds the token it
/// generated.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Deref for Secret {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(shard_agent::dsn::REDACTED)
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(shard_agent::dsn::REDACTED)
    }
}

/// A DSN (or an `env:`/`file:` reference to one) whose Debug and Display
/// show it with its password redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Dsn(String);

impl Deref for Dsn {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<String> for Dsn {
    fn from(value: String) -> Self {
        Dsn(value)
    }
}

impl From<&str> for Dsn {
    fn from(value: &str) -> Self {
        Dsn(value.to_owned())
    }
}

impl std::fmt::Debug for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", shard_agent::dsn::redact(&self.0))
    }
}

impl std::fmt::Display for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&shard_agent::dsn::redact(&self.0))
    }
}

/// A setting whose `env:`/`file:` reference could not be resolved. Names the
/// setting and the variable or file, never a value.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {source}")]
pub struct SettingError {
    pub setting: String,
    #[source]
    pub source: SecretError,
}

/// Resolves the references of the settings the coordinator uses itself, and
/// checks that the DSN references resolve (so a missing variable stops the
/// start with its name, not a later connection attempt).
pub fn resolve_config(config: &mut Config) -> Result<(), SettingError> {
    let at = |setting: &str| {
        let setting = setting.to_owned();
        move |source| SettingError { setting, source }
    };
    resolve(&config.catalog_dsn).map_err(at("catalog_dsn"))?;
    for (i, shard) in config.shards.iter().enumerate() {
        resolve(&shard.dsn).map_err(at(&format!("shards[{i}].dsn")))?;
    }
    if let Some(token) = &mut config.admin_token {
        *token = Secret(resolve(token).map_err(at("admin_token"))?.into_owned());
    }
    if let Some(redis) = &mut config.redis {
        redis.url = resolve(&redis.url).map_err(at("redis.url"))?.into_owned();
    }
    if let Some(crate::payments::ProviderConfig::Http(http)) = &mut config.payment_provider {
        http.api_key = resolve(&http.api_key)
            .map_err(at("payment_provider.api_key"))?
            .into_owned();
        if let Some(secret) = &mut http.webhook_secret {
            *secret = resolve(secret)
                .map_err(at("payment_provider.webhook_secret"))?
                .into_owned();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn write_config(
        dir: &Path,
        catalog_dsn: &str,
        admin_token: &str,
        shard_dsn: &str,
        redis_url: &str,
    ) -> std::path::PathBuf {
        let path = dir.join("config.json");
        let config = serde_json::json!({
            "listen": "127.0.0.1:0",
            "catalog_dsn": catalog_dsn,
            "shards": [{"id": 0, "dsn": shard_dsn, "weight": 1}],
            "admin_token": admin_token,
            "redis": {"url": redis_url},
        });
        std::fs::write(&path, config.to_string()).expect("write test config");
        path
    }

    #[test]
    fn env_and_file_references_resolve_at_load_and_never_show_in_debug() {
        let dir = tempfile::tempdir().expect("temp dir");
        let token_file = dir.path().join("admin-token");
        std::fs::write(&token_file, "Tok3n-from-a-file\n").expect("write token");
        // Variable names unique to this test: the environment is process-wide.
        std::env::set_var(
            "COORDINATOR_SECRETS_TEST_CATALOG",
            "host=db user=wallet password=Cat4logPassw0rd dbname=catalog",
        );
        std::env::set_var(
            "COORDINATOR_SECRETS_TEST_REDIS",
            "redis://:Red1sPassw0rd@cache:6379/",
        );
        let path = write_config(
            dir.path(),
            "env:COORDINATOR_SECRETS_TEST_CATALOG",
            &format!("file:{}", token_file.display()),
            "postgres://wallet:Sh4rdPassw0rd@db/shard0?sslmode=require",
            "env:COORDINATOR_SECRETS_TEST_REDIS",
        );
        let config = Config::load(&path).expect("loads");
        assert_eq!(
            config.admin_token.as_deref(),
            Some("Tok3n-from-a-file"),
            "the file's trailing newline is dropped"
        );
        assert_eq!(
            config.redis.as_ref().map(|r| r.url.as_str()),
            Some("redis://:Red1sPassw0rd@cache:6379/")
        );
        // DSN references stay as written: the catalog records them so.
        assert_eq!(&*config.catalog_dsn, "env:COORDINATOR_SECRETS_TEST_CATALOG");
        let shown = format!("{config:?} {:?} {}", config.shards, config.catalog_dsn);
        for secret in ["Tok3n", "Cat4log", "Red1s", "Sh4rd"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("postgres://wallet:***@db/shard0"), "{shown}");
        assert!(shown.contains("redis://:***@cache:6379/"), "{shown}");
        assert!(
            shown.contains("env:COORDINATOR_SECRETS_TEST_CATALOG"),
            "{shown}"
        );
    }

    #[test]
    fn a_missing_variable_or_file_is_named_in_the_load_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = write_config(
            dir.path(),
            "host=db dbname=catalog",
            "env:COORDINATOR_SECRETS_TEST_NO_SUCH_TOKEN",
            "host=db dbname=shard0",
            "redis://cache:6379/",
        );
        let err = Config::load(&path)
            .expect_err("the variable is not set")
            .to_string();
        assert!(
            err.contains("admin_token: environment variable COORDINATOR_SECRETS_TEST_NO_SUCH_TOKEN is not set"),
            "{err}"
        );
        let missing = dir.path().join("no-such-dsn-file");
        let path = write_config(
            dir.path(),
            "host=db dbname=catalog",
            "literal-token",
            &format!("file:{}", missing.display()),
            "redis://cache:6379/",
        );
        let err = Config::load(&path)
            .expect_err("the file is missing")
            .to_string();
        assert!(err.contains("shards[0].dsn: read secret file"), "{err}");
        assert!(err.contains("no-such-dsn-file"), "{err}");
    }

    #[test]
    fn secrets_print_as_stars() {
        let s = Secret::from("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
        let d = Dsn::from("host=h password=hunter2");
        assert_eq!(format!("{d}"), "host=h password=***");
        assert_eq!(format!("{d:?}"), "\"host=h password=***\"");
    }
}
