//! TLS for PostgreSQL connections with libpq's `sslmode` meanings, on rustls with the `ring`
//! provider: nothing to build but Rust and a C compiler, no OpenSSL headers.
//!
//! - `disable`: no TLS; `prefer`: TLS when the server offers it; `require`: TLS, the
//!   certificate unchecked, unless a root certificate file exists, then checked as `verify-ca`
//!   (libpq does the same);
//! - `verify-ca`: the chain must lead to `sslrootcert` (default `~/.postgresql/root.crt`);
//! - `verify-full`: also the host name (SNI is sent for names; an address is checked against the
//!   certificate's IP address entries).
//!
//! Client certificates: `sslcert`/`sslkey`, default `~/.postgresql/postgresql.crt`/`.key` when
//! they exist.
//!
//! ClickHouse's HTTPS connections build their rustls configuration here too (`rustls_config`,
//! `load_roots`, `system_roots`, `load_client_cert`), so both DWHs check certificates alike.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};

use super::conninfo::{ConnInfo, SslMode};

/// The connector pgtide hands tokio-postgres, for every `sslmode` (unused under `disable`).
pub type MakeTls = tokio_postgres_rustls::MakeRustlsConnect;

/// What the TLS setup needs to say in an error: the files it used.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// The root certificates the server's chain is checked against, if any.
    pub roots: Option<String>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn postgresql_dir() -> Option<PathBuf> {
    super::passfile::home().map(|h| h.join(".postgresql"))
}

/// The rustls configuration for a connection string, or why it cannot be made (a missing or
/// unreadable file, a weak mode with `sslrootcert=system`).
pub fn client_config(info: &ConnInfo) -> Result<(MakeTls, TlsFiles), String> {
    if info.sslmode == SslMode::Disable {
        let config = rustls_config(None, false, None)?;
        return Ok((MakeTls::new(config), TlsFiles::default()));
    }
    let verify = matches!(info.sslmode, SslMode::VerifyCa | SslMode::VerifyFull);
    let mut files = TlsFiles::default();
    let roots: Option<RootCertStore> = match info.sslrootcert.as_deref() {
        Some("system") => {
            if info.sslmode != SslMode::VerifyFull {
                return Err(format!(
                    "weak sslmode \"{}\" may not be used with sslrootcert=system (use \"verify-full\")",
                    info.sslmode.as_str()
                ));
            }
            files.roots = Some(SYSTEM_ROOTS.into());
            Some(system_roots().map_err(|e| format!("sslrootcert=system: {e}"))?)
        }
        Some(path) => {
            files.roots = Some(path.to_string());
            Some(load_roots(Path::new(path))?)
        }
        None => {
            let default = postgresql_dir().map(|d| d.join("root.crt"));
            match default.filter(|p| p.exists()) {
                Some(p) => {
                    files.roots = Some(p.display().to_string());
                    Some(load_roots(&p)?)
                }
                None if verify => {
                    return Err(format!(
                        "root certificate file \"{}\" does not exist; either provide the file, use the system's trusted roots with sslrootcert=system, or change sslmode to disable server certificate verification",
                        postgresql_dir()
                            .map(|d| d.join("root.crt").display().to_string())
                            .unwrap_or_else(|| "~/.postgresql/root.crt".into())
                    ))
                }
                None => None,
            }
        }
    };
    let config = rustls_config(
        roots,
        info.sslmode == SslMode::VerifyFull,
        client_cert(info)?,
    )?;
    Ok((MakeTls::new(config), files))
}

/// How [`TlsFiles::roots`] names the system's trusted roots.
pub const SYSTEM_ROOTS: &str = "the system's trusted roots";

/// A rustls client configuration, shared by PostgreSQL and ClickHouse connections: the server's
/// chain checked against `roots` (not at all without them), its name too when `check_name`, and
/// a client certificate when given. The handshake's signatures are always checked.
pub fn rustls_config(
    roots: Option<RootCertStore>,
    check_name: bool,
    client: Option<ClientCert>,
) -> Result<ClientConfig, String> {
    let provider = provider();
    let inner = match roots {
        Some(store) => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                .build()
                .map_err(|e| format!("root certificates: {e}"))?,
        ),
        None => None,
    };
    let verifier = Verifier {
        inner,
        check_name,
        provider: provider.clone(),
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    Ok(match client {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| format!("client certificate: {e}"))?,
        None => builder.with_no_client_auth(),
    })
}

