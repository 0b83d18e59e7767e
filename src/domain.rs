//! The domain types: customer ids, service slugs, channel names, scopes,
//! statuses, preference records, services and audit entries.
//!
//! Untrusted input is parsed once into these newtypes; everything past the
//! HTTP and CLI edges takes them as already valid.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest accepted reason, in characters.
pub const MAX_REASON_CHARS: usize = 500;
/// Longest accepted service display name, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Longest accepted service description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 2000;

/// Why a piece of input was refused; the message is written for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidInput(pub String);

impl fmt::Display for InvalidInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidInput {}

/// A customer of the host application, named by the host's own u64 id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct CustomerId(pub u64);

impl CustomerId {
    /// Parses a decimal string such as a path segment or a query value.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        // `u64::from_str` accepts a leading '+'; ids are plain digits only.
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidInput(format!(
                "customer id {:?} is not an unsigned 64-bit decimal integer",
                truncate(s, 40)
            )));
        }
        s.parse()
            .map(CustomerId)
            .map_err(|_| InvalidInput(format!("customer id {s} is out of range (at most {})", u64::MAX)))
    }
}

impl fmt::Display for CustomerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for CustomerId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = CustomerId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a customer id: an unsigned 64-bit integer or its decimal string")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<CustomerId, E> {
                Ok(CustomerId(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<CustomerId, E> {
                u64::try_from(v)
                    .map(CustomerId)
                    .map_err(|_| E::custom(format!("customer id {v} is negative")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<CustomerId, E> {
                Err(E::custom(format!("customer id {v} is not an unsigned 64-bit integer")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<CustomerId, E> {
                CustomerId::parse(v).map_err(E::custom)
            }
        }
        // Stored formats (postcard) are not self-describing: there the id is a u64.
        if d.is_human_readable() { d.deserialize_any(V) } else { d.deserialize_u64(V) }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// True when `s` matches `[a-z0-9][a-z0-9_-]{0,63}`.
fn is_slug(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

macro_rules! slug_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates `s` against `[a-z0-9][a-z0-9_-]{0,63}`.
            pub fn parse(s: &str) -> Result<Self, InvalidInput> {
                if is_slug(s) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(InvalidInput(format!(
                        concat!($what, " {:?} is not valid: use 1 to 64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit"),
                        truncate(s, 80)
                    )))
                }
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

slug_type!(
    /// A service that sends notifications (`rating`, `waitlist`, …).
    ServiceSlug,
    "service slug"
);
slug_type!(
    /// A notification channel (`email`, `sms`, or one the configuration adds).
    ChannelName,
    "channel"
);

/// One side of a scope: a named thing or `*`, "all of them".
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target<T> {
    /// `*`: every service (or every channel), including ones added later.
    All,
    /// Exactly this one.
    One(T),
}

impl<T: fmt::Display> fmt::Display for Target<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::All => f.write_str("*"),
            Target::One(t) => t.fmt(f),
        }
    }
}

impl<T> Target<T> {
    /// The named thing, or `None` for `*`.
    pub fn one(&self) -> Option<&T> {
        match self {
            Target::All => None,
            Target::One(t) => Some(t),
        }
    }
}

/// The (service, channel) pair a preference applies to; either side may be `*`.
/// Serialized as `{"service": "rating", "channel": "*"}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "ScopeText", into = "ScopeText")]
pub struct Scope {
    /// Which service, or all.
    pub service: Target<ServiceSlug>,
    /// Which channel, or all.
    pub channel: Target<ChannelName>,
}

impl Scope {
    /// Parses a service and a channel as given in a path, where `*` means all.
    /// Whether the channel is configured is checked by the caller.
    pub fn parse(service: &str, channel: &str) -> Result<Self, InvalidInput> {
        let service = match service {
            "*" => Target::All,
            s => Target::One(ServiceSlug::parse(s)?),
        };
        let channel = match channel {
            "*" => Target::All,
            c => Target::One(ChannelName::parse(c)?),
        };
        Ok(Scope { service, channel })
    }

    /// The key of this scope in storage: `service/channel`, `*` for all.
    pub fn key(&self) -> String {
        format!("{}/{}", self.service, self.channel)
    }

    /// The inverse of [`Scope::key`].
    pub fn from_key(key: &str) -> Result<Self, InvalidInput> {
        let (s, c) =
            key.split_once('/').ok_or_else(|| InvalidInput(format!("scope key {key:?} has no '/'")))?;
        Scope::parse(s, c)
    }
}

#[derive(Serialize, Deserialize)]
struct ScopeText {
    service: String,
    channel: String,
}

impl TryFrom<ScopeText> for Scope {
    type Error = InvalidInput;
    fn try_from(t: ScopeText) -> Result<Self, InvalidInput> {
        Scope::parse(&t.service, &t.channel)
    }
}

impl From<Scope> for ScopeText {
    fn from(s: Scope) -> Self {
        ScopeText { service: s.service.to_string(), channel: s.channel.to_string() }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {})", self.service, self.channel)
    }
}

/// An explicit choice: the customer opted in or out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// May receive notifications in this scope.
    OptedIn,
    /// Must not receive notifications in this scope.
    OptedOut,
}

impl Status {
    /// The wire name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::OptedIn => "opted_in",
            Status::OptedOut => "opted_out",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        match s {
            "opted_in" => Ok(Status::OptedIn),
            "opted_out" => Ok(Status::OptedOut),
            other => Err(InvalidInput(format!(
                "status {:?} is not valid: use \"opted_in\" or \"opted_out\"",
                truncate(other, 40)
            ))),
        }
    }
}

/// Validates an optional free-text reason (at most [`MAX_REASON_CHARS`]).
pub fn check_reason(reason: Option<String>) -> Result<Option<String>, InvalidInput> {
    match reason {
        Some(r) if r.chars().count() > MAX_REASON_CHARS => Err(InvalidInput(format!(
            "reason is {} characters long; at most {MAX_REASON_CHARS} are allowed",
            r.chars().count()
        ))),
        Some(r) if r.is_empty() => Ok(None),
        other => Ok(other),
    }
}

/// Microseconds since the Unix epoch, UTC: how prefsd stores instants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Micros(pub i64);

impl Micros {
    /// The current instant.
    pub fn now() -> Self {
        Micros(jiff::Timestamp::now().as_microsecond())
    }

    /// RFC 3339 in UTC, e.g. `2026-11-26T05:53:23.123456Z`.
    pub fn rfc3339(self) -> String {
        match jiff::Timestamp::from_microsecond(self.0) {
            Ok(t) => t.to_string(),
            Err(_) => "invalid".to_owned(),
        }
    }
}

impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rfc3339())
    }
}

