//! TLS for STUN/TURN clients (RFC 7350): the rustls server configuration built from the
//! configured certificate and key, the names the certificate is valid for (the diagnostics
//! page's `turns:` URLs), and the self-signed pair `actrix cert --self-signed` makes for
//! trying it.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::IpAddr;
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

/// What the first certificate of PEM file `cert` (the server's own) says about the names
/// clients may use: its DNS subjectAltNames, which of `ips` it is valid for, and whether it
/// is self-signed (issuer and subject the same).
pub fn certificate_names(cert: &Path, ips: &[IpAddr]) -> Result<crate::diag::TlsNames, String> {
    let der = first_certificate(cert)?;
    let ee = webpki::EndEntityCert::try_from(&der)
        .map_err(|e| format!("{}: not a certificate webpki reads: {e}", cert.display()))?;
    let mut names = crate::diag::TlsNames {
        dns: ee.valid_dns_names().map(str::to_string).collect(),
        self_signed: ee.issuer() == ee.subject(),
        ..Default::default()
    };
    for ip in ips {
        let name = rustls::pki_types::ServerName::IpAddress((*ip).into());
        if ee.verify_is_valid_for_subject_name(&name).is_ok() && !names.ips.contains(ip) {
            names.ips.push(*ip);
        }
    }
    Ok(names)
}

/// The DTLS certificate (`actrix_dataplane::dtls`) from the same PEM files: the leaf
/// certificate (DTLS sends no chain here) and an ECDSA P-256 or P-384 key.
pub fn dtls_certificate(
    cert: &Path,
    key: &Path,
) -> Result<actrix_dataplane::dtls::DtlsCertificate, String> {
    let leaf = first_certificate(cert)?;
    let k = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    actrix_dataplane::dtls::certificate(leaf.to_vec(), k.secret_der().to_vec())
        .map_err(|e| format!("{}: {e}", key.display()))
}

/// The first certificate of PEM file `cert` (the server's own, before any chain).
fn first_certificate(cert: &Path) -> Result<CertificateDer<'static>, String> {
    CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .next()
        .ok_or_else(|| format!("{}: no certificate found", cert.display()))?
        .map_err(|e| format!("{}: {e}", cert.display()))
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

    #[test]
    fn certificate_names_are_read_from_the_subject_alt_names() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let names = [
            "turn.example.net".to_string(),
            "*.example.net".to_string(),
            "192.0.2.5".to_string(),
            "2001:db8::5".to_string(),
        ];
        write_self_signed(&names, &cert, &key).unwrap();
        let ips: Vec<IpAddr> = ["192.0.2.5", "192.0.2.6", "2001:db8::5", "192.0.2.5"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let got = certificate_names(&cert, &ips).unwrap();
        assert_eq!(got.dns, ["turn.example.net", "*.example.net"]);
        assert_eq!(got.ips, [ips[0], ips[2]]);
        assert!(got.self_signed);

        // One signed by another certificate is not self-signed.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec!["turn.example.org".into()]).unwrap();
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, "turn.example.org");
        let leaf = leaf.signed_by(&leaf_key, &issuer).unwrap();
        std::fs::write(&cert, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
        let got = certificate_names(&cert, &ips).unwrap();
        assert_eq!(got.dns, ["turn.example.org"]);
        assert!(got.ips.is_empty());
        assert!(!got.self_signed);

        std::fs::write(&cert, "no certificate here").unwrap();
        assert!(certificate_names(&cert, &[]).unwrap_err().contains("c.pem"));
    }
}
