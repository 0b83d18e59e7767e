//! The console's HTML plumbing: the page frame (language, title, skip
//! link, navigation, sign-out form), the stylesheet allowed by its hash,
//! the protective headers every answer carries, redirects and cookies.
//!
//! Everything printed goes through [`esc`]; there is no script anywhere.

use std::fmt::Write;
use std::sync::LazyLock;

use base64::Engine;
use hyper::StatusCode;
use hyper::header::{self, HeaderValue};
use sha2::{Digest, Sha256};

use super::session::Staff;
use crate::auth::Role;
use crate::http::{Reply, bytes_reply};

/// The session cookie's name.
pub const COOKIE: &str = "prefsd_console";

const STYLE: &str = "body{font:16px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1a1a1a;background:#fff;margin:0}\
header{background:#0b3d91;color:#fff;padding:.5rem 1rem;display:flex;flex-wrap:wrap;gap:1rem;align-items:center}\
header a{color:#fff}header nav ul{list-style:none;display:flex;gap:1rem;margin:0;padding:0}header form{margin-left:auto}\
main{max-width:72rem;margin:0 auto;padding:1rem}h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem}\
table{border-collapse:collapse;width:100%;margin:.5rem 0}td,th{text-align:left;vertical-align:top;padding:.3rem .45rem;border:1px solid #c4c4c4}\
th{background:#f0f0f0}.out{color:#8a1c1c;font-weight:600}.in{color:#1d5e20;font-weight:600}.why{font-size:.9rem;color:#333}\
label{display:block;margin:.5rem 0 .2rem;font-weight:600}input,select{font:inherit;padding:.35rem;border:1px solid #595959;border-radius:4px}\
button{font:inherit;font-weight:600;padding:.45rem 1rem;border-radius:5px;border:2px solid #0b3d91;background:#0b3d91;color:#fff;cursor:pointer}\
header button{background:#fff;color:#0b3d91}a:focus,button:focus,input:focus,select:focus{outline:3px solid #ffbf47;outline-offset:2px}\
.error{border:2px solid #8a1c1c;padding:.5rem 1rem;background:#fff4f4}.skip{position:absolute;left:-999px}.skip:focus{left:1rem;top:1rem;background:#fff;color:#000;padding:.5rem}\
fieldset{border:1px solid #767676;border-radius:6px;padding:.5rem 1rem}\
.pair{display:flex;flex-wrap:wrap;gap:2rem;align-items:flex-start}.pair table{width:auto}";

/// The console's Content-Security-Policy: this stylesheet only, forms to
/// the same origin, no script, no framing.
pub static CSP: LazyLock<String> = LazyLock::new(|| {
    let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(STYLE.as_bytes()));
    format!(
        "default-src 'none'; style-src 'sha256-{hash}'; img-src 'none'; script-src 'none'; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
});

/// Escapes text for element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    crate::page::escape(s)
}

/// A whole page: `staff` is the signed-in person (navigation and sign-out
/// shown), or `None` on the sign-in page.
pub fn document(title: &str, staff: Option<&Staff>, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 4096);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta name=\"robots\" content=\"noindex\"><title>{} · prefsd console</title><style>{STYLE}</style></head><body>\
         <a class=\"skip\" href=\"#main\">Skip to content</a><header><span>prefsd console</span>",
        esc(title)
    );
    if let Some(staff) = staff {
        out.push_str("<nav aria-label=\"Console\"><ul><li><a href=\"/console/\">Overview</a></li><li><a href=\"/console/customers\">Find a customer</a></li><li><a href=\"/console/audit\">Audit log</a></li>");
        if staff.role == Role::Admin {
            out.push_str("<li><a href=\"/console/services\">Services</a></li>");
        }
        out.push_str("</ul></nav>");
        let _ = write!(
            out,
            "<form method=\"post\" action=\"/console/sign-out\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <span>Signed in as {} ({})</span> <button type=\"submit\">Sign out</button></form>",
            esc(&staff.csrf),
            esc(&staff.name),
            staff.role
        );
    }
    let _ = write!(out, "</header><main id=\"main\">{body}</main></body></html>");
    out
}

/// The headers every console answer carries.
pub fn protect(reply: &mut Reply) {
    let h = reply.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Not `no-referrer` as on the recipient page: with it, browsers send
    // `Origin: null` on the console's own form posts, and the origin check
    // (which refuses `null`, what any hostile page can also send) would
    // refuse them. `same-origin` still sends nothing to other sites.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert("x-robots-tag", HeaderValue::from_static("noindex, nofollow"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if let Ok(csp) = HeaderValue::from_str(&CSP) {
        h.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
}

/// An HTML answer.
pub fn page(status: StatusCode, body: String) -> Reply {
    let mut reply = bytes_reply(status, "text/html; charset=utf-8", body);
    protect(&mut reply);
    reply
}

/// A download: `content_type`, saved as `filename`.
pub fn download(content_type: &'static str, filename: &str, body: Vec<u8>) -> Reply {
    let mut reply = bytes_reply(StatusCode::OK, content_type, body);
    protect(&mut reply);
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        reply.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    reply
}

/// 303 See Other to a console path (always a fixed or escaped local path).
pub fn redirect(location: &str) -> Reply {
    let mut reply = page(StatusCode::SEE_OTHER, String::new());
    if let Ok(v) = HeaderValue::from_str(location) {
        reply.headers_mut().insert(header::LOCATION, v);
    }
    reply
}

/// The `Set-Cookie` value that opens a session.
pub fn session_cookie(id: &str, max_age_secs: u64, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={id}; Path=/console/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}{secure}")
}

/// The `Set-Cookie` value that ends one.
pub fn cleared_cookie(secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}=; Path=/console/; HttpOnly; SameSite=Strict; Max-Age=0{secure}")
}

/// A page with one message: errors, refusals, "not found".
pub fn message(status: StatusCode, staff: Option<&Staff>, title: &str, text: &str) -> Reply {
    let body = format!("<h1>{}</h1><p class=\"error\" role=\"alert\">{}</p>", esc(title), esc(text));
    page(status, document(title, staff, &body))
}
