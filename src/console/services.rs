//! The services page (admin only; support staff get 403 and no link):
//! every service with its state and opted-out counts per channel, and the
//! forms to create, rename, describe, archive and restore. Service
//! policies (DESIGN.md "Service policies") will show and be set here: a
//! column beside "State" and a select in the edit form.

use std::fmt::Write;

use super::html::{document, esc};
use super::session::Staff;
use crate::domain::{MAX_DESCRIPTION_CHARS, MAX_NAME_CHARS, Service};
use crate::error::ApiError;

/// One service with its opted-out count per channel.
pub struct ServiceRow<'a> {
    /// The service.
    pub service: &'a Service,
    /// Opted-out customers per configured channel, in order.
    pub counts: Vec<u64>,
}

/// Checks a name or description's length, as the API does.
pub fn text(what: &str, value: &str, max: usize) -> Result<String, ApiError> {
    let n = value.chars().count();
    if n > max {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("the {what} is {n} characters long; at most {max} are allowed"),
        ));
    }
    Ok(value.to_owned())
}

/// The longest name and description.
pub const LIMITS: (usize, usize) = (MAX_NAME_CHARS, MAX_DESCRIPTION_CHARS);

/// The page.
pub fn render(staff: &Staff, channels: &[String], rows: &[ServiceRow<'_>], notice: Option<&str>) -> String {
    let csrf = esc(&staff.csrf);
    let mut b = String::from("<h1>Services</h1>");
    if let Some(n) = notice {
        let _ = write!(b, "<p class=\"error\" role=\"alert\">{}</p>", esc(n));
    }
    b.push_str(
        "<h2 id=\"services\">Registered services</h2><table aria-labelledby=\"services\"><thead><tr>\
         <th scope=\"col\">Service</th><th scope=\"col\">Description</th><th scope=\"col\">State</th>",
    );
    for h in channels {
        let _ = write!(b, "<th scope=\"col\">Opted out of {}</th>", esc(h));
    }
    b.push_str("<th scope=\"col\">Change</th></tr></thead><tbody>");
    if rows.is_empty() {
        let _ =
            write!(b, "<tr><td colspan=\"{}\">No services are registered yet.</td></tr>", channels.len() + 4);
    }
    for r in rows {
        let s = r.service;
        let slug = esc(s.slug.as_str());
        let state = if s.archived { "archived" } else { "active" };
        let _ = write!(
            b,
            "<tr><th scope=\"row\">{} <span class=\"why\">({slug})</span></th><td>{}</td><td>{state}</td>",
            esc(&s.name),
            esc(&s.description)
        );
        for n in &r.counts {
            let _ = write!(b, "<td>{n}</td>");
        }
        let (action, label) = if s.archived { ("restore", "Restore") } else { ("archive", "Archive") };
        let _ = write!(
            b,
            "<td><form method=\"post\" action=\"/console/services/{slug}\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <label for=\"name-{slug}\">Name</label><input id=\"name-{slug}\" name=\"name\" value=\"{}\" maxlength=\"{}\">\
             <label for=\"desc-{slug}\">Description</label><input id=\"desc-{slug}\" name=\"description\" value=\"{}\" maxlength=\"{}\">\
             <p><button type=\"submit\" name=\"action\" value=\"save\">Save</button> \
             <button type=\"submit\" name=\"action\" value=\"{action}\">{label}</button></p></form></td></tr>",
            esc(&s.name),
            LIMITS.0,
            esc(&s.description),
            LIMITS.1,
        );
    }
    b.push_str("</tbody></table>");
    let _ = write!(
        b,
        "<h2 id=\"create\">Register a service</h2><form method=\"post\" action=\"/console/services\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <label for=\"new-slug\">Slug (lowercase letters, digits, - and _)</label><input id=\"new-slug\" name=\"slug\" required maxlength=\"64\">\
         <label for=\"new-name\">Name</label><input id=\"new-name\" name=\"name\" maxlength=\"{}\">\
         <label for=\"new-desc\">Description</label><input id=\"new-desc\" name=\"description\" maxlength=\"{}\">\
         <p><button type=\"submit\">Register</button></p></form>",
        LIMITS.0, LIMITS.1
    );
    document("Services", Some(staff), &b)
}
