//! The one place a DSN becomes a connection: every connection to a shard or
//! to the catalog (pools, the catalog client, migrations, cancel requests,
//! the local servers' setup) is made from a [`Connector`].
//!
//! A DSN says how to secure its connection the way libpq does:
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | absent | no (exactly as before TLS support: no TLS code runs) | - |
//! | `disable` | no | - |
//! | `prefer` | if the server offers TLS | no |
//! | `require` | yes | chain, only when `sslrootcert` is given (libpq's rule) |
//! | `verify-ca` | yes | chain against `sslrootcert` |
//! | `verify-full` | yes | chain against `sslrootcert`, and the host name |
//!
//! `sslrootcert` is the path of a PEM file holding the CA certificate(s) to
//! trust. `verify-ca` and `verify-full` need it: there is no fallback to a
//! system store, so a shard is only ever trusted on purpose. It is a DSN
//! parameter, not a separate setting, because DSNs are what the catalog
//! records per shard: every coordinator, migration run and recovery pass that
//! reads a shard's DSN gets its TLS settings with it.
//!
//! TLS is rustls with the ring provider, set per connector rather than as the
//! process default, so no other crate's choice of provider can change ours.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::dsn::{self, MalformedDsn};
use crate::secret::{self, SecretError};

/// Why a DSN cannot be connected with. Its messages name the setting at
/// fault and never quote the DSN's password.
#[derive(Debug, thiserror::Error)]
pub enum DsnError {
    #[error("DSN: {0}")]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Malformed(#[from] MalformedDsn),
    #[error("parse DSN {dsn}: {source}")]
    Parse {
        /// The DSN, redacted.
        dsn: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "sslmode={0} is not supported; use disable, prefer, require, verify-ca or verify-full"
    )]
    UnsupportedSslMode(String),
    #[error(
        "sslmode={0} needs sslrootcert=<PEM file of the CA that signed the server's certificate>"
    )]
    MissingRootCert(&'static str),
    #[error("sslrootcert {}: {problem}", path.display())]
    RootCert { path: PathBuf, problem: String },
}

/// A connection that could not be made: a bad DSN, or the server's (or the
/// network's, or the TLS handshake's) refusal.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Dsn(#[from] DsnError),
    /// Shown with its causes: tokio-postgres's own message is only the kind
    /// ("error performing TLS handshake"), and the reason (an unknown CA, a
    /// name mismatch, a pg_hba.conf refusal) is in the causes.
    #[error("{}", describe(.0))]
    Postgres(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for ConnectError {
    fn from(e: tokio_postgres::Error) -> Self {
        ConnectError::Postgres(e)
    }
}

/// An error and its causes in one line, `outer: inner: innermost`, leaving
/// out a cause whose text the line already has (some errors print their cause
/// themselves).
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

/// The task that drives a connection; spawn it, as with `tokio_postgres::connect`.
pub type Connection = Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send>>;

/// How the server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verify {
    Nothing,
    Chain,
    ChainAndHost,
}

/// A parsed DSN plus the TLS connector its `sslmode` asks for.
#[derive(Clone)]
pub struct Connector {
    config: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
    /// The DSN with its password redacted, for messages.
    shown: String,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("dsn", &self.shown)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Connector {
    /// Resolves an `env:`/`file:` reference, takes out the libpq TLS
    /// parameters, parses the rest and builds the TLS configuration (reading
    /// the CA file now, so a missing file is an error here and not at the
    /// first connection).
    pub fn from_dsn(dsn: &str) -> Result<Connector, DsnError> {
        let dsn = secret::resolve(dsn)?;
        let shown = dsn::redact(&dsn);
        let (rest, params) = dsn::split_tls_params(&dsn)?;
        let mut config: tokio_postgres::Config =
            rest.parse().map_err(|source| DsnError::Parse {
                dsn: shown.clone(),
                source,
            })?;
        let root = params.sslrootcert.as_deref().map(Path::new);
        let (mode, verify) = match params.sslmode.as_deref() {
            None => (None, None),
            Some("disable") => (Some(SslMode::Disable), None),
            Some("prefer") => (Some(SslMode::Prefer), Some(Verify::Nothing)),
            // libpq: `require` with a root certificate file verifies the chain,
            // as `verify-ca` does.
            Some("require") if root.is_some() => (Some(SslMode::Require), Some(Verify::Chain)),
            Some("require") => (Some(SslMode::Require), Some(Verify::Nothing)),
            Some("verify-ca") => (Some(SslMode::Require), Some(Verify::Chain)),
            Some("verify-full") => (Some(SslMode::Require), Some(Verify::ChainAndHost)),
            Some(other) => return Err(DsnError::UnsupportedSslMode(other.into())),
        };
        if let Some(mode) = mode {
            config.ssl_mode(mode);
        }
        let tls = match verify {
            None => None,
            Some(verify) => Some(MakeRustlsConnect::new(client_config(verify, root)?)),
        };
        Ok(Connector { config, tls, shown })
    }

    /// The tokio-postgres settings, for the caller's own additions (timeouts,
    /// session options).
    pub fn config_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.config
    }

