//! The chained checksum of the event log: each event's checksum covers the
//! previous event's checksum, so two logs that agree on the checksum at a
//! sequence number agree on every event up to it. PostgreSQL stores it per
//! event (`prefsd_events.chain`) and at the head; a sidecar stores the one
//! of its last applied event beside `last_seq`, in the same redb commit.
//!
//! It is computed over the event's postcard encoding (not the JSON text,
//! which `jsonb` reorders), so the writer, which has the event in memory,
//! and a follower, which decodes it from PostgreSQL, compute the same value.

use sha2::{Digest, Sha256};

use crate::domain::Event;

/// The checksum of event `seq` following the checksum `prev` (0 before the first).
pub fn next(prev: u64, seq: u64, event: &Event) -> u64 {
    let body = postcard::to_allocvec(event).expect("postcard encodes into a Vec");
    let mut hash = Sha256::new();
    hash.update(prev.to_le_bytes());
    hash.update(seq.to_le_bytes());
    hash.update(&body);
    let digest = hash.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// As PostgreSQL's `bigint` holds it.
pub fn to_sql(chain: u64) -> i64 {
    chain as i64
}

/// From PostgreSQL's `bigint`.
pub fn from_sql(chain: i64) -> u64 {
    chain as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Micros, Service, ServiceChange, ServiceSlug};

    fn service(slug: &str) -> Event {
        Event::Service(ServiceChange {
            service: Service {
                slug: ServiceSlug::parse(slug).unwrap(),
                name: slug.into(),
                description: String::new(),
                archived: false,
                created_at: Micros(1),
                updated_at: Micros(1),
            },
            created: true,
            actor: "admin".into(),
        })
    }

    #[test]
    fn each_checksum_covers_the_previous_one_and_survives_json() {
        let (a, b) = (service("rating"), service("waitlist"));
        let one = next(0, 1, &a);
        assert_eq!(next(one, 2, &b), next(one, 2, &b));
        assert_ne!(next(one, 2, &b), next(next(0, 1, &b), 2, &b), "a different first event");
        assert_ne!(next(one, 2, &b), next(one, 3, &b), "a different sequence number");
        let json: Event = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        assert_eq!(next(one, 2, &json), next(one, 2, &b), "decoded from postgres's JSON");
        assert_eq!(from_sql(to_sql(u64::MAX - 3)), u64::MAX - 3);
    }
}
