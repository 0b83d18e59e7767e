//! The per-session CSRF token every console form carries in a field named
//! `csrf`, compared in constant time.

use subtle::ConstantTimeEq;

use super::session::Staff;

/// Whether a form's `csrf` field is the session's token. A missing field
/// never matches. Lengths are public (every token is 43 characters), so
/// only the content comparison needs to be constant-time.
pub fn valid(staff: &Staff, sent: Option<&str>) -> bool {
    match sent {
        Some(sent) if sent.len() == staff.csrf.len() => sent.as_bytes().ct_eq(staff.csrf.as_bytes()).into(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    #[test]
    fn only_the_sessions_own_token_passes() {
        let staff = Staff { name: "dana".into(), role: Role::Support, csrf: "a".repeat(43) };
        assert!(valid(&staff, Some(&"a".repeat(43))));
        assert!(!valid(&staff, Some(&format!("{}b", "a".repeat(42)))));
        assert!(!valid(&staff, Some("")));
        assert!(!valid(&staff, Some(&"a".repeat(44))));
        assert!(!valid(&staff, None));
    }
}
