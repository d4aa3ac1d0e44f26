//! `TestCertificates`: a throwaway CA, a server certificate signed by it, and client
//! certificates on demand, generated with `rcgen` at test time.

use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::{Error, ErrorKind};

/// A CA made for one test run, the server certificate it signed, and client
/// certificates for given user names (for `cert` authentication).
///
/// ```no_run
/// use pgengine_testing::{EphemeralCluster, TestCertificates};
/// let certs = TestCertificates::generate(&["localhost"])?;
/// let cluster = EphemeralCluster::builder().tls(&certs).start()?;
/// std::fs::write(cluster.temp_dir().join("ca.pem"), certs.ca_pem())?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct TestCertificates {
    ca_pem: String,
    ca: Issuer<'static, KeyPair>,
    server_cert_pem: String,
    server_key_pem: String,
}

impl std::fmt::Debug for TestCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCertificates").finish_non_exhaustive()
    }
}

impl TestCertificates {
    /// A new CA and a server certificate for `server_names` (host names or IP
    /// addresses, as subject alternative names).
    ///
    /// ```
    /// let certs = pgengine_testing::TestCertificates::generate(&["localhost"]).unwrap();
    /// assert!(certs.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    /// ```
    pub fn generate(server_names: &[&str]) -> Result<Self, Error> {
        let ca_key = KeyPair::generate().map_err(rcgen_error)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error)?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pgengine-testing CA");
        ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_pem = ca_params.self_signed(&ca_key).map_err(rcgen_error)?.pem();
        let ca = Issuer::new(ca_params, ca_key);
        let names: Vec<String> = server_names.iter().map(|n| n.to_string()).collect();
        let (server_cert_pem, server_key_pem) = signed(&ca, names, "pgengine-testing server")?;
        Ok(Self {
            ca_pem,
            ca,
            server_cert_pem,
            server_key_pem,
        })
    }

    /// The CA certificate (PEM): what a client gives as `sslrootcert`.
    ///
    /// ```
    /// let certs = pgengine_testing::TestCertificates::generate(&["localhost"]).unwrap();
    /// assert!(certs.ca_pem().contains("CERTIFICATE"));
    /// ```
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The server certificate (PEM).
    ///
    /// ```
    /// let certs = pgengine_testing::TestCertificates::generate(&["localhost"]).unwrap();
    /// assert!(certs.server_cert_pem().contains("CERTIFICATE"));
    /// ```
    pub fn server_cert_pem(&self) -> &str {
        &self.server_cert_pem
    }

    /// The server's private key (PEM).
    ///
    /// ```
    /// let certs = pgengine_testing::TestCertificates::generate(&["localhost"]).unwrap();
    /// assert!(certs.server_key_pem().contains("PRIVATE KEY"));
    /// ```
    pub fn server_key_pem(&self) -> &str {
        &self.server_key_pem
    }

    /// A client certificate and key (PEM) for `user` (its common name), signed by the
    /// CA, for `cert` authentication.
    ///
    /// ```
    /// let certs = pgengine_testing::TestCertificates::generate(&["localhost"]).unwrap();
    /// let (cert, key) = certs.client("app").unwrap();
    /// assert!(cert.contains("CERTIFICATE") && key.contains("PRIVATE KEY"));
    /// ```
    pub fn client(&self, user: &str) -> Result<(String, String), Error> {
        signed(&self.ca, Vec::new(), user)
    }
}

/// A certificate (PEM) with common name `name` and `alt_names`, signed by `ca`, and
/// its key (PEM).
fn signed(
    ca: &Issuer<'static, KeyPair>,
    alt_names: Vec<String>,
    name: &str,
) -> Result<(String, String), Error> {
    let key = KeyPair::generate().map_err(rcgen_error)?;
    let mut params = CertificateParams::new(alt_names).map_err(rcgen_error)?;
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.signed_by(&key, ca).map_err(rcgen_error)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn rcgen_error(e: rcgen::Error) -> Error {
    Error::new(
        ErrorKind::Config,
        format!("could not generate a test certificate: {e}"),
    )
}