    /// Whether connections are (or, with `prefer`, may be) encrypted.
    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The DSN with its password redacted.
    pub fn redacted(&self) -> &str {
        &self.shown
    }

    /// One connection; the returned task must be spawned for it to work.
    pub async fn connect(&self) -> Result<(Client, Connection), tokio_postgres::Error> {
        match &self.tls {
            None => {
                let (client, connection) = self.config.connect(NoTls).await?;
                Ok((client, Box::pin(connection)))
            }
            Some(tls) => {
                let (client, connection) = self.config.connect(tls.clone()).await?;
                Ok((client, Box::pin(connection)))
            }
        }
    }

    /// A connection pool manager on these settings.
    pub fn manager(&self, config: deadpool_postgres::ManagerConfig) -> deadpool_postgres::Manager {
        match &self.tls {
            None => deadpool_postgres::Manager::from_config(self.config.clone(), NoTls, config),
            Some(tls) => {
                deadpool_postgres::Manager::from_config(self.config.clone(), tls.clone(), config)
            }
        }
    }
}

/// Connects with `dsn`; see [`Connector::from_dsn`].
pub async fn connect(dsn: &str) -> Result<(Client, Connection), ConnectError> {
    Ok(Connector::from_dsn(dsn)?.connect().await?)
}

fn client_config(verify: Verify, root: Option<&Path>) -> Result<ClientConfig, DsnError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("invariant: ring's default provider supports the default protocol versions");
    let roots = match (verify, root) {
        (Verify::Nothing, _) => None,
        (_, Some(path)) => Some(Arc::new(read_roots(path)?)),
        (Verify::Chain, None) => return Err(DsnError::MissingRootCert("verify-ca")),
        (Verify::ChainAndHost, None) => return Err(DsnError::MissingRootCert("verify-full")),
    };
    let config = match (verify, roots) {
        (Verify::ChainAndHost, Some(roots)) => {
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (Verify::Chain, Some(roots)) => {
            let inner = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| DsnError::RootCert {
                    path: root.map(Path::to_path_buf).unwrap_or_default(),
                    problem: e.to_string(),
                })?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
                .with_no_client_auth()
        }
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth(),
    };
    Ok(config)
}

fn read_roots(path: &Path) -> Result<RootCertStore, DsnError> {
    let problem = |problem: String| DsnError::RootCert {
        path: path.to_path_buf(),
        problem,
    };
    let pem = std::fs::read(path).map_err(|e| problem(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| problem(format!("not a PEM certificate file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| problem(format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(problem("holds no certificate".into()));
    }
    Ok(roots)
}

/// `verify-ca`: the chain must lead to a trusted CA; the name in the
/// certificate is not compared with the host connected to.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The web PKI verifier checks the chain first and the name last, so a
        // name error means the chain was accepted.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`, and `require` without a CA file: encrypted, but any certificate
/// is accepted, as libpq does. The handshake signatures are still checked, so
/// the session is bound to the certificate the server presented.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_dsns_get_no_tls_connector() {
        for dsn in [
            "host=127.0.0.1 port=5432 user=postgres dbname=x",
            "host=127.0.0.1 sslmode=disable user=postgres",
            "postgres://postgres@127.0.0.1/x",
        ] {
            let c = Connector::from_dsn(dsn).expect("valid");
            assert!(!c.uses_tls(), "{dsn}");
        }
        let c = Connector::from_dsn("host=h sslmode=disable").unwrap();
        assert_eq!(c.config.get_ssl_mode(), SslMode::Disable);
    }

    #[test]
    fn require_encrypts_without_a_ca_and_verify_modes_need_one() {
        let c = Connector::from_dsn("host=h sslmode=require").expect("require alone is fine");
        assert!(c.uses_tls());
        assert_eq!(c.config.get_ssl_mode(), SslMode::Require);
        for mode in ["verify-ca", "verify-full"] {
            let err = Connector::from_dsn(&format!("host=h sslmode={mode}")).unwrap_err();
            assert!(
                err.to_string()
                    .contains(&format!("sslmode={mode} needs sslrootcert")),
                "{err}"
            );
        }
        let err = Connector::from_dsn("host=h sslmode=allow").unwrap_err();
        assert!(matches!(err, DsnError::UnsupportedSslMode(_)), "{err}");
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = Connector::from_dsn(&format!(
            "host=h sslmode=verify-full sslrootcert={}",
            missing.display()
        ))
        .unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = Connector::from_dsn(&format!(
            "postgres://u:pw@h/db?sslmode=verify-ca&sslrootcert={}",
            empty.display()
        ))
        .unwrap_err();
        assert!(err.to_string().contains("holds no certificate"), "{err}");
    }

    #[test]
    fn parse_errors_show_the_dsn_without_its_password() {
        let err = Connector::from_dsn("host=h password=hunter2 port=notanumber").unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains("password=***"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
