//! The recipient's HTML pages behind an opt-out link: the manage page, the
//! confirmation with its undo, and the plain "invalid link" page.
//!
//! No JavaScript, no external assets; one inline stylesheet allowed by its
//! hash in the Content-Security-Policy. Everything printed goes through
//! [`escape`].

use std::fmt::Write;
use std::sync::LazyLock;

use base64::Engine;
use sha2::{Digest, Sha256};

const STYLE: &str = "body{font:17px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1a1a1a;background:#fff;margin:0}\
main{max-width:34rem;margin:0 auto;padding:1.5rem 1rem}h1{font-size:1.45rem;line-height:1.25}\
fieldset{border:1px solid #767676;border-radius:6px;margin:1rem 0;padding:.75rem 1rem}legend{font-weight:600;padding:0 .25rem}\
label{display:block;margin:.35rem 0}select,input[type=text]{font:inherit;width:100%;box-sizing:border-box;padding:.45rem;border:1px solid #595959;border-radius:4px}\
button{font:inherit;font-weight:600;padding:.65rem 1.2rem;border-radius:6px;border:2px solid #0b3d91;background:#0b3d91;color:#fff;cursor:pointer}\
button.secondary{background:#fff;color:#0b3d91}button:focus,input:focus,select:focus{outline:3px solid #ffbf47;outline-offset:2px}\
.note{color:#3d3d3d;font-size:.95rem}table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.3rem .4rem;border-bottom:1px solid #d0d0d0}";

/// The Content-Security-Policy of every page: nothing but this stylesheet,
/// forms posting back to the same origin, no framing.
pub static CSP: LazyLock<String> = LazyLock::new(|| {
    let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(STYLE.as_bytes()));
    format!(
        "default-src 'none'; style-src 'sha256-{hash}'; img-src 'none'; script-src 'none'; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
});

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn document(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta name=\"robots\" content=\"noindex\"><title>{}</title><style>{STYLE}</style></head>\
         <body><main>{body}</main></body></html>",
        escape(title)
    )
}

/// Reasons offered on the page; free text is offered beside them.
pub const REASONS: [&str; 4] = [
    "I get too many messages",
    "These messages are not relevant to me",
    "I never signed up for these",
    "Other",
];

/// One (service, channel) pair on the page.
#[derive(Debug, Clone)]
pub struct PairRow {
    /// `service/channel`, the form value.
    pub key: String,
    /// The service's display name.
    pub service_name: String,
    /// The channel.
    pub channel: String,
    /// Whether the customer currently gets these.
    pub allowed: bool,
}

/// What the manage page shows.
#[derive(Debug, Clone)]
pub struct Manage {
    /// What the link is for, e.g. "Ratings", or "all services".
    pub service_label: String,
    /// The channel, or "all channels".
    pub channel_label: String,
    /// Whether the link's own scope is a single channel (so "everything on
    /// this channel" is a distinct, broader choice).
    pub offers_channel_wide: bool,
    /// Every pair of the customer.
    pub pairs: Vec<PairRow>,
}

