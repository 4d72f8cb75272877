//! The files of a process's TLS identity, and the rustls configurations made from them.
//!
//! Loading is all or nothing: the certificate chain, the private key and the CA bundle
//! are read, parsed, and checked against each other (the key must belong to the
//! certificate) before any configuration is built, and every error names the file it is
//! about and what was wrong with it.
//!
//! Not here: when the files are read again ([`super::reload`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::ALPN_H2;

/// Where a process's TLS identity lives: three PEM files, as a Kubernetes `kubernetes.io/tls`
/// Secret with a `ca.crt` key mounts them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// This process's certificate chain, leaf first (`tls.crt`).
    pub cert: PathBuf,
    /// The private key of the leaf certificate, PKCS#8, PKCS#1 or SEC1 (`tls.key`).
    pub key: PathBuf,
    /// The CA certificates peers' certificates must chain to (`ca.crt`); several during a
    /// CA rotation.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The files of a mounted `kubernetes.io/tls` Secret with a `ca.crt` key: `tls.crt`,
    /// `tls.key` and `ca.crt` in `dir`.
    pub fn secret_dir(dir: &std::path::Path) -> Self {
        Self {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            ca: dir.join("ca.crt"),
        }
    }
}

/// Why TLS material could not be loaded; each names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading the TLS {what} {}: {source}", path.display())]
    Read {
        /// Which file: certificate, private key or CA bundle.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not what it should be: no PEM block of the right kind, a block that does not
    /// decode, or one rustls refuses.
    #[error("the TLS {what} {}: {reason}", path.display())]
    Invalid {
        /// Which file: certificate, private key or CA bundle.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong, and what was expected.
        reason: String,
    },
    /// The private key does not belong to the certificate (often: one file was updated and
    /// the other not yet).
    #[error(
        "the TLS private key {} does not belong to the certificate {} (its public key differs)",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The name servers' certificates must carry is not a DNS name or an IP address.
    #[error("TLS server name {name:?} is neither a DNS name nor an IP address")]
    ServerName {
        /// The name given.
        name: String,
    },
    /// The reloader needs a tokio runtime to run on.
    #[error("TLS material must be loaded inside a tokio runtime (its reloader is a task)")]
    NoRuntime,
}

impl TlsError {
    fn invalid(what: &'static str, path: &Path, reason: impl std::fmt::Display) -> Self {
        Self::Invalid {
            what,
            path: path.to_owned(),
            reason: reason.to_string(),
        }
    }
}

const CERT: &str = "certificate";
const KEY: &str = "private key";
const CA: &str = "CA bundle";

/// The bytes of the three files, as read at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

impl Contents {
    /// Reads the three files.
    pub(crate) fn read(files: &TlsFiles) -> Result<Self, TlsError> {
        let read = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                what,
                path: path.to_owned(),
                source,
            })
        };
        Ok(Self {
            cert: read(CERT, &files.cert)?,
            key: read(KEY, &files.key)?,
            ca: read(CA, &files.ca)?,
        })
    }

    /// A hash of all three files' bytes: what the reloader compares, since a Secret's
    /// symlink swap need not change the modification times it sees.
    pub(crate) fn stamp(&self) -> u64 {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        for part in [&self.cert, &self.key, &self.ca] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        hasher.digest()
    }
}

/// One load of a process's TLS identity, ready for handshakes: the server configuration
/// (presents the certificate, requires a client certificate from the CA) and the client
/// configuration (presents the certificate, verifies servers against the CA).
pub struct TlsMaterial {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial").finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Reads and checks `files`; see the module docs.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        Self::from_contents(files, &Contents::read(files)?)
    }

    /// The configuration for accepting connections.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The configuration for opening connections.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// Parses and checks `contents`, read from `files` (which name them in errors).
    pub(crate) fn from_contents(files: &TlsFiles, contents: &Contents) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certificates(CERT, &files.cert, &contents.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&contents.key).map_err(|e| {
            TlsError::invalid(
                KEY,
                &files.key,
                format!("no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
            )
        })?;
        let certified = certified_key(files, &provider, chain, key)?;
        let roots = Arc::new(roots(&files.ca, &contents.ca)?);

        let versions: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::invalid(CA, &files.ca, e))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| TlsError::invalid(CERT, &files.cert, e))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified.clone())));
        server.alpn_protocols = vec![ALPN_H2.to_vec()];

        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(|e| TlsError::invalid(CERT, &files.cert, e))?
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
        client.alpn_protocols = vec![ALPN_H2.to_vec()];

        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// Every CERTIFICATE block of `pem`, at least one.
