//! Secrets kept out of configuration files: a value written as `env:NAME` is
//! read from the environment variable `NAME`, one written as `file:/path` from
//! that file (trailing line breaks dropped, as secret files written by `echo`
//! or mounted by an orchestrator end with one). Any other value is taken as it
//! is written.
//!
//! It lives in the shard agent because DSNs are resolved where connections are
//! made: the catalog records a shard's DSN as written (`env:...`), so no
//! password is ever stored in the catalog, and each coordinator reads the
//! current value from its own environment.

use std::borrow::Cow;
use std::path::PathBuf;

/// Why a reference could not be resolved. Names the variable or the file,
/// never a value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {var} is not set")]
    EnvMissing { var: String },
    #[error("environment variable {var} is not valid UTF-8")]
    EnvNotUnicode { var: String },
    #[error("read secret file {}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secret file {} is not valid UTF-8", path.display())]
    FileNotUnicode { path: PathBuf },
    #[error("{what} is empty")]
    Empty { what: String },
}

/// The value `value` stands for: itself, or what its `env:`/`file:` reference
/// points at. Empty results are refused, since an empty password or token is
/// always a mistake in deployment (an unset variable exported as "").
pub fn resolve(value: &str) -> Result<Cow<'_, str>, SecretError> {
    if let Some(var) = value.strip_prefix("env:") {
        let found = match std::env::var(var) {
            Ok(v) => v,
            Err(std::env::VarError::NotPresent) => {
                return Err(SecretError::EnvMissing { var: var.into() })
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(SecretError::EnvNotUnicode { var: var.into() })
            }
        };
        if found.is_empty() {
            return Err(SecretError::Empty {
                what: format!("environment variable {var}"),
            });
        }
        return Ok(Cow::Owned(found));
    }
    if let Some(path) = value.strip_prefix("file:") {
        let path = PathBuf::from(path);
        let bytes = std::fs::read(&path).map_err(|source| SecretError::File {
            path: path.clone(),
            source,
        })?;
        let text = String::from_utf8(bytes)
            .map_err(|_| SecretError::FileNotUnicode { path: path.clone() })?;
        let trimmed = text.trim_end_matches(['\n', '\r']);
        if trimmed.is_empty() {
            return Err(SecretError::Empty {
                what: format!("secret file {}", path.display()),
            });
        }
        return Ok(Cow::Owned(trimmed.to_owned()));
    }
    Ok(Cow::Borrowed(value))
}

/// Whether `value` is an `env:`/`file:` reference rather than a literal.
pub fn is_reference(value: &str) -> bool {
    value.starts_with("env:") || value.starts_with("file:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_pass_through_unchanged() {
        assert_eq!(resolve("host=db user=u").unwrap(), "host=db user=u");
        assert!(matches!(resolve("plain").unwrap(), Cow::Borrowed(_)));
    }

    #[test]
    fn env_references_read_the_variable_and_name_it_when_missing() {
        // Names unique to this test: the environment is shared by every test thread.
        std::env::set_var("SHARD_AGENT_SECRET_TEST_SET", "s3cret");
        assert_eq!(
            resolve("env:SHARD_AGENT_SECRET_TEST_SET").unwrap(),
            "s3cret"
        );
        let err = resolve("env:SHARD_AGENT_SECRET_TEST_UNSET").unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable SHARD_AGENT_SECRET_TEST_UNSET is not set"
        );
        std::env::set_var("SHARD_AGENT_SECRET_TEST_EMPTY", "");
        assert!(matches!(
            resolve("env:SHARD_AGENT_SECRET_TEST_EMPTY"),
            Err(SecretError::Empty { .. })
        ));
    }

    #[test]
    fn file_references_drop_the_trailing_newline_and_name_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "t0ken with spaces \n").unwrap();
        assert_eq!(
            resolve(&format!("file:{}", path.display())).unwrap(),
            "t0ken with spaces "
        );
        let missing = dir.path().join("missing");
        let err = resolve(&format!("file:{}", missing.display())).unwrap_err();
        assert!(err.to_string().contains(&missing.display().to_string()));
    }
}
