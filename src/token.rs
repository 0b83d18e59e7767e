//! Opt-out link tokens: signing, parsing and verification. Pure: the clock
//! is passed in.
//!
//! # Layout (version 1)
//!
//! The token is the URL-safe base64 (no padding) of these bytes:
//!
//! | bytes | field |
//! | --- | --- |
//! | 1 | version, `1` |
//! | 1 | key id (0–255): which secret signed it |
//! | 1–10 | customer id, unsigned LEB128 varint (shortest form) |
//! | 4 | issue time, seconds since the Unix epoch, big-endian u32 |
//! | 1 + n | service slug length n and bytes; n = 0 means `*` |
//! | 1 + m | channel length m and bytes; m = 0 means `*` |
//! | 16 | HMAC-SHA256 over every byte before it, under the key's secret, truncated to 128 bits |
//!
//! Nothing secret is inside, and nothing personal beyond the customer id.
//! A token for a 6-letter service and a 5-letter channel is 56 characters;
//! [`MAX_TOKEN_CHARS`] (200) leaves room for 116 bytes of slug and channel.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{KeyInit, Mac};
use sha2::Sha256;

use crate::domain::{ChannelName, CustomerId, Scope, ServiceSlug, Target};

type HmacSha256 = hmac::Hmac<Sha256>;

/// The layout version this build writes.
pub const VERSION: u8 = 1;
/// Longest token, in characters.
pub const MAX_TOKEN_CHARS: usize = 200;
/// Bytes of the truncated HMAC tag.
pub const TAG_BYTES: usize = 16;
/// Shortest accepted secret.
pub const MIN_SECRET_BYTES: usize = 32;

/// A signing secret. Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps secret bytes, refusing fewer than [`MIN_SECRET_BYTES`].
    pub fn new(bytes: Vec<u8>) -> Result<Secret, String> {
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "a token secret must have at least {MIN_SECRET_BYTES} bytes, this one has {}",
                bytes.len()
            ));
        }
        Ok(Secret(bytes))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A key: its id and secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenKey {
    /// Written into every token it signs.
    pub id: u8,
    /// The HMAC key.
    pub secret: Secret,
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// Whose link it is.
    pub customer: CustomerId,
    /// What it unsubscribes from.
    pub scope: Scope,
    /// When it was issued, seconds since the epoch.
    pub issued_at: u32,
    /// Whether its lifetime has passed: it may still opt out, nothing else.
    pub expired: bool,
}

/// Why a token was refused. Callers show every variant the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not base64, wrong length, bad fields, unknown version.
    Malformed,
    /// Signed by a key id not listed.
    UnknownKey,
    /// The tag does not verify.
    BadSignature,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("this link is invalid or has expired")
    }
}

impl std::error::Error for TokenError {}

/// The configured keys and lifetime: the first key signs, every key verifies.
#[derive(Debug, Clone)]
pub struct Tokens {
    keys: Vec<TokenKey>,
    lifetime_secs: u64,
}

impl Tokens {
    /// Builds the signer; `keys` must not be empty and ids must be distinct.
    pub fn new(keys: Vec<TokenKey>, lifetime_secs: u64) -> Result<Tokens, String> {
        if keys.is_empty() {
            return Err("at least one token key is needed".into());
        }
        for (i, k) in keys.iter().enumerate() {
            if keys[..i].iter().any(|o| o.id == k.id) {
                return Err(format!("token key id {} is listed twice", k.id));
            }
        }
        Ok(Tokens { keys, lifetime_secs })
    }

    /// Token lifetime in seconds.
    pub fn lifetime_secs(&self) -> u64 {
        self.lifetime_secs
    }

