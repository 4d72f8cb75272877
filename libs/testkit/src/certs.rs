//! Certificates for TLS tests: private CAs and the leaves they issue (rcgen, as PEM), and a
//! folder laid out as the kubelet lays out a mounted Secret, so tests rotate files the way
//! Kubernetes does.
//!
//! Not for production: keys are generated per test and written unprotected.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The names a [`TestCa::leaf`] is valid for: what tests dial.
pub const LOOPBACK_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// A private certificate authority.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A certificate and its private key, as PEM.
#[derive(Clone, Debug)]
pub struct TestLeaf {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

impl TestCa {
    /// A new self-signed CA whose common name is `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("a key pair");
        let pem = params.self_signed(&key).expect("a self-signed CA").pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// The CA's certificate.
    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    /// A leaf for [`LOOPBACK_NAMES`], usable by servers and by clients.
    pub fn leaf(&self) -> TestLeaf {
        self.leaf_for(&LOOPBACK_NAMES)
    }

    /// A leaf for `names` (DNS names or IP addresses), usable by servers and by clients.
    pub fn leaf_for(&self, names: &[&str]) -> TestLeaf {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("valid names");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("a key pair");
        let cert = params.signed_by(&key, &self.issuer).expect("a signed leaf");
        TestLeaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A folder laid out as the kubelet mounts a `kubernetes.io/tls` Secret with a `ca.crt`:
/// `tls.crt`, `tls.key` and `ca.crt` are symlinks into `..data`, itself a symlink to a
/// folder of the current version. [`SecretDir::update`] writes a new version beside it
/// and swaps `..data` with one rename, so a reader sees all old files or all new ones.
#[derive(Debug)]
pub struct SecretDir {
    root: PathBuf,
}

/// Names the version folders apart within a process.
static VERSION: AtomicU64 = AtomicU64::new(0);

impl SecretDir {
    /// A Secret folder in `root` (which must exist) holding `leaf` and the bundle of `cas`.
    pub fn create(root: &Path, leaf: &TestLeaf, cas: &[&TestCa]) -> std::io::Result<Self> {
        let dir = Self {
            root: root.to_owned(),
        };
        dir.update(leaf, cas)?;
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(Path::new("..data").join(name), root.join(name))?;
        }
        Ok(dir)
    }

    /// Replaces all three files at once (see the type's docs).
    pub fn update(&self, leaf: &TestLeaf, cas: &[&TestCa]) -> std::io::Result<()> {
        let bundle: String = cas.iter().map(|ca| ca.cert_pem()).collect();
        self.update_raw(&leaf.cert_pem, &leaf.key_pem, &bundle)
    }

    /// Replaces all three files at once with these contents, valid or not.
    pub fn update_raw(&self, cert: &str, key: &str, ca: &str) -> std::io::Result<()> {
        let version = format!(
            "..version_{}_{}",
            std::process::id(),
            VERSION.fetch_add(1, Ordering::Relaxed)
        );
        let folder = self.root.join(&version);
        std::fs::create_dir(&folder)?;
        std::fs::write(folder.join("tls.crt"), cert)?;
        std::fs::write(folder.join("tls.key"), key)?;
        std::fs::write(folder.join("ca.crt"), ca)?;
        let old = std::fs::read_link(self.root.join("..data")).ok();
        let staged = self.root.join("..data_tmp");
        let _ = std::fs::remove_file(&staged);
        std::os::unix::fs::symlink(&version, &staged)?;
        std::fs::rename(&staged, self.root.join("..data"))?;
        if let Some(old) = old {
            std::fs::remove_dir_all(self.root.join(old))?;
        }
        Ok(())
    }

    /// The folder, as it would be mounted.
    pub fn root(&self) -> &std::path::Path {
        &self.root
    }

    /// The certificate file (`tls.crt`).
    pub fn cert(&self) -> PathBuf {
        self.root.join("tls.crt")
    }

    /// The private key file (`tls.key`).
    pub fn key(&self) -> PathBuf {
        self.root.join("tls.key")
    }

    /// The CA bundle file (`ca.crt`).
    pub fn ca(&self) -> PathBuf {
        self.root.join("ca.crt")
    }
}