fn certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::invalid(what, path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::invalid(
            what,
            path,
            "no PEM CERTIFICATE block (expected -----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

/// The chain with its key, once rustls can sign with the key and the key is the leaf's.
fn certified_key(
    files: &TlsFiles,
    provider: &CryptoProvider,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::invalid(KEY, &files.key, format!("unusable key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => Ok(Arc::new(certified)),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            })
        }
        // A key type whose public half rustls cannot derive: nothing to compare, as
        // rustls' own `with_single_cert` treats it.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(e) => Err(TlsError::invalid(CERT, &files.cert, e)),
    }
}

/// The CA bundle as trust anchors: every certificate must be usable as one.
fn roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(CA, path, pem)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::invalid(CA, path, format!("a certificate is unusable: {e}")))?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use convoy_testkit::certs::{SecretDir, TestCa};

    use super::*;

    fn secret(dir: &Path, ca: &TestCa) -> (SecretDir, TlsFiles) {
        let secret = SecretDir::create(dir, &ca.leaf(), &[ca]).unwrap();
        let files = TlsFiles::secret_dir(secret.root());
        (secret, files)
    }

    #[test]
    fn a_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (_secret, mut files) = secret(dir.path(), &TestCa::new("one"));
        files.key = dir.path().join("missing.key");
        let error = TlsMaterial::load(&files).unwrap_err();
        assert!(matches!(
            error,
            TlsError::Read {
                what: "private key",
                ..
            }
        ));
        assert!(error.to_string().contains("missing.key"), "{error}");
    }

    #[test]
    fn a_file_without_a_certificate_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("one");
        let (secret, files) = secret(dir.path(), &ca);
        let leaf = ca.leaf();
        secret
            .update_raw("not a certificate\n", &leaf.key_pem, ca.cert_pem())
            .unwrap();
        let error = TlsMaterial::load(&files).unwrap_err();
        let text = error.to_string();
        assert!(matches!(
            error,
            TlsError::Invalid {
                what: "certificate",
                ..
            }
        ));
        assert!(text.contains("tls.crt"), "{text}");
        assert!(text.contains("BEGIN CERTIFICATE"), "{text}");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("one");
        let (secret, files) = secret(dir.path(), &ca);
        let (one, other) = (ca.leaf(), ca.leaf());
        secret
            .update_raw(&one.cert_pem, &other.key_pem, ca.cert_pem())
            .unwrap();
        assert!(matches!(
            TlsMaterial::load(&files),
            Err(TlsError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn an_empty_ca_bundle_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("one");
        let (secret, files) = secret(dir.path(), &ca);
        let leaf = ca.leaf();
        secret
            .update_raw(&leaf.cert_pem, &leaf.key_pem, "")
            .unwrap();
        assert!(matches!(
            TlsMaterial::load(&files),
            Err(TlsError::Invalid {
                what: "CA bundle",
                ..
            })
        ));
    }

    #[test]
    fn matching_files_load_and_offer_h2() {
        let dir = tempfile::tempdir().unwrap();
        let (_secret, files) = secret(dir.path(), &TestCa::new("one"));
        let material = TlsMaterial::load(&files).unwrap();
        assert_eq!(
            material.server_config().alpn_protocols,
            vec![b"h2".to_vec()]
        );
        assert_eq!(
            material.client_config().alpn_protocols,
            vec![b"h2".to_vec()]
        );
    }
}