/// Where a change came from, and who made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// How: `api`, `admin`, `token`, `one_click`, `import`, …
    pub source: String,
    /// Who: an API key's name, or `recipient` for token use.
    pub actor: String,
    /// The client address, for token use.
    pub client_addr: Option<String>,
    /// The client's user agent, for token use.
    pub user_agent: Option<String>,
}

/// The stored explicit record of one customer for one scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The customer's choice.
    pub status: Status,
    /// Free text, at most 500 characters.
    pub reason: Option<String>,
    /// Where the latest change came from.
    pub source: String,
    /// When the record was first written.
    pub created_at: Micros,
    /// When it was last written.
    pub updated_at: Micros,
    /// Sequence number of the event that last wrote it; later wins.
    pub seq: u64,
}

/// A registered service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Its slug.
    pub slug: ServiceSlug,
    /// Display name.
    pub name: String,
    /// What it sends.
    pub description: String,
    /// Archived services keep their history and refuse new writes.
    pub archived: bool,
    /// When it was registered.
    pub created_at: Micros,
    /// When it was last changed.
    pub updated_at: Micros,
}

impl Service {
    /// The service after a rename, description change, archive or restore at `now`.
    pub fn updated(
        &self,
        name: Option<&String>,
        description: Option<&String>,
        archived: Option<bool>,
        now: Micros,
    ) -> Service {
        Service {
            name: name.cloned().unwrap_or_else(|| self.name.clone()),
            description: description.cloned().unwrap_or_else(|| self.description.clone()),
            archived: archived.unwrap_or(self.archived),
            updated_at: now,
            ..self.clone()
        }
    }
}

