//! One customer as the console shows it: the services × channels grid with
//! the record that decides each cell, the timeline, and the exports.
//!
//! The effective status comes from the index (what a check answers); the
//! deciding record is the most recently written of the customer's records
//! whose scope covers the pair — the resolution rule — and its actor is
//! read from that record's audit entry.
//!
//! Policies (`required`, `consent`, see DESIGN.md "Service policies") slot
//! in at [`Cell::decided_by`]: a cell then also names the policy when the
//! policy, not a record, decides.

use serde::Serialize;

use crate::domain::{CustomerId, PreferenceChange, Record, Scope, Service, Status, Target};
use crate::index::Index;

/// What decides a cell.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Decision {
    /// No record covers the pair: the default, opted in.
    Default,
    /// This record, the newest covering the pair.
    Record {
        /// The record's scope, e.g. `*` / `email`.
        service: String,
        /// Its channel side.
        channel: String,
        /// Its status.
        status: Status,
        /// When it was last written (RFC 3339).
        at: String,
        /// How it was written.
        source: String,
        /// Who wrote it (from its audit entry).
        actor: Option<String>,
        /// Why.
        reason: Option<String>,
        /// Its audit sequence number.
        seq: u64,
    },
}

/// One (service, channel) cell of the grid.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// The channel.
    pub channel: String,
    /// Whether a check allows a send (from the index).
    pub allowed: bool,
    /// The record (or default) that decides it.
    pub decided_by: Decision,
}

/// One service's row of the grid.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The service's slug.
    pub service: String,
    /// Its display name.
    pub name: String,
    /// Whether it is archived.
    pub archived: bool,
    /// One cell per configured channel, in order.
    pub cells: Vec<Cell>,
}

/// A timeline entry (an audit entry of this customer).
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Sequence number.
    pub seq: u64,
    /// When (RFC 3339).
    pub at: String,
    /// Scope service side.
    pub service: String,
    /// Scope channel side.
    pub channel: String,
    /// The scope's explicit status before.
    pub before: Option<Status>,
    /// The status written.
    pub after: Status,
    /// Why.
    pub reason: Option<String>,
    /// How.
    pub source: String,
    /// Who.
    pub actor: String,
    /// The client's address, when known.
    pub client_addr: Option<String>,
    /// The client's user agent, when known.
    pub user_agent: Option<String>,
}

/// An explicit record, as the export lists it.
#[derive(Debug, Clone, Serialize)]
pub struct RecordRow {
    /// Scope service side.
    pub service: String,
    /// Scope channel side.
    pub channel: String,
    /// Status.
    pub status: Status,
    /// Reason.
    pub reason: Option<String>,
    /// Source of the latest write.
    pub source: String,
    /// First written.
    pub created_at: String,
    /// Last written.
    pub updated_at: String,
    /// Sequence number of the latest write.
    pub seq: u64,
}

/// Everything the console shows (and exports) about one customer.
#[derive(Debug, Clone, Serialize)]
pub struct CustomerView {
    /// The customer.
    pub customer: CustomerId,
    /// The grid, one row per service.
    pub grid: Vec<Row>,
    /// The explicit records.
    pub records: Vec<RecordRow>,
    /// The timeline, newest first.
    pub timeline: Vec<Entry>,
}

fn covers(scope: &Scope, service: &str, channel: &str) -> bool {
    let s = match &scope.service {
        Target::All => true,
        Target::One(x) => x.as_str() == service,
    };
    let h = match &scope.channel {
        Target::All => true,
        Target::One(x) => x.as_str() == channel,
    };
    s && h
}

/// The record that decides (service, channel): the most recently written
/// (highest sequence number) of those whose scope covers the pair.
pub fn deciding<'a>(
    records: &'a [(Scope, Record)],
    service: &str,
    channel: &str,
) -> Option<&'a (Scope, Record)> {
    records.iter().filter(|(scope, _)| covers(scope, service, channel)).max_by_key(|(_, r)| r.seq)
}

