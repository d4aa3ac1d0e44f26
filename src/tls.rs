//! TLS as libpq does it: `sslmode`, `sslrootcert`, `sslcert` and `sslkey` mean what
//! they mean in libpq, over rustls (the `tls` cargo feature, on by default).
//!
//! What is handed to tokio-postgres is a plain `SslMode` (`disable`, `prefer` or
//! `require`) and a connector that verifies as much as the `sslmode` asks: nothing for
//! `require` without a root certificate, the chain for `verify-ca` (and for `require`
//! with one, as libpq), chain and host name for `verify-full`.

use std::fmt;
#[cfg(feature = "tls")]
use std::path::Path;
use std::path::PathBuf;
use std::str::FromStr;

use tokio_postgres::config::{Host, SslMode as DriverSslMode};

use crate::error::{Error, ErrorKind, Result};

/// How much TLS a connection needs, with libpq's names and meanings.
///
/// ```
/// use pgengine::SslMode;
/// assert_eq!("verify-full".parse::<SslMode>().unwrap(), SslMode::VerifyFull);
/// assert!("verify".parse::<SslMode>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Plaintext first; TLS only if the server refuses plaintext.
    Allow,
    /// TLS if the server offers it, else plaintext (the default).
    Prefer,
    /// TLS always; the certificate is checked only when a root certificate is given.
    Require,
    /// TLS, and the server's certificate must chain to the root certificate.
    VerifyCa,
    /// TLS, the certificate must chain to the root certificate and name the host.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = Error;

    fn from_str(value: &str) -> Result<Self> {
        Ok(match value {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => {
                return Err(config_error(format!(
                    "invalid sslmode value {value:?} (expected disable, allow, prefer, require, \
                     verify-ca or verify-full)"
                )));
            }
        })
    }
}

/// Where the trusted root certificates come from (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RootCert {
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// The platform's trusted roots (`sslrootcert=system`).
    System,
}

impl RootCert {
    /// `system`, else a file name.
    pub(crate) fn parse(value: &str) -> Self {
        match value {
            "system" => Self::System,
            path => Self::File(PathBuf::from(path)),
        }
    }
}

/// The TLS parameters given in the URL or on the builder.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct TlsSettings {
    pub mode: Option<SslMode>,
    pub root_cert: Option<RootCert>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsSettings {
    /// These settings with those set in `over` replacing them.
    pub(crate) fn overridden_by(mut self, over: &TlsSettings) -> Self {
        self.mode = over.mode.or(self.mode);
        self.root_cert = over.root_cert.clone().or(self.root_cert);
        self.cert = over.cert.clone().or(self.cert);
        self.key = over.key.clone().or(self.key);
        self
    }
}

/// How connections are made: the mode handed to tokio-postgres and the connector.
#[derive(Clone)]
pub(crate) struct Tls {
    /// The driver's mode for the first attempt.
    pub mode: DriverSslMode,
    /// `sslmode=allow`: when the plaintext attempt fails, try again with TLS.
    pub retry_with_tls: bool,
    /// The connector (unused with `DriverSslMode::Disable`).
    pub connector: Connector,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("mode", &self.mode)
            .field("retry_with_tls", &self.retry_with_tls)
            .finish_non_exhaustive()
    }
}

/// The TLS connector type: rustls with the `tls` feature, else none.
#[cfg(feature = "tls")]
pub(crate) type Connector = tokio_postgres_rustls::MakeRustlsConnect;
/// The TLS connector type: rustls with the `tls` feature, else none.
#[cfg(not(feature = "tls"))]
pub(crate) type Connector = tokio_postgres::NoTls;

impl Tls {
    /// Resolves the settings as libpq does, reading the certificate files now, so that
    /// a missing or unreadable file is a `Config` error naming its parameter.
    pub(crate) fn resolve(settings: &TlsSettings, hosts: &[Host]) -> Result<Self> {
        let root_cert = settings.root_cert.clone();
        let mode = match (settings.mode, &root_cert) {
            (None, Some(RootCert::System)) => SslMode::VerifyFull,
            (Some(mode), Some(RootCert::System)) if mode != SslMode::VerifyFull => {
                return Err(config_error(
                    "sslrootcert=system requires sslmode=verify-full (weaker modes would not \
                     check the host name against the system's roots)",
                ));
            }
            (mode, _) => mode.unwrap_or(SslMode::Prefer),
        };
        // PostgreSQL never uses TLS over unix sockets; libpq ignores sslmode there.
        let only_sockets = !hosts.is_empty() && hosts.iter().all(|h| !matches!(h, Host::Tcp(_)));
        if mode == SslMode::Disable || only_sockets {
            return Ok(Self::plain());
        }
        Self::with_tls(mode, root_cert, settings)
    }