    /// Signs a token for `customer` and `scope`, issued at `now` (seconds).
    /// Fails only when the slugs are too long to fit [`MAX_TOKEN_CHARS`].
    pub fn issue(&self, customer: CustomerId, scope: &Scope, now: u64) -> Result<String, String> {
        let key = &self.keys[0];
        let mut bytes = Vec::with_capacity(64);
        bytes.push(VERSION);
        bytes.push(key.id);
        let mut c = customer.0;
        loop {
            let low = (c & 0x7f) as u8;
            c >>= 7;
            if c == 0 {
                bytes.push(low);
                break;
            }
            bytes.push(low | 0x80);
        }
        bytes.extend_from_slice(&u32::try_from(now).unwrap_or(u32::MAX).to_be_bytes());
        for side in
            [scope.service.one().map(ServiceSlug::as_str), scope.channel.one().map(ChannelName::as_str)]
        {
            let s = side.unwrap_or("");
            bytes.push(s.len() as u8);
            bytes.extend_from_slice(s.as_bytes());
        }
        let tag = mac(&key.secret, &bytes).finalize().into_bytes();
        bytes.extend_from_slice(&tag[..TAG_BYTES]);
        let token = URL_SAFE_NO_PAD.encode(&bytes);
        if token.len() > MAX_TOKEN_CHARS {
            return Err(format!(
                "the service and channel names are too long for a {MAX_TOKEN_CHARS}-character token"
            ));
        }
        Ok(token)
    }

    /// Verifies `token` at time `now` (seconds). The tag is checked in
    /// constant time before any field is trusted.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        if token.is_empty() || token.len() > MAX_TOKEN_CHARS {
            return Err(TokenError::Malformed);
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| TokenError::Malformed)?;
        if bytes.len() < 2 + 1 + 4 + 2 + TAG_BYTES || bytes[0] != VERSION {
            return Err(TokenError::Malformed);
        }
        let (body, tag) = bytes.split_at(bytes.len() - TAG_BYTES);
        let key = self.keys.iter().find(|k| k.id == body[1]).ok_or(TokenError::UnknownKey)?;
        mac(&key.secret, body).verify_truncated_left(tag).map_err(|_| TokenError::BadSignature)?;
        let claims = parse_body(&body[2..]).ok_or(TokenError::Malformed)?;
        let expired = now.saturating_sub(u64::from(claims.1)) > self.lifetime_secs;
        Ok(Claims { customer: claims.0, scope: claims.2, issued_at: claims.1, expired })
    }
}

fn mac(secret: &Secret, bytes: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(&secret.0).expect("HMAC takes keys of any length");
    mac.update(bytes);
    mac
}

