//! The console's pages, rendered on the server: sign-in, find a customer,
//! the customer (grid, change form, timeline), and the overview.
//! Each returns a whole document; every printed value is escaped.

use std::fmt::Write;

use super::customer::{CustomerView, Decision};
use super::html::{document, esc};
use super::session::Staff;
use crate::domain::Status;

/// Most timeline rows on the customer page; the exports hold them all.
pub const MAX_TIMELINE: usize = 1000;

/// The sign-in form (field `key`), with an optional refusal.
pub fn sign_in(error: Option<&str>) -> String {
    let mut body = String::from("<h1>Sign in to the support console</h1>");
    if let Some(e) = error {
        let _ = write!(body, "<p class=\"error\" role=\"alert\">{}</p>", esc(e));
    }
    body.push_str(
        "<form method=\"post\" action=\"/console/sign-in\">\
         <label for=\"key\">Your staff API key</label>\
         <input id=\"key\" name=\"key\" type=\"password\" autocomplete=\"current-password\" required size=\"50\">\
         <p><button type=\"submit\">Sign in</button></p></form>\
         <p>Support and admin keys can sign in; sender keys cannot. Ask an administrator for a key made with \
         <code>prefsd key generate --name YOUR-NAME --role support</code>.</p>",
    );
    document("Sign in", None, &body)
}

/// The find form, with an optional message about the last search.
pub fn find(staff: &Staff, q: &str, error: Option<&str>) -> String {
    let mut body = String::from("<h1>Find a customer</h1>");
    if let Some(e) = error {
        let _ = write!(body, "<p class=\"error\" role=\"alert\">{}</p>", esc(e));
    }
    let _ = write!(
        body,
        "<form method=\"get\" action=\"/console/customers\" role=\"search\">\
         <label for=\"q\">Customer id</label>\
         <input id=\"q\" name=\"q\" value=\"{}\" inputmode=\"numeric\" required> \
         <button type=\"submit\">Find</button></form>",
        esc(q)
    );
    document("Find a customer", Some(staff), &body)
}

fn status_text(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "blocked (opted out)" }
}

fn scope_text(service: &str, channel: &str) -> String {
    let s = if service == "*" { "all services".to_owned() } else { service.to_owned() };
    let h = if channel == "*" { "all channels".to_owned() } else { channel.to_owned() };
    format!("{s} / {h}")
}