    /// No TLS.
    pub(crate) fn plain() -> Self {
        Self {
            mode: DriverSslMode::Disable,
            retry_with_tls: false,
            connector: plain_connector(),
        }
    }

    #[cfg(not(feature = "tls"))]
    fn with_tls(mode: SslMode, _: Option<RootCert>, _: &TlsSettings) -> Result<Self> {
        match mode {
            // libpq built without TLS treats these as `disable`.
            SslMode::Allow | SslMode::Prefer => Ok(Self::plain()),
            _ => Err(config_error(format!(
                "sslmode={} needs TLS, and pgengine was built without its `tls` feature",
                mode.name()
            ))),
        }
    }

    #[cfg(feature = "tls")]
    fn with_tls(
        mode: SslMode,
        root_cert: Option<RootCert>,
        settings: &TlsSettings,
    ) -> Result<Self> {
        let root_cert = root_cert.or_else(|| default_file("root.crt").map(RootCert::File));
        let verify = match (mode, &root_cert) {
            (SslMode::VerifyFull, Some(_)) => rustls_config::Verify::Full,
            (SslMode::VerifyCa, Some(_)) => rustls_config::Verify::Chain,
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(config_error(format!(
                    "sslmode={} needs a root certificate: give sslrootcert=<file> (or \
                     sslrootcert=system for the platform's roots), or put one at \
                     ~/.postgresql/root.crt",
                    mode.name()
                )));
            }
            (_, Some(_)) => rustls_config::Verify::Chain, // as libpq: a root cert is used
            (_, None) => rustls_config::Verify::Nothing,
        };
        let client = client_identity(settings)?;
        let config = rustls_config::client_config(verify, root_cert.as_ref(), client)?;
        Ok(Self {
            mode: match mode {
                SslMode::Allow => DriverSslMode::Disable,
                SslMode::Prefer => DriverSslMode::Prefer,
                _ => DriverSslMode::Require,
            },
            retry_with_tls: mode == SslMode::Allow,
            connector: tokio_postgres_rustls::MakeRustlsConnect::new(config),
        })
    }
}

impl deadpool_postgres::Connect for Tls {
    /// Opens a connection as the driver does, with this connector; for `sslmode=allow`,
    /// a failed plaintext attempt is made again with TLS, as libpq does.
    fn connect(
        &self,
        pg: &tokio_postgres::Config,
    ) -> futures::future::BoxFuture<
        '_,
        std::result::Result<
            (tokio_postgres::Client, tokio::task::JoinHandle<()>),
            tokio_postgres::Error,
        >,
    > {
        let pg = pg.clone();
        Box::pin(async move {
            let (client, connection) = match pg.connect(self.connector.clone()).await {
                Err(_) if self.retry_with_tls => {
                    let mut pg = pg;
                    pg.ssl_mode(DriverSslMode::Require);
                    pg.connect(self.connector.clone()).await?
                }
                connected => connected?,
            };
            let task = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(target: "pgengine::pool", error = %e, "connection closed with an error");
                }
            });
            Ok((client, task))
        })
    }
}

impl SslMode {
    /// The libpq name.
    fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(feature = "tls")]
fn plain_connector() -> Connector {
    rustls_config::plain_connector()
}

#[cfg(not(feature = "tls"))]
fn plain_connector() -> Connector {
    tokio_postgres::NoTls
}

/// `~/.postgresql/<name>` when it exists (libpq's default certificate files).
#[cfg(feature = "tls")]
fn default_file(name: &str) -> Option<PathBuf> {
    let path = Path::new(&std::env::var_os("HOME")?)
        .join(".postgresql")
        .join(name);
    path.exists().then_some(path)
}

/// The client certificate and key: `sslcert`/`sslkey`, else libpq's default files when
/// both exist.
#[cfg(feature = "tls")]
fn client_identity(settings: &TlsSettings) -> Result<Option<(PathBuf, PathBuf)>> {
    match (&settings.cert, &settings.key) {
        (Some(cert), Some(key)) => Ok(Some((cert.clone(), key.clone()))),
        (Some(cert), None) => {
            let key = cert.with_extension("key");
            if !key.exists() {
                return Err(config_error(format!(
                    "sslcert is given but sslkey is not (and {} does not exist)",
                    key.display()
                )));
            }
            Ok(Some((cert.clone(), key)))
        }
        (None, Some(_)) => Err(config_error("sslkey is given but sslcert is not")),
        (None, None) => Ok(default_file("postgresql.crt").zip(default_file("postgresql.key"))),
    }
}