/// The system's trusted root certificates (Debian's ca-certificates), or why there are none.
pub fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(found.certs);
    if store.is_empty() {
        return Err("the system has no trusted root certificates (install ca-certificates)".into());
    }
    Ok(store)
}

/// The root certificates in a PEM file, or why it cannot be used.
pub fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let certs = read_certs(path, "root certificate file")?;
    let mut store = RootCertStore::empty();
    let (_, bad) = store.add_parsable_certificates(certs);
    if store.is_empty() {
        return Err(format!(
            "root certificate file \"{}\" holds no usable certificate ({bad} could not be parsed)",
            path.display()
        ));
    }
    Ok(store)
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("could not read {what} \"{}\": {e}", path.display()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("could not parse {what} \"{}\": {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} \"{}\" holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

/// A client certificate chain and its private key.
pub type ClientCert = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The client certificate and key: the given files (an error when unreadable), else the default
/// files when the certificate exists.
fn client_cert(info: &ConnInfo) -> Result<Option<ClientCert>, String> {
    let dir = postgresql_dir();
    let cert = match &info.sslcert {
        Some(p) => PathBuf::from(p),
        None => match dir.as_ref().map(|d| d.join("postgresql.crt")) {
            Some(p) if p.exists() => p,
            _ => return Ok(None),
        },
    };
    let key = match &info.sslkey {
        Some(p) => PathBuf::from(p),
        None => match &dir {
            Some(d) if info.sslcert.is_none() => d.join("postgresql.key"),
            // libpq's default key sits beside its default certificate; a given certificate
            // without a key looks for the default key too.
            Some(d) => d.join("postgresql.key"),
            None => return Err("client certificate given without sslkey".into()),
        },
    };
    load_client_cert(&cert, &key).map(Some)
}

/// A client certificate and its key from PEM files. As libpq, the key must be private to its
/// owner, or readable by the group only when root owns it (a key installed by a package for a
/// service group).
pub fn load_client_cert(cert: &Path, key: &Path) -> Result<ClientCert, String> {
    let certs = read_certs(cert, "client certificate file")?;
    let meta = std::fs::metadata(key).map_err(|e| {
        format!(
            "certificate present, but not private key file \"{}\": {e}",
            key.display()
        )
    })?;
    let mode = meta.mode() & 0o777;
    let private = if meta.uid() == 0 {
        mode & 0o037 == 0
    } else {
        mode & 0o077 == 0
    };
    if !private {
        return Err(format!(
            "private key file \"{}\" has group or world access; file must have permissions u=rw (0600) or less if owned by the current user, or permissions u=rw,g=r (0640) or less if owned by root",
            key.display()
        ));
    }
    let bytes = std::fs::read(key)
        .map_err(|e| format!("could not read private key file \"{}\": {e}", key.display()))?;
    let key_der = PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| format!("could not load private key file \"{}\": {e}", key.display()))?;
    Ok((certs, key_der))
}

/// Checks the server's certificate as the `sslmode` asks: not at all, the chain only, or the
/// chain and the name. The handshake's signatures are always checked, so the server holds the
/// key of the certificate it shows.
#[derive(Debug)]
struct Verifier {
    inner: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else {
            return Ok(ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // webpki checks the name only after the chain, so a name error means the chain
            // is trusted: enough for verify-ca.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS failure in an error's chain, said the way a user can act on it; `None` when the error
/// is not about TLS.
pub fn explain(
    e: &(dyn std::error::Error + 'static),
    host: &str,
    files: &TlsFiles,
) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(explain_rustls(r, host, files));
        }
        // An io::Error's `source` skips the error it wraps: look inside it.
        if let Some(r) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(explain_rustls(r, host, files));
        }
        if err.to_string() == "server does not support TLS" {
            return Some("the server refused TLS (it does not accept TLS connections), and sslmode requires it".into());
        }
        cur = err.source();
    }
    None
}

fn explain_rustls(e: &rustls::Error, host: &str, files: &TlsFiles) -> String {
    let roots = files.roots.as_deref().unwrap_or("sslrootcert");
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => format!(
                "the server's certificate is not trusted: it is not issued by a CA in {roots} (unknown CA)"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the server's certificate does not match the host name \"{host}\" (sslmode=verify-full): {e}")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("the server's certificate has expired: {e}")
            }
            _ => format!("the server's certificate is not valid: {e}"),
        },
        rustls::Error::AlertReceived(a) => format!(
            "the server ended the TLS handshake ({a:?}): it may refuse the client certificate or want one"
        ),
        _ => format!("TLS handshake failed: {e}"),
    }
}
