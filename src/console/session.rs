//! Server-side console sessions: a random 256-bit id in the cookie, kept
//! here only as its SHA-256, with an idle and an absolute expiry.
//!
//! Sessions live in memory: a restart signs everyone out, which is the
//! safe direction. Time is passed in, so expiry is tested without waiting.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::auth::Role;

/// Most sessions kept at once; beyond it the least recently used one ends.
const MAX_SESSIONS: usize = 10_000;

/// What a signed-in request knows about its staff member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staff {
    /// The key's name: the actor of every change made in this session.
    pub name: String,
    /// The key's role (support or admin).
    pub role: Role,
    /// The session's CSRF token, as every form carries it.
    pub csrf: String,
}

#[derive(Debug)]
struct Session {
    staff: Staff,
    started: Instant,
    last_used: Instant,
}

/// The open sessions, by the hash of their id.
#[derive(Debug)]
pub struct Sessions {
    idle: Duration,
    absolute: Duration,
    open: Mutex<HashMap<[u8; 32], Session>>,
}

/// 32 random bytes, URL-safe base64 (43 characters).
pub fn random_token() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a session: {e}"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

fn hash(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    /// Sessions ending after `idle` unused or `absolute` after sign-in.
    pub fn new(idle: Duration, absolute: Duration) -> Sessions {
        Sessions { idle, absolute, open: Mutex::new(HashMap::new()) }
    }

    /// How long a new session may live at most (the cookie's Max-Age).
    pub fn absolute(&self) -> Duration {
        self.absolute
    }

    fn alive(&self, s: &Session, now: Instant) -> bool {
        now.saturating_duration_since(s.last_used) < self.idle
            && now.saturating_duration_since(s.started) < self.absolute
    }

    /// Opens a session for `name` with `role`; returns the cookie's id.
    pub fn open(&self, name: &str, role: Role, now: Instant) -> Result<String, String> {
        let id = random_token()?;
        let staff = Staff { name: name.to_owned(), role, csrf: random_token()? };
        let mut open = self.open.lock().expect("sessions lock");
        if open.len() >= MAX_SESSIONS {
            open.retain(|_, s| self.alive(s, now));
            if open.len() >= MAX_SESSIONS
                && let Some(oldest) = open.iter().min_by_key(|(_, s)| s.last_used).map(|(k, _)| *k)
            {
                open.remove(&oldest);
            }
        }
        open.insert(hash(&id), Session { staff, started: now, last_used: now });
        Ok(id)
    }

    /// The session of a cookie's id, if it is open and unexpired; using it
    /// resets its idle clock. An expired session is ended here.
    pub fn get(&self, id: &str, now: Instant) -> Option<Staff> {
        let key = hash(id);
        let mut open = self.open.lock().expect("sessions lock");
        let session = open.get_mut(&key)?;
        if !self.alive(session, now) {
            open.remove(&key);
            return None;
        }
        session.last_used = now;
        Some(session.staff.clone())
    }

    /// Ends a session (sign-out).
    pub fn close(&self, id: &str) {
        self.open.lock().expect("sessions lock").remove(&hash(id));
    }

    /// How many sessions are open (expired ones included until next touched).
    pub fn len(&self) -> usize {
        self.open.lock().expect("sessions lock").len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_when_idle_or_old_and_end_on_close() {
        let sessions = Sessions::new(Duration::from_secs(60), Duration::from_secs(600));
        let t0 = Instant::now();
        let id = sessions.open("dana", Role::Support, t0).unwrap();
        assert_eq!(id.len(), 43, "256 bits in URL-safe base64");
        let staff = sessions.get(&id, t0 + Duration::from_secs(59)).unwrap();
        assert_eq!((staff.name.as_str(), staff.role), ("dana", Role::Support));
        // Used at 59 s, so still alive at 118 s; idle past 60 s ends it.
        assert!(sessions.get(&id, t0 + Duration::from_secs(118)).is_some());
        assert!(sessions.get(&id, t0 + Duration::from_secs(179)).is_none());
        assert!(sessions.get(&id, t0 + Duration::from_secs(180)).is_none(), "ended for good");

        // Busy but past the absolute limit.
        let id = sessions.open("dana", Role::Support, t0).unwrap();
        for m in 1..10 {
            assert!(sessions.get(&id, t0 + Duration::from_secs(m * 59)).is_some());
        }
        assert!(sessions.get(&id, t0 + Duration::from_secs(600)).is_none());

        let id = sessions.open("ops", Role::Admin, t0).unwrap();
        sessions.close(&id);
        assert!(sessions.get(&id, t0).is_none());
        assert!(sessions.get("not-a-session", t0).is_none());
    }

    #[test]
    fn ids_are_stored_hashed_and_csrf_tokens_differ_per_session() {
        let sessions = Sessions::new(Duration::from_secs(60), Duration::from_secs(600));
        let t0 = Instant::now();
        let a = sessions.open("dana", Role::Support, t0).unwrap();
        let b = sessions.open("dana", Role::Support, t0).unwrap();
        assert_ne!(a, b);
        assert!(!sessions.open.lock().unwrap().keys().any(|k| k.as_slice() == a.as_bytes()));
        assert_ne!(sessions.get(&a, t0).unwrap().csrf, sessions.get(&b, t0).unwrap().csrf);
    }
}
