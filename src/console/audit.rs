//! The audit page: the whole log of preference changes, filtered by
//! source, actor, service, channel and date range, paged by sequence
//! number, and exported as CSV with exactly the filtered rows.
//!
//! Filters are exact matches on what the entry records (`service=*`
//! finds the broad "all services" entries), and dates are whole UTC days,
//! both ends included. The log is scanned in sequence order from the
//! first entry of the `from` day, found by binary search: entries are
//! appended with non-decreasing times.

use std::fmt::Write;

use super::html::esc;
use crate::domain::{Event, Micros, PreferenceChange, Status};
use crate::error::ApiError;
use crate::store::{Store, StoreError};

/// Rows on one page.
pub const PAGE: usize = 100;
/// Most rows in one CSV export.
pub const MAX_EXPORT: usize = 1_000_000;
/// Most log entries one page reads: a filter that matches rarely stops
/// there and offers to continue, so no page reads the whole log.
pub const SCAN_BUDGET: usize = 200_000;
const DAY_MICROS: i64 = 86_400_000_000;

/// The filters, as query parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// `source=`
    pub source: Option<String>,
    /// `actor=`
    pub actor: Option<String>,
    /// `service=`
    pub service: Option<String>,
    /// `channel=`
    pub channel: Option<String>,
    /// `from=YYYY-MM-DD` (UTC, included)
    pub from: Option<String>,
    /// `to=YYYY-MM-DD` (UTC, included)
    pub to: Option<String>,
    /// `after=SEQ`: the page starts after this entry.
    pub after: u64,
    from_micros: Option<i64>,
    to_micros: Option<i64>,
}

fn day_start(what: &str, text: &str) -> Result<i64, ApiError> {
    let date: jiff::civil::Date = text.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_parameter",
            format!("{what} must be a date like 2026-05-03, not {text:?}"),
        )
    })?;
    let ts = date
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .map_err(|e| ApiError::bad_request("invalid_parameter", e.to_string()))?;
    Ok(ts.timestamp().as_microsecond())
}

impl Filter {
    /// Parses the query string; empty values mean "any".
    pub fn parse(query: &str) -> Result<Filter, ApiError> {
        let mut f = Filter::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let v = v.trim().to_owned();
            let slot = match k.as_ref() {
                "source" => &mut f.source,
                "actor" => &mut f.actor,
                "service" => &mut f.service,
                "channel" => &mut f.channel,
                "from" => &mut f.from,
                "to" => &mut f.to,
                "after" => {
                    f.after = v.parse().map_err(|_| {
                        ApiError::bad_request("invalid_parameter", "after must be an unsigned integer")
                    })?;
                    continue;
                }
                _ => continue,
            };
            if !v.is_empty() {
                *slot = Some(v);
            }
        }
        f.from_micros = f.from.as_deref().map(|d| day_start("from", d)).transpose()?;
        f.to_micros = f.to.as_deref().map(|d| day_start("to", d).map(|t| t + DAY_MICROS)).transpose()?;
        Ok(f)
    }

    /// Whether an entry passes every filter.
    pub fn matches(&self, c: &PreferenceChange) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&self.source, &c.origin.source)
            && eq(&self.actor, &c.origin.actor)
            && eq(&self.service, &c.scope.service.to_string())
            && eq(&self.channel, &c.scope.channel.to_string())
            && self.from_micros.is_none_or(|t| c.at.0 >= t)
            && self.to_micros.is_none_or(|t| c.at.0 < t)
    }

    /// The query string of these filters, with `after` replaced.
    pub fn query(&self, after: Option<u64>) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("source", &self.source),
            ("actor", &self.actor),
            ("service", &self.service),
            ("channel", &self.channel),
            ("from", &self.from),
            ("to", &self.to),
        ] {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
        if let Some(a) = after {
            q.append_pair("after", &a.to_string());
        }
        q.finish()
    }
}

/// The time of event `seq`, if it exists.
fn time_of(store: &Store, seq: u64) -> Result<Option<Micros>, StoreError> {
    Ok(store.events_after(seq - 1, 1)?.into_iter().next().map(|(_, e)| match e {
        Event::Preference(c) => c.at,
        Event::Service(s) => s.service.updated_at,
        Event::Recovery(r) => r.at,
    }))
}