/// The customer page: grid, change form, timeline, exports.
pub fn customer(staff: &Staff, view: &CustomerView, channels: &[String], notice: Option<&str>) -> String {
    let c = view.customer.0;
    let mut b = String::with_capacity(16 * 1024);
    let _ = write!(b, "<h1>Customer {c}</h1>");
    if let Some(n) = notice {
        let _ = write!(b, "<p class=\"error\" role=\"alert\">{}</p>", esc(n));
    }
    let _ = write!(
        b,
        "<p>Export: <a href=\"/console/customers/{c}/export.json\">JSON</a> · \
         <a href=\"/console/customers/{c}/export.csv\">CSV</a></p>"
    );

    b.push_str("<h2 id=\"grid\">Preferences</h2><table aria-labelledby=\"grid\"><thead><tr><th scope=\"col\">Service</th>");
    for h in channels {
        let _ = write!(b, "<th scope=\"col\">{}</th>", esc(h));
    }
    b.push_str("</tr></thead><tbody>");
    for row in &view.grid {
        let archived = if row.archived { " <span>(archived)</span>" } else { "" };
        let _ = write!(
            b,
            "<tr><th scope=\"row\">{} <span class=\"why\">({})</span>{archived}</th>",
            esc(&row.name),
            esc(&row.service)
        );
        for cell in &row.cells {
            let class = if cell.allowed { "in" } else { "out" };
            let _ = write!(
                b,
                "<td data-service=\"{}\" data-channel=\"{}\"><span class=\"{class}\">{}</span><br><span class=\"why\">",
                esc(&row.service),
                esc(&cell.channel),
                status_text(cell.allowed)
            );
            match &cell.decided_by {
                Decision::Default => b.push_str("No record: opted in by default."),
                Decision::Record { service, channel, status, at, source, actor, reason, seq } => {
                    let _ = write!(
                        b,
                        "Decided by {} for {} on {} (#{seq}), source {}, by {}",
                        status.as_str(),
                        esc(&scope_text(service, channel)),
                        esc(at),
                        esc(source),
                        esc(actor.as_deref().unwrap_or("unknown")),
                    );
                    match reason {
                        Some(r) => {
                            let _ = write!(b, "; reason: “{}”.", esc(r));
                        }
                        None => b.push_str("; no reason given."),
                    }
                }
            }
            b.push_str("</span></td>");
        }
        b.push_str("</tr>");
    }
    b.push_str("</tbody></table>");

    // The change form: one pair or a broad scope, reason required.
    let _ = write!(
        b,
        "<h2 id=\"change\">Change a preference</h2><form method=\"post\" action=\"/console/customers/{c}\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\"><label for=\"service\">Service</label>\
         <select id=\"service\" name=\"service\"><option value=\"*\">All services</option>",
        esc(&staff.csrf)
    );
    for row in view.grid.iter().filter(|r| !r.archived) {
        let _ = write!(b, "<option value=\"{}\">{}</option>", esc(&row.service), esc(&row.name));
    }
    b.push_str("</select><label for=\"channel\">Channel</label><select id=\"channel\" name=\"channel\"><option value=\"*\">All channels</option>");
    for h in channels {
        let _ = write!(b, "<option value=\"{0}\">{0}</option>", esc(h));
    }
    b.push_str(
        "</select><fieldset><legend>New status</legend>\
         <label><input type=\"radio\" name=\"status\" value=\"opted_out\" checked> Opt out (block)</label>\
         <label><input type=\"radio\" name=\"status\" value=\"opted_in\"> Opt in (allow)</label></fieldset>\
         <label for=\"reason\">Reason (required, recorded in the audit log)</label>\
         <input id=\"reason\" name=\"reason\" required maxlength=\"500\" size=\"60\">\
         <p><button type=\"submit\">Save change</button></p></form>",
    );

    b.push_str(
        "<h2 id=\"timeline\">Timeline</h2><table aria-labelledby=\"timeline\"><thead><tr>\
         <th scope=\"col\">#</th><th scope=\"col\">When</th><th scope=\"col\">Scope</th><th scope=\"col\">Change</th>\
         <th scope=\"col\">Source</th><th scope=\"col\">Actor</th><th scope=\"col\">Reason</th>\
         <th scope=\"col\">Client address</th><th scope=\"col\">User agent</th></tr></thead><tbody>",
    );
    if view.timeline.is_empty() {
        b.push_str("<tr><td colspan=\"9\">No changes recorded for this customer.</td></tr>");
    }
    for e in view.timeline.iter().take(MAX_TIMELINE) {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} → {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.seq,
            esc(&e.at),
            esc(&scope_text(&e.service, &e.channel)),
            e.before.map_or("none", Status::as_str),
            e.after.as_str(),
            esc(&e.source),
            esc(&e.actor),
            esc(e.reason.as_deref().unwrap_or("")),
            esc(e.client_addr.as_deref().unwrap_or("")),
            esc(e.user_agent.as_deref().unwrap_or("")),
        );
    }
    b.push_str("</tbody></table>");
    if view.timeline.len() > MAX_TIMELINE {
        let _ = write!(
            b,
            "<p>Showing the newest {MAX_TIMELINE} of {} changes; the \
             <a href=\"/console/customers/{c}/export.csv\">CSV export</a> holds every one.</p>",
            view.timeline.len()
        );
    }
    document(&format!("Customer {c}"), Some(staff), &b)
}

/// One row of the overview's opted-out table.
pub struct PairCount {
    /// Service slug.
    pub service: String,
    /// Service display name.
    pub name: String,
    /// Whether the service is archived.
    pub archived: bool,
    /// Opted-out customers per channel, in channel order.
    pub counts: Vec<u64>,
}

fn counts_table(b: &mut String, id: &str, channels: &[String], pairs: &[PairCount]) {
    let _ = write!(
        b,
        "<table aria-labelledby=\"{id}\"><thead><tr><th scope=\"col\">Service</th><th scope=\"col\">State</th>"
    );
    for h in channels {
        let _ = write!(b, "<th scope=\"col\">Opted out of {}</th>", esc(h));
    }
    b.push_str("</tr></thead><tbody>");
    for p in pairs {
        let state = if p.archived { "archived" } else { "active" };
        let _ = write!(
            b,
            "<tr><th scope=\"row\">{} <span class=\"why\">({})</span></th><td>{state}</td>",
            esc(&p.name),
            esc(&p.service)
        );
        for n in &p.counts {
            let _ = write!(b, "<td>{n}</td>");
        }
        b.push_str("</tr>");
    }
    if pairs.is_empty() {
        let _ =
            write!(b, "<tr><td colspan=\"{}\">No services are registered yet.</td></tr>", channels.len() + 2);
    }
    b.push_str("</tbody></table>");
}

/// The overview: opted-out customers per pair, then `per_day` (the
/// chart and its table, see [`super::chart`]).
pub fn overview(staff: &Staff, channels: &[String], pairs: &[PairCount], per_day: &str) -> String {
    let mut b =
        String::from("<h1>Overview</h1><h2 id=\"optouts\">Opted-out customers per service and channel</h2>");
    counts_table(&mut b, "optouts", channels, pairs);
    b.push_str(per_day);
    document("Overview", Some(staff), &b)
}