/// Parses customer, issue time and scope; `None` on any deviation from the
/// layout, including trailing bytes and non-shortest varints.
fn parse_body(mut b: &[u8]) -> Option<(CustomerId, u32, Scope)> {
    let mut customer: u64 = 0;
    for i in 0..10 {
        let (&byte, rest) = b.split_first()?;
        b = rest;
        let part = u64::from(byte & 0x7f);
        if i == 9 && byte > 1 {
            return None;
        }
        customer |= part << (7 * i);
        if byte & 0x80 == 0 {
            if byte == 0 && i > 0 {
                return None;
            }
            break;
        }
        if i == 9 {
            return None;
        }
    }
    let (time, rest) = b.split_at_checked(4)?;
    b = rest;
    let issued_at = u32::from_be_bytes(time.try_into().ok()?);
    let mut field = || -> Option<Option<String>> {
        let (&n, rest) = b.split_first()?;
        let (s, rest) = rest.split_at_checked(usize::from(n))?;
        b = rest;
        if n == 0 { Some(None) } else { Some(Some(std::str::from_utf8(s).ok()?.to_owned())) }
    };
    let service = match field()? {
        None => Target::All,
        Some(s) => Target::One(ServiceSlug::parse(&s).ok()?),
    };
    let channel = match field()? {
        None => Target::All,
        Some(c) => Target::One(ChannelName::parse(&c).ok()?),
    };
    if !b.is_empty() {
        return None;
    }
    Some((CustomerId(customer), issued_at, Scope { service, channel }))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const DAY: u64 = 86_400;
    const NOW: u64 = 1_790_000_000;

    fn key(id: u8, fill: u8) -> TokenKey {
        TokenKey { id, secret: Secret::new(vec![fill; 32]).unwrap() }
    }

    fn tokens(keys: Vec<TokenKey>) -> Tokens {
        Tokens::new(keys, 30 * DAY).unwrap()
    }

    fn scope(s: &str, c: &str) -> Scope {
        Scope::parse(s, c).unwrap()
    }

    #[test]
    fn round_trips_every_scope_shape() {
        let t = tokens(vec![key(1, 7)]);
        for (s, c) in [("rating", "email"), ("*", "sms"), ("rating", "*"), ("*", "*")] {
            for customer in [0, 1, 127, 128, 300, u32::MAX as u64 + 1, u64::MAX] {
                let token = t.issue(CustomerId(customer), &scope(s, c), NOW).unwrap();
                assert!(token.len() <= MAX_TOKEN_CHARS);
                assert!(
                    token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                    "{token}"
                );
                let claims = t.verify(&token, NOW + 5).unwrap();
                assert_eq!(claims.customer, CustomerId(customer));
                assert_eq!(claims.scope, scope(s, c));
                assert_eq!(u64::from(claims.issued_at), NOW);
                assert!(!claims.expired);
            }
        }
    }

    #[test]
    fn longest_names_still_fit_or_are_refused_cleanly() {
        let t = tokens(vec![key(1, 7)]);
        let typical = t.issue(CustomerId(123_456_789), &scope("appointment", "email"), NOW).unwrap();
        assert!(typical.len() < 80, "{}", typical.len());
        let long = "a".repeat(64);
        assert!(t.issue(CustomerId(u64::MAX), &scope(&long, &long), NOW).is_err());
        let fits = "a".repeat(58);
        assert!(t.issue(CustomerId(u64::MAX), &scope(&fits, &fits), NOW).unwrap().len() <= MAX_TOKEN_CHARS);
    }

    #[test]
    fn expiry_is_reported_not_refused() {
        let t = tokens(vec![key(1, 7)]);
        let token = t.issue(CustomerId(5), &scope("rating", "email"), NOW).unwrap();
        assert!(!t.verify(&token, NOW + 30 * DAY).unwrap().expired);
        assert!(t.verify(&token, NOW + 30 * DAY + 1).unwrap().expired);
        // A clock behind the issue time does not make a token expire.
        assert!(!t.verify(&token, NOW - DAY).unwrap().expired);
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_and_unlisted_keys_fail() {
        let old = tokens(vec![key(1, 7)]);
        let token = old.issue(CustomerId(5), &scope("rating", "email"), NOW).unwrap();
        let rotated = tokens(vec![key(2, 9), key(1, 7)]);
        assert_eq!(rotated.verify(&token, NOW).unwrap().customer, CustomerId(5));
        let new = rotated.issue(CustomerId(6), &scope("rating", "email"), NOW).unwrap();
        assert_eq!(old.verify(&new, NOW), Err(TokenError::UnknownKey));
        // Same id, different secret: the signature fails.
        let impostor = tokens(vec![key(1, 8)]);
        assert_eq!(impostor.verify(&token, NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn secrets_are_long_and_never_printed() {
        assert!(Secret::new(vec![1; 31]).is_err());
        let s = Secret::new(vec![0xAB; 32]).unwrap();
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert!(Tokens::new(vec![key(1, 1), key(1, 2)], DAY).is_err());
    }

    proptest! {
        #[test]
        fn any_flipped_bit_truncation_or_extension_is_rejected(
            customer in any::<u64>(),
            bit in 0usize..1024,
            cut in 1usize..40,
            extra in proptest::collection::vec(any::<u8>(), 1..8),
        ) {
            let t = tokens(vec![key(3, 5)]);
            let token = t.issue(CustomerId(customer), &scope("waitlist", "sms"), NOW).unwrap();
            let bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();

            let mut flipped = bytes.clone();
            let bit = bit % (flipped.len() * 8);
            flipped[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(t.verify(&URL_SAFE_NO_PAD.encode(&flipped), NOW).is_err());

            let cut = cut.min(bytes.len());
            prop_assert!(t.verify(&URL_SAFE_NO_PAD.encode(&bytes[..bytes.len() - cut]), NOW).is_err());
            prop_assert!(t.verify(&token[..token.len() - cut.min(token.len())], NOW).is_err());

            let mut longer = bytes.clone();
            longer.extend_from_slice(&extra);
            prop_assert!(t.verify(&URL_SAFE_NO_PAD.encode(&longer), NOW).is_err());
            let extended = format!("{}A", token);
            prop_assert!(t.verify(&extended, NOW).is_err());
        }

        #[test]
        fn arbitrary_input_never_panics(s in ".{0,300}", raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            let t = tokens(vec![key(1, 7)]);
            let _ = t.verify(&s, NOW);
            let _ = t.verify(&URL_SAFE_NO_PAD.encode(&raw), NOW);
            // Bodies that parse but carry any bytes: never a panic.
            let _ = parse_body(&raw);
        }
    }
}