impl CustomerView {
    /// Builds the view from the stored records and events and the index.
    pub fn build(
        customer: CustomerId,
        services: &[Service],
        index: &Index,
        records: &[(Scope, Record)],
        events: Vec<(u64, PreferenceChange)>,
    ) -> CustomerView {
        let actor_of = |seq: u64| {
            events.binary_search_by_key(&seq, |(s, _)| *s).ok().map(|i| events[i].1.origin.actor.clone())
        };
        let grid = services
            .iter()
            .map(|s| Row {
                service: s.slug.to_string(),
                name: s.name.clone(),
                archived: s.archived,
                cells: index
                    .channels()
                    .iter()
                    .map(|h| {
                        let allowed = index.allowed(customer, s.slug.as_str(), h.as_str()).unwrap_or(true);
                        let decided_by = match deciding(records, s.slug.as_str(), h.as_str()) {
                            None => Decision::Default,
                            Some((scope, r)) => Decision::Record {
                                service: scope.service.to_string(),
                                channel: scope.channel.to_string(),
                                status: r.status,
                                at: r.updated_at.rfc3339(),
                                source: r.source.clone(),
                                actor: actor_of(r.seq),
                                reason: r.reason.clone(),
                                seq: r.seq,
                            },
                        };
                        Cell { channel: h.to_string(), allowed, decided_by }
                    })
                    .collect(),
            })
            .collect();
        let records = records
            .iter()
            .map(|(scope, r)| RecordRow {
                service: scope.service.to_string(),
                channel: scope.channel.to_string(),
                status: r.status,
                reason: r.reason.clone(),
                source: r.source.clone(),
                created_at: r.created_at.rfc3339(),
                updated_at: r.updated_at.rfc3339(),
                seq: r.seq,
            })
            .collect();
        let timeline = events
            .into_iter()
            .rev()
            .map(|(seq, c)| Entry {
                seq,
                at: c.at.rfc3339(),
                service: c.scope.service.to_string(),
                channel: c.scope.channel.to_string(),
                before: c.before,
                after: c.after,
                reason: c.reason,
                source: c.origin.source,
                actor: c.origin.actor,
                client_addr: c.origin.client_addr,
                user_agent: c.origin.user_agent,
            })
            .collect();
        CustomerView { customer, grid, records, timeline }
    }

    /// The JSON export. `<`, `>` and `&` are written as `\u003c` and so on,
    /// so the file stays inert even if something renders it as HTML.
    pub fn to_json(&self) -> Vec<u8> {
        let text = serde_json::to_string_pretty(self).expect("the view serializes");
        let mut out = String::with_capacity(text.len() + 64);
        for c in text.chars() {
            match c {
                '<' => out.push_str("\\u003c"),
                '>' => out.push_str("\\u003e"),
                '&' => out.push_str("\\u0026"),
                c => out.push(c),
            }
        }
        out.push('\n');
        out.into_bytes()
    }

    /// The CSV export: the timeline, one audit entry per row, oldest first,
    /// then nothing else — the records and grid are derived from it.
    pub fn to_csv(&self) -> Vec<u8> {
        let mut w = csv::Writer::from_writer(Vec::new());
        let _ = w.write_record([
            "customer",
            "seq",
            "at",
            "service",
            "channel",
            "before",
            "after",
            "reason",
            "source",
            "actor",
            "client_addr",
            "user_agent",
        ]);
        let customer = self.customer.0.to_string();
        for e in self.timeline.iter().rev() {
            let _ = w.write_record([
                customer.as_str(),
                &e.seq.to_string(),
                &e.at,
                &e.service,
                &e.channel,
                e.before.map_or("", Status::as_str),
                e.after.as_str(),
                &csv_cell(e.reason.as_deref().unwrap_or("")),
                &csv_cell(&e.source),
                &csv_cell(&e.actor),
                &csv_cell(e.client_addr.as_deref().unwrap_or("")),
                &csv_cell(e.user_agent.as_deref().unwrap_or("")),
            ]);
        }
        w.into_inner().unwrap_or_default()
    }
}

/// A free-text CSV cell that a spreadsheet will not run as a formula: one
/// starting with `=`, `+`, `-`, `@`, tab or CR gets a leading `'`.
pub fn csv_cell(s: &str) -> String {
    match s.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{s}"),
        _ => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Micros;

    fn record(status: Status, seq: u64) -> Record {
        Record {
            status,
            reason: None,
            source: "api".into(),
            created_at: Micros(0),
            updated_at: Micros(0),
            seq,
        }
    }

    #[test]
    fn the_newest_covering_record_decides() {
        let records = vec![
            (Scope::parse("*", "*").unwrap(), record(Status::OptedOut, 5)),
            (Scope::parse("rating", "email").unwrap(), record(Status::OptedIn, 3)),
            (Scope::parse("rating", "*").unwrap(), record(Status::OptedIn, 7)),
            (Scope::parse("waitlist", "sms").unwrap(), record(Status::OptedIn, 9)),
        ];
        assert_eq!(deciding(&records, "rating", "email").unwrap().1.seq, 7);
        assert_eq!(deciding(&records, "waitlist", "email").unwrap().1.seq, 5);
        assert_eq!(deciding(&records, "waitlist", "sms").unwrap().1.seq, 9);
        assert!(deciding(&records[3..], "rating", "email").is_none());
    }

    #[test]
    fn formulas_are_defused() {
        assert_eq!(csv_cell("=HYPERLINK(1)"), "'=HYPERLINK(1)");
        assert_eq!(csv_cell("-1"), "'-1");
        assert_eq!(csv_cell("called <b>in</b>"), "called <b>in</b>");
    }
}
