//! TLS for STUN/TURN clients (RFC 7350): the rustls server configuration built from the
//! configured certificate and key, and the self-signed pair `actrix cert --self-signed` makes
//! for trying it.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// ALPN protocol ids of RFC 7443: TURN, and STUN for NAT discovery.
pub const ALPN: [&[u8]; 2] = [b"stun.turn", b"stun.nat-discovery"];

/// A rustls server configuration (TLS 1.3 and 1.2, the ring provider, ALPN `stun.turn` and
/// `stun.nat-discovery`) from a PEM certificate chain and a PEM private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// The DTLS certificate (`actrix_dataplane::dtls`) from the same PEM files: the leaf
/// certificate (DTLS sends no chain here) and an ECDSA P-256 or P-384 key.
pub fn dtls_certificate(
    cert: &Path,
    key: &Path,
) -> Result<actrix_dataplane::dtls::DtlsCertificate, String> {
    let leaf = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .next()
        .ok_or_else(|| format!("{}: no certificate found", cert.display()))?
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let k = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    actrix_dataplane::dtls::certificate(leaf.to_vec(), k.secret_der().to_vec())
        .map_err(|e| format!("{}: {e}", key.display()))
}

/// Write a self-signed certificate for `names` and its key to `cert` and `key` (the key
/// owner-only). For trying TLS and DTLS only: clients have to be told to trust it.
pub fn write_self_signed(names: &[String], cert: &Path, key: &Path) -> Result<(), String> {
    let mut params =
        rcgen::CertificateParams::new(names.to_vec()).map_err(|e| format!("names: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "actrix self-signed certificate (for testing only)",
    );
    let pair = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let c = params.self_signed(&pair).map_err(|e| e.to_string())?;
    std::fs::write(cert, c.pem()).map_err(|e| format!("{}: {e}", cert.display()))?;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(key)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    f.write_all(pair.serialize_pem().as_bytes())
        .map_err(|e| format!("{}: {e}", key.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_pair_loads_and_bad_files_are_refused_with_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        write_self_signed(&["localhost".into(), "127.0.0.1".into()], &cert, &key).unwrap();
        let cfg = server_config(&cert, &key).expect("loads");
        dtls_certificate(&cert, &key).expect("an ECDSA pair serves DTLS too");
        assert_eq!(
            cfg.alpn_protocols,
            [b"stun.turn".to_vec(), b"stun.nat-discovery".to_vec()]
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&key, "not a key").unwrap();
        let e = server_config(&cert, &key).unwrap_err();
        assert!(e.contains("k.pem"), "{e}");
        let e = server_config(&dir.path().join("missing.pem"), &key).unwrap_err();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
