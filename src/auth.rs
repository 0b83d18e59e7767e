//! API keys: names, roles, and the SHA-256 hashes they are kept as.
//!
//! Keys are high-entropy random strings, so a plain SHA-256 is the right
//! hash (a slow password hash would buy nothing and cost every request).
//! A presented key is hashed and looked up by hash; the lookup's timing can
//! only reveal something about a hash, never about a key.

use std::collections::HashMap;
use std::fmt;

use sha2::{Digest, Sha256};

/// What a key may do. Roles are ordered: each may do what the ones before
/// it may, so a route names the least role it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Check, filter and issue tokens; read services and channels.
    Sender,
    /// Staff: also read customers, change their preferences (with a reason,
    /// see [`require_reason`]) and read the audit log. No service
    /// management, no keys.
    Support,
    /// Everything.
    Admin,
}

impl Role {
    /// Parses `sender`, `support` or `admin`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "sender" => Some(Role::Sender),
            "support" => Some(Role::Support),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Sender => "sender",
            Role::Support => "support",
            Role::Admin => "admin",
        })
    }
}

/// A configured key: its name, role and hash.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Shown in the audit log as the actor.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the key.
    pub hash: [u8; 32],
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey").field("name", &self.name).field("role", &self.role).finish_non_exhaustive()
    }
}

/// SHA-256 of a key, as the configuration stores it (lowercase hex).
pub fn hash_key(key: &str) -> String {
    to_hex(&Sha256::digest(key.as_bytes()))
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 64 hex digits into a hash.
pub fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.strip_prefix("sha256:").unwrap_or(hex);
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Who a request is, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's name, or `local` when no keys are configured.
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// Support staff change a customer's preferences on someone's behalf, so
/// the audit log must say why: a support caller's change without a reason
/// is refused with 400 `reason_required`. Admins and automation keep the
/// reason optional.
pub fn require_reason(caller: &Caller, reason: Option<&str>) -> Result<(), crate::error::ApiError> {
    if caller.role == Role::Support && reason.is_none_or(|r| r.trim().is_empty()) {
        return Err(crate::error::ApiError::bad_request(
            "reason_required",
            "a support key must give a reason for every preference change: send a non-empty \"reason\"",
        ));
    }
    Ok(())
}

/// Why a request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No key, or an unknown one: 401.
    Unauthenticated,
    /// A known key without the role: 403.
    Forbidden,
}

/// The configured keys, by hash.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    by_hash: HashMap<[u8; 32], (String, Role)>,
}

impl Keys {
    /// Indexes the configured keys.
    pub fn new(keys: &[ApiKey]) -> Keys {
        Keys { by_hash: keys.iter().map(|k| (k.hash, (k.name.clone(), k.role))).collect() }
    }

    /// Whether any key is configured; with none, every local caller is admin.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Authenticates an `Authorization` header value and checks the role.
    pub fn authorize(&self, header: Option<&[u8]>, needs: Role) -> Result<Caller, Denied> {
        if self.by_hash.is_empty() {
            return Ok(Caller { name: "local".into(), role: Role::Admin });
        }
        let key = header.and_then(|h| h.strip_prefix(b"Bearer ")).ok_or(Denied::Unauthenticated)?;
        let hash: [u8; 32] = Sha256::digest(key).into();
        let (name, role) = self.by_hash.get(&hash).ok_or(Denied::Unauthenticated)?;
        if *role < needs {
            return Err(Denied::Forbidden);
        }
        Ok(Caller { name: name.clone(), role: *role })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_authenticate_by_hash_and_role() {
        let keys = Keys::new(&[
            ApiKey {
                name: "mailer".into(),
                role: Role::Sender,
                hash: parse_hash(&hash_key("s3cret-sender")).unwrap(),
            },
            ApiKey {
                name: "ops".into(),
                role: Role::Admin,
                hash: parse_hash(&hash_key("s3cret-admin")).unwrap(),
            },
        ]);
        assert_eq!(keys.authorize(Some(b"Bearer s3cret-sender"), Role::Sender).unwrap().name, "mailer");
        assert_eq!(keys.authorize(Some(b"Bearer s3cret-sender"), Role::Admin), Err(Denied::Forbidden));
        assert_eq!(keys.authorize(Some(b"Bearer s3cret-admin"), Role::Admin).unwrap().role, Role::Admin);
        assert_eq!(keys.authorize(Some(b"Bearer nope"), Role::Sender), Err(Denied::Unauthenticated));
        assert_eq!(keys.authorize(Some(b"s3cret-admin"), Role::Sender), Err(Denied::Unauthenticated));
        assert_eq!(keys.authorize(None, Role::Sender), Err(Denied::Unauthenticated));
    }

    #[test]
    fn support_sits_between_sender_and_admin() {
        let keys = Keys::new(&[ApiKey {
            name: "dana".into(),
            role: Role::Support,
            hash: parse_hash(&hash_key("s3cret-support")).unwrap(),
        }]);
        let key = Some(&b"Bearer s3cret-support"[..]);
        assert_eq!(keys.authorize(key, Role::Sender).unwrap().name, "dana");
        assert_eq!(keys.authorize(key, Role::Support).unwrap().role, Role::Support);
        assert_eq!(keys.authorize(key, Role::Admin), Err(Denied::Forbidden));
        assert_eq!(Role::parse("support"), Some(Role::Support));
        assert_eq!(Role::Support.to_string(), "support");
        let dana = Caller { name: "dana".into(), role: Role::Support };
        let ops = Caller { name: "ops".into(), role: Role::Admin };
        assert_eq!(require_reason(&dana, None).unwrap_err().code, "reason_required");
        assert_eq!(require_reason(&dana, Some("  ")).unwrap_err().status, 400);
        assert!(require_reason(&dana, Some("called in")).is_ok());
        assert!(require_reason(&ops, None).is_ok());
    }

    #[test]
    fn hashes_parse_with_or_without_prefix() {
        let h = hash_key("k");
        assert_eq!(parse_hash(&h), parse_hash(&format!("sha256:{h}")));
        assert!(parse_hash("zz").is_none());
        assert!(parse_hash(&"g".repeat(64)).is_none());
    }
}
