//! The process-wide TLS crypto provider.
//!
//! rustls chooses its provider from crate features, but a workspace that also links
//! `object_store` enables both `ring` and `aws-lc-rs`, and then rustls refuses to choose and
//! panics on the first TLS config. Everything here that builds a TLS config (the client, the
//! loader service) calls [`install_crypto_provider`] first.

/// Installs rustls' `ring` provider as the process default, unless one is already installed.
///
/// Idempotent and cheap; safe to call from any thread, any number of times.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // A concurrent caller may win the race; either way a provider is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_once_and_stays_installed() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