/// The page a link opens. It changes nothing by itself.
pub fn manage(m: &Manage) -> String {
    let mut body = String::new();
    let (service, channel) = (escape(&m.service_label), escape(&m.channel_label));
    let _ = write!(
        body,
        "<h1>Unsubscribe from {service} by {channel}?</h1>\
         <p>This link lets you stop <strong>{service}</strong> messages sent by <strong>{channel}</strong>. \
         Nothing changes until you press a button below.</p>\
         <form method=\"post\"><input type=\"hidden\" name=\"action\" value=\"opt_out\">"
    );
    if m.offers_channel_wide {
        let _ = write!(
            body,
            "<fieldset><legend>What should stop?</legend>\
             <label><input type=\"radio\" name=\"scope\" value=\"token\" checked> Only {service} messages by {channel}</label>\
             <label><input type=\"radio\" name=\"scope\" value=\"channel\"> Every message by {channel}, from all services</label>\
             </fieldset>"
        );
    } else {
        body.push_str("<input type=\"hidden\" name=\"scope\" value=\"token\">");
    }
    body.push_str(
        "<fieldset><legend>Why? (optional)</legend><label for=\"reason\">Reason</label>\
         <select id=\"reason\" name=\"reason\"><option value=\"\">Prefer not to say</option>",
    );
    for r in REASONS {
        let _ = write!(body, "<option>{}</option>", escape(r));
    }
    body.push_str(
        "</select><label for=\"reason_text\">Anything else you want to tell us</label>\
         <input type=\"text\" id=\"reason_text\" name=\"reason_text\" maxlength=\"400\"></fieldset>\
         <button type=\"submit\">Unsubscribe</button></form>",
    );
    if !m.pairs.is_empty() {
        body.push_str(
            "<h2>All your notification choices</h2><form method=\"post\">\
             <input type=\"hidden\" name=\"action\" value=\"update\"><fieldset><legend>Send me</legend>",
        );
        for (i, p) in m.pairs.iter().enumerate() {
            let key = escape(&p.key);
            let _ = write!(
                body,
                "<input type=\"hidden\" name=\"shown\" value=\"{key}\">\
                 <label for=\"p{i}\"><input type=\"checkbox\" id=\"p{i}\" name=\"allow\" value=\"{key}\"{}> {} by {}</label>",
                if p.allowed { " checked" } else { "" },
                escape(&p.service_name),
                escape(&p.channel),
            );
        }
        body.push_str(
            "</fieldset><button type=\"submit\" class=\"secondary\">Save my choices</button></form>",
        );
    }
    document("Manage your notifications", &body)
}

/// The confirmation after a change, with a way to undo it (`undo` holds the
/// hidden fields of the undo form; `None` when nothing can be undone here).
pub fn done(headline: &str, detail: &str, undo: Option<&[(&str, &str)]>) -> String {
    let mut body = format!("<h1>{}</h1><p>{}</p>", escape(headline), escape(detail));
    if let Some(fields) = undo {
        body.push_str("<form method=\"post\">");
        for (name, value) in fields {
            let _ =
                write!(body, "<input type=\"hidden\" name=\"{}\" value=\"{}\">", escape(name), escape(value));
        }
        // The label says what the undo does: it opts in again after an
        // opt-out, and out again after an opt-in.
        let label = if fields.contains(&("action", "opt_out")) {
            "Undo: unsubscribe me again"
        } else {
            "Undo: subscribe me again"
        };
        let _ = write!(body, "<button type=\"submit\" class=\"secondary\">{label}</button></form>");
    }
    body.push_str("<p class=\"note\">You can come back to this link to change your choices.</p>");
    document(headline, &body)
}

/// The only thing an invalid, tampered or expired link shows.
pub fn invalid() -> String {
    document(
        "Link invalid or expired",
        "<h1>This link is invalid or has expired</h1>\
         <p>Use the unsubscribe link in a more recent message.</p>",
    )
}

/// Shown when a client sends too many requests.
pub fn rate_limited() -> String {
    document("Too many requests", "<h1>Too many requests</h1><p>Please try again in a minute.</p>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything_it_prints() {
        let page = manage(&Manage {
            service_label: "<script>alert(1)</script>".into(),
            channel_label: "e\"mail".into(),
            offers_channel_wide: true,
            pairs: vec![PairRow {
                key: "x/'y".into(),
                service_name: "<b>".into(),
                channel: "&".into(),
                allowed: true,
            }],
        });
        assert!(!page.contains("<script>"));
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("e&quot;mail"));
        assert!(page.contains("x/&#39;y"));
        assert!(!page.contains("<b>"));
        let done = done("<i>", "\"", Some(&[("a\"", "<v>")]));
        assert!(!done.contains("<i>") && !done.contains("<v>") && done.contains("a&quot;"));
    }

    #[test]
    fn csp_allows_no_script_and_matches_the_style() {
        assert!(CSP.contains("script-src 'none'") && CSP.contains("frame-ancestors 'none'"));
        assert!(
            !manage(&Manage {
                service_label: "a".into(),
                channel_label: "b".into(),
                offers_channel_wide: false,
                pairs: vec![]
            })
            .contains("<script")
        );
    }
}