/// One change of a preference, as appended to the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreferenceChange {
    /// Whose preference.
    pub customer: CustomerId,
    /// Which scope.
    pub scope: Scope,
    /// The scope's explicit status before, `None` if it had no record.
    pub before: Option<Status>,
    /// The status written.
    pub after: Status,
    /// The reason given.
    pub reason: Option<String>,
    /// Who and how.
    pub origin: Origin,
    /// When.
    pub at: Micros,
}

/// A change of a service's registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceChange {
    /// The service as it is after the change.
    pub service: Service,
    /// Whether this change created it.
    pub created: bool,
    /// The API key name that made the change.
    pub actor: String,
}

/// Every change prefsd applies, in sequence order: the event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A customer's preference was written.
    Preference(PreferenceChange),
    /// A service was created, renamed or archived.
    Service(ServiceChange),
    /// `prefsd recover` dropped part of a damaged write-ahead log. Added
    /// last, so stored events keep their postcard encoding.
    Recovery(RecoveryNote),
}

/// What `prefsd recover` lost from a damaged write-ahead log: the audit
/// log's record of the loss. It changes no preference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryNote {
    /// When the recovery ran.
    pub at: Micros,
    /// The copy of the damaged log that was kept, by file name.
    pub copy: String,
    /// Byte offset of the first damaged frame.
    pub offset: u64,
    /// Events replayed: every intact frame, before and after the damage.
    pub replayed: u64,
    /// Events lost: held by the damaged bytes, or intact but undecodable.
    pub dropped: u64,
    /// The lowest and highest lost sequence number, if any; lost numbers
    /// are never given to another event.
    pub dropped_seqs: Option<(u64, u64)>,
    /// Bytes of the log that were not an intact frame.
    pub unreadable_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customer_ids_accept_numbers_and_decimal_strings_only() {
        let ok: Vec<CustomerId> =
            serde_json::from_str(r#"[1, "2", 18446744073709551615, "18446744073709551615"]"#).unwrap();
        assert_eq!(ok, vec![CustomerId(1), CustomerId(2), CustomerId(u64::MAX), CustomerId(u64::MAX)]);
        for bad in [
            r#"-1"#,
            r#""-1""#,
            r#"1.5"#,
            r#""+1""#,
            r#""""#,
            r#""18446744073709551616""#,
            r#"18446744073709551616"#,
            r#"true"#,
            r#"null"#,
            r#"" 1""#,
        ] {
            assert!(serde_json::from_str::<CustomerId>(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn slugs_follow_the_pattern() {
        for ok in ["a", "rating", "0day", "wait_list-2", &"a".repeat(64)] {
            assert!(ServiceSlug::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "_a", "Rating", "a b", "a/b", "*", "é", &"a".repeat(65)] {
            assert!(ServiceSlug::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scope_keys_round_trip() {
        for (s, c) in [("rating", "email"), ("*", "sms"), ("rating", "*"), ("*", "*")] {
            let scope = Scope::parse(s, c).unwrap();
            assert_eq!(Scope::from_key(&scope.key()).unwrap(), scope);
        }
    }

    #[test]
    fn reasons_are_limited_in_characters_not_bytes() {
        assert!(check_reason(Some("é".repeat(500))).is_ok());
        assert!(check_reason(Some("é".repeat(501))).is_err());
        assert_eq!(check_reason(Some(String::new())).unwrap(), None);
    }
}
