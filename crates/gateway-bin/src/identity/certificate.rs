//! A service principal's certificate credential: a JWT client assertion (RFC 7523) signed RS256
//! with the certificate's RSA key, its `x5t` header the certificate's SHA-1 thumbprint, as Entra ID
//! documents for the client credentials flow.

use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest::{SHA1_FOR_LEGACY_USE_ONLY, digest};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;

/// How long an assertion is valid: Entra ID only needs it for the one token request.
const ASSERTION_LIFETIME_SECS: u64 = 600;

/// A certificate and its private key, read once at start-up.
pub(crate) struct ClientCertificate {
    key: RsaKeyPair,
    /// Base64url SHA-1 thumbprint of the certificate, the assertion's `x5t`.
    thumbprint: String,
}

impl ClientCertificate {
    /// Reads a PEM file holding the certificate and its (PKCS#8 or PKCS#1) RSA private key, as
    /// `AZURE_CLIENT_CERTIFICATE_PATH` names it. Errors never quote the file.
    pub(crate) fn from_pem(pem: &[u8]) -> Result<Self, String> {
        let cert = CertificateDer::from_pem_slice(pem).map_err(|_| {
            "AZURE_CLIENT_CERTIFICATE_PATH holds no PEM certificate (PKCS#12 files are not supported: convert to PEM)".to_owned()
        })?;
        let key = match PrivateKeyDer::from_pem_slice(pem) {
            Ok(PrivateKeyDer::Pkcs8(der)) => RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()),
            Ok(PrivateKeyDer::Pkcs1(der)) => RsaKeyPair::from_der(der.secret_pkcs1_der()),
            _ => {
                return Err(
                    "AZURE_CLIENT_CERTIFICATE_PATH holds no unencrypted RSA private key".to_owned(),
                );
            }
        }
        .map_err(|e| format!("AZURE_CLIENT_CERTIFICATE_PATH: the RSA key is not usable: {e}"))?;
        let thumbprint = base64url(digest(&SHA1_FOR_LEGACY_USE_ONLY, cert.as_ref()).as_ref());
        Ok(Self { key, thumbprint })
    }

    /// A signed assertion for `client_id` at the token endpoint `audience`.
    pub(crate) fn assertion(&self, client_id: &str, audience: &str) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "the clock is before 1970".to_owned())?
            .as_secs();
        let header = json!({"alg": "RS256", "typ": "JWT", "x5t": self.thumbprint});
        let claims = json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": format!("{:016x}{:016x}", fastrand_u64(), fastrand_u64()),
            "iat": now,
            "nbf": now,
            "exp": now + ASSERTION_LIFETIME_SECS,
        });
        let signed = format!(
            "{}.{}",
            base64url(header.to_string().as_bytes()),
            base64url(claims.to_string().as_bytes())
        );
        let mut signature = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signed.as_bytes(),
                &mut signature,
            )
            .map_err(|_| "could not sign the client assertion".to_owned())?;
        Ok(format!("{signed}.{}", base64url(&signature)))
    }
}

/// A unique-enough `jti`: Entra ID uses it to refuse a replayed assertion.
fn fastrand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // The system RNG does not fail on the platforms aws-lc supports; a zero `jti` half would only
    // make two assertions in the same second look alike.
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

/// Base64url without padding (RFC 7515).
pub(crate) fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let digits = chunk.len() + 1;
        for i in 0..digits {
            let index = (n >> (18 - 6 * i)) & 63;
            out.push(char::from(ALPHABET[index as usize]));
        }
    }
    out
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("x5t", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn base64url_has_no_padding() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn refuses_what_is_not_a_pem_certificate_and_key() {
        assert!(
            ClientCertificate::from_pem(b"not pem")
                .unwrap_err()
                .contains("no PEM certificate")
        );
    }
}