/// A `Config` error.
pub(crate) fn config_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, message)
}

/// Reads a certificate or key file, naming the parameter when it cannot.
#[cfg(feature = "tls")]
fn read_file(parameter: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| config_error(format!("{parameter}: cannot read {}: {e}", path.display())))
}

#[cfg(feature = "tls")]
mod rustls_config {
    //! rustls client configurations for each level of verification.

    #[cfg(feature = "tls")]
    use std::path::Path;
    use std::path::PathBuf;
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::client::{ClientConfig, WebPkiServerVerifier};
    use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

    use super::{RootCert, config_error, read_file};
    use crate::error::Result;

    /// What is checked of the server's certificate.
    pub(super) enum Verify {
        /// Nothing (`require` without a root certificate): encrypted, not authenticated.
        Nothing,
        /// The chain to a trusted root, not the host name (`verify-ca`).
        Chain,
        /// The chain and the host name (`verify-full`).
        Full,
    }

    /// ring: no C toolchain beyond a C compiler, unlike aws-lc-rs (rustls' default,
    /// hence ring's provider is marked deprecated for lacking post-quantum key exchange).
    #[allow(deprecated)]
    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A connector for sessions that never use TLS.
    pub(super) fn plain_connector() -> tokio_postgres_rustls::MakeRustlsConnect {
        let verifier = Arc::new(NoVerification(provider().signature_verification_algorithms));
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        tokio_postgres_rustls::MakeRustlsConnect::new(config)
    }

    /// The client configuration for `verify`, trusting `root_cert`, presenting `client`.
    pub(super) fn client_config(
        verify: Verify,
        root_cert: Option<&RootCert>,
        client: Option<(PathBuf, PathBuf)>,
    ) -> Result<ClientConfig> {
        let provider = provider();
        let algorithms = provider.signature_verification_algorithms;
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(format!("TLS: {e}")))?;
        let verifier: Arc<dyn ServerCertVerifier> = match verify {
            Verify::Nothing => Arc::new(NoVerification(algorithms)),
            Verify::Chain | Verify::Full => {
                let roots = Arc::new(root_store(root_cert.expect("verification has roots"))?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| config_error(format!("sslrootcert: {e}")))?;
                match verify {
                    Verify::Full => webpki,
                    _ => Arc::new(ChainOnly(webpki)),
                }
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        match client {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let chain = certificates("sslcert", &cert)?;
                let key = private_key(&key)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| config_error(format!("sslcert/sslkey: {e}")))
            }
        }
    }

    fn root_store(root_cert: &RootCert) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        match root_cert {
            RootCert::File(path) => {
                for cert in certificates("sslrootcert", path)? {
                    roots.add(cert).map_err(|e| {
                        config_error(format!("sslrootcert: {}: {e}", path.display()))
                    })?;
                }
            }
            RootCert::System => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(config_error(
                        "sslrootcert=system: the platform has no trusted root certificates",
                    ));
                }
            }
        }
        Ok(roots)
    }

    /// The PEM certificates of a file; none is an error.
    fn certificates(parameter: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
        let pem = read_file(parameter, path)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| config_error(format!("{parameter}: {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(config_error(format!(
                "{parameter}: {} holds no PEM certificate",
                path.display()
            )));
        }
        Ok(certs)
    }

    /// The private key of `sslkey`, refused (as libpq does) when others may read it.
    fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)
            .map_err(|e| config_error(format!("sslkey: cannot read {}: {e}", path.display())))?;
        let own = meta.uid() == rustix::process::geteuid().as_raw();
        let allowed = if own { 0o600 } else { 0o640 };
        if meta.mode() & 0o777 & !allowed != 0 {
            return Err(config_error(format!(
                "sslkey: {} has group or world access; its permissions should be u=rw (0600) \
                 or less",
                path.display()
            )));
        }
        let pem = read_file("sslkey", path)?;
        PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|e| config_error(format!("sslkey: {}: {e}", path.display())))
    }

    /// Accepts any certificate (the handshake's signatures are still checked): what
    /// libpq's `require` does without a root certificate.
    #[derive(Debug)]
    struct NoVerification(WebPkiSupportedAlgorithms);

    impl ServerCertVerifier for NoVerification {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> std::result::Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_schemes()
        }
    }

    /// Checks the chain, not the host name (`verify-ca`): webpki checks the chain
    /// first, so a name mismatch means the chain was good.
    #[derive(Debug)]
    struct ChainOnly(Arc<WebPkiServerVerifier>);

    impl ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> std::result::Result<ServerCertVerified, rustls::Error> {
            match self
                .0
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            {
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
}
