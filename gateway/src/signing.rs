//! Standard Webhooks signing: webhook secrets and the `webhook-signature`
//! header.
//!
//! A secret is `whsec_` followed by base64 of 32 random bytes; the signature
//! of a delivery is `v1,` + base64(HMAC-SHA256(secret bytes,
//! "{id}.{timestamp}.{body}")). During a secret rotation a delivery carries
//! one signature per active secret, space separated, so receivers can switch
//! secrets without dropping a delivery.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

const PREFIX: &str = "whsec_";
const SECRET_BYTES: usize = 32;

/// A webhook signing secret, decoded once so signing never re-parses it.
#[derive(Clone)]
pub struct Secret {
    text: String,
    key: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("a webhook secret must be `whsec_` followed by base64 of 24 to 64 bytes")]
pub struct InvalidSecret;

impl Secret {
    pub fn generate() -> Self {
        let mut key = vec![0u8; SECRET_BYTES];
        rand::rng().fill_bytes(&mut key);
        let text = format!("{PREFIX}{}", BASE64.encode(&key));
        Self { text, key }
    }

    pub fn parse(text: &str) -> Result<Self, InvalidSecret> {
        let encoded = text.strip_prefix(PREFIX).ok_or(InvalidSecret)?;
        let key = BASE64.decode(encoded).map_err(|_| InvalidSecret)?;
        if !(24..=64).contains(&key.len()) {
            return Err(InvalidSecret);
        }
        Ok(Self {
            text: text.to_owned(),
            key,
        })
    }

    /// The full secret, for storage and for showing once at creation.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// What reads show instead of the secret: enough to tell two apart.
    pub fn masked(&self) -> String {
        let tail = &self.text[self.text.len() - 4..];
        format!("{PREFIX}****{tail}")
    }

    /// One `v1,<base64>` signature over the exact bytes sent.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC accepts any key length");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.masked())
    }
}

/// The `webhook-signature` header value: one signature per active secret.
pub fn signature_header<'a>(
    secrets: impl IntoIterator<Item = &'a Secret>,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    secrets
        .into_iter()
        .map(|secret| secret.sign(msg_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example from the Standard Webhooks specification.
    #[test]
    fn matches_the_specification_example() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn generated_secrets_round_trip_and_mask() {
        let secret = Secret::generate();
        let parsed = Secret::parse(secret.expose()).unwrap();
        assert_eq!(parsed.key, secret.key);
        assert!(parsed.masked().starts_with("whsec_****"));
        assert!(!parsed.masked().contains(&secret.expose()[6..20]));
    }
}