/// The last sequence number before the first event at or after `at`
/// (0 when every event is), by binary search over `1..=last`.
pub fn seq_before(store: &Store, at: Micros, last: u64) -> Result<u64, StoreError> {
    let (mut lo, mut hi) = (1u64, last + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match time_of(store, mid)? {
            Some(t) if t < at => lo = mid + 1,
            _ => hi = mid,
        }
    }
    Ok(lo - 1)
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct Scanned {
    /// The matching entries, in sequence order.
    pub rows: Vec<(u64, PreferenceChange)>,
    /// Where the next page starts (`after=`), when the log may hold more
    /// matches: after the last row when the page is full, or after the
    /// last entry read when the budget ran out first.
    pub resume_after: Option<u64>,
}

/// Up to `limit` matching entries after `filter.after` (and after the
/// `from` day's start), reading at most `budget` entries.
pub fn scan(
    store: &Store,
    filter: &Filter,
    last: u64,
    limit: usize,
    budget: usize,
) -> Result<Scanned, StoreError> {
    let mut after = filter.after;
    if let Some(from) = filter.from_micros {
        after = after.max(seq_before(store, Micros(from), last)?);
    }
    let mut found = Scanned::default();
    let mut read = 0usize;
    loop {
        if read >= budget {
            found.resume_after = Some(after);
            return Ok(found);
        }
        let chunk = store.events_after(after, 4096.min(budget - read))?;
        if chunk.is_empty() {
            return Ok(found);
        }
        read += chunk.len();
        for (seq, e) in chunk {
            if let Event::Preference(c) = e {
                if filter.to_micros.is_some_and(|t| c.at.0 >= t) {
                    return Ok(found);
                }
                if filter.matches(&c) {
                    if found.rows.len() == limit {
                        found.resume_after = found.rows.last().map(|(s, _)| *s);
                        return Ok(found);
                    }
                    found.rows.push((seq, c));
                }
            }
            after = seq;
        }
    }
}

/// The audit page's body.
pub fn render(filter: &Filter, found: &Scanned) -> String {
    let rows = &found.rows;
    let mut b = String::from(
        "<h1>Audit log</h1><form method=\"get\" action=\"/console/audit\"><fieldset><legend>Filters</legend>",
    );
    for (name, label, value, kind) in [
        ("source", "Source", &filter.source, "text"),
        ("actor", "Actor", &filter.actor, "text"),
        ("service", "Service", &filter.service, "text"),
        ("channel", "Channel", &filter.channel, "text"),
        ("from", "From (UTC date)", &filter.from, "date"),
        ("to", "To (UTC date, included)", &filter.to, "date"),
    ] {
        let _ = write!(
            b,
            "<label for=\"f-{name}\">{label}</label><input id=\"f-{name}\" name=\"{name}\" type=\"{kind}\" value=\"{}\">",
            esc(value.as_deref().unwrap_or(""))
        );
    }
    let _ = write!(
        b,
        "<p><button type=\"submit\">Filter</button> <a href=\"/console/audit.csv?{}\">Export these rows as CSV</a></p></fieldset></form>",
        esc(&filter.query(None))
    );
    b.push_str(
        "<table aria-label=\"Audit entries\"><thead><tr><th scope=\"col\">#</th><th scope=\"col\">When</th>\
         <th scope=\"col\">Customer</th><th scope=\"col\">Scope</th><th scope=\"col\">Change</th><th scope=\"col\">Source</th>\
         <th scope=\"col\">Actor</th><th scope=\"col\">Reason</th><th scope=\"col\">Client address</th>\
         <th scope=\"col\">User agent</th></tr></thead><tbody>",
    );
    if rows.is_empty() {
        b.push_str("<tr><td colspan=\"10\">No entries match.</td></tr>");
    }
    for (seq, c) in rows {
        let customer = c.customer.0;
        let _ = write!(
            b,
            "<tr><td>{seq}</td><td>{}</td><td><a href=\"/console/customers/{customer}\">{customer}</a></td><td>{}</td><td>{} → {}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.at.rfc3339()),
            esc(&c.scope.key()),
            c.before.map_or("none", Status::as_str),
            c.after.as_str(),
            esc(&c.origin.source),
            esc(&c.origin.actor),
            esc(c.reason.as_deref().unwrap_or("")),
            esc(c.origin.client_addr.as_deref().unwrap_or("")),
            esc(c.origin.user_agent.as_deref().unwrap_or("")),
        );
    }
    b.push_str("</tbody></table>");
    if let Some(resume) = found.resume_after {
        if rows.len() < PAGE {
            let _ = write!(b, "<p>Searched up to entry #{resume}; later entries may match too.</p>");
        }
        let _ =
            write!(b, "<p><a href=\"/console/audit?{}\">Next page</a></p>", esc(&filter.query(Some(resume))));
    }
    b
}

/// The CSV export of `rows`, the columns of `GET /v1/audit`.
pub fn csv(rows: &[(u64, PreferenceChange)]) -> Vec<u8> {
    use super::customer::csv_cell;
    let mut w = csv::Writer::from_writer(Vec::new());
    let _ = w.write_record([
        "seq",
        "at",
        "customer",
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
    for (seq, c) in rows {
        let _ = w.write_record([
            seq.to_string(),
            c.at.rfc3339(),
            c.customer.0.to_string(),
            c.scope.service.to_string(),
            c.scope.channel.to_string(),
            c.before.map_or("", Status::as_str).to_owned(),
            c.after.as_str().to_owned(),
            csv_cell(c.reason.as_deref().unwrap_or("")),
            csv_cell(&c.origin.source),
            csv_cell(&c.origin.actor),
            csv_cell(c.origin.client_addr.as_deref().unwrap_or("")),
            csv_cell(c.origin.user_agent.as_deref().unwrap_or("")),
        ]);
    }
    w.into_inner().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(customer: u64, source: &str) -> Event {
        Event::Preference(PreferenceChange {
            customer: crate::domain::CustomerId(customer),
            scope: crate::domain::Scope::parse("*", "*").unwrap(),
            before: None,
            after: Status::OptedOut,
            reason: None,
            origin: crate::domain::Origin {
                source: source.into(),
                actor: "a".into(),
                client_addr: None,
                user_agent: None,
            },
            at: Micros::now(),
        })
    }

    #[test]
    fn a_rare_filter_stops_at_the_budget_and_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut batch = store.begin().unwrap();
        {
            let mut t = batch.tables().unwrap();
            for i in 0..50 {
                t.append(&change(i, if i % 10 == 9 { "rare" } else { "api" })).unwrap();
            }
        }
        batch.commit().unwrap();
        let filter = Filter::parse("source=rare").unwrap();
        // A budget of 12 reads entries 1..=12 and finds #10.
        let first = scan(&store, &filter, 50, 100, 12).unwrap();
        assert_eq!(first.rows.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [10]);
        assert_eq!(first.resume_after, Some(12));
        let mut next = filter.clone();
        next.after = 12;
        let second = scan(&store, &next, 50, 100, 1000).unwrap();
        assert_eq!(second.rows.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [20, 30, 40, 50]);
        assert_eq!(second.resume_after, None, "the end of the log");
        // A full page resumes after its last row.
        let page = scan(&store, &Filter::default(), 50, 7, 1000).unwrap();
        assert_eq!((page.rows.len(), page.resume_after), (7, Some(7)));
    }

    #[test]
    fn filters_parse_and_round_trip() {
        let f =
            Filter::parse("source=console&actor=dana+x&service=*&from=2026-05-03&to=2026-05-03&after=7&x=1")
                .unwrap();
        assert_eq!(f.actor.as_deref(), Some("dana x"));
        assert_eq!(f.after, 7);
        assert_eq!(f.to_micros.unwrap() - f.from_micros.unwrap(), DAY_MICROS);
        assert_eq!(Filter::parse(&f.query(Some(7))).unwrap(), f);
        assert!(Filter::parse("from=yesterday").is_err());
        assert!(Filter::parse("after=-1").is_err());
        assert_eq!(Filter::parse("source=&actor=").unwrap(), Filter::default());
    }
}
