//! TLS client setup shared by the IMAP and SMTP edges and the sandbox:
//! OpenSSL through native-tls, the system roots plus an optional private CA.

use std::path::Path;

use tokio::net::TcpStream;
use tokio_native_tls::{TlsConnector, TlsStream};

/// Errors setting up or opening TLS connections.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file cannot be read.
    #[error("ca_file {path}: {source}")]
    CaFile {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// native-tls / OpenSSL refused the setup or the handshake.
    #[error("tls: {0}")]
    Tls(#[from] native_tls::Error),
    /// TCP connection failure.
    #[error("connect {addr}: {source}")]
    Connect {
        /// host:port.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A TLS connector trusting the system roots and, if given, the
/// certificates in `ca_file` (PEM, several allowed).
///
/// # Errors
/// An unreadable or invalid CA file.
pub fn connector(ca_file: Option<&Path>) -> Result<TlsConnector, TlsError> {
    let mut b = native_tls::TlsConnector::builder();
    b.min_protocol_version(Some(native_tls::Protocol::Tlsv12));
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| TlsError::CaFile {
            path: path.display().to_string(),
            source: e,
        })?;
        for cert in openssl::x509::X509::stack_from_pem(&pem).unwrap_or_default() {
            let der = cert.to_der().unwrap_or_default();
            b.add_root_certificate(native_tls::Certificate::from_der(&der)?);
        }
    }
    Ok(TlsConnector::from(b.build()?))
}

/// Opens a TCP connection and performs a TLS handshake, checking the
/// server certificate against `host`.
///
/// # Errors
/// Connection or handshake failure.
pub async fn connect(
    connector: &TlsConnector,
    host: &str,
    port: u16,
) -> Result<TlsStream<TcpStream>, TlsError> {
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| TlsError::Connect {
            addr: format!("{host}:{port}"),
            source: e,
        })?;
    let _ = tcp.set_nodelay(true);
    Ok(connector.connect(host, tcp).await?)
}
