//! The explorer's page shell and the one escaping function every value
//! passes through.

use axum::response::Html;
use kindred_domain::event::format_millis;
use kindred_domain::Millis;
use serde_json::Value;

use super::Session;

/// Text made safe for HTML content and for quoted attribute values.
pub(crate) fn esc(s: &str) -> String {
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

/// A JSON value as text (a string without its quotes), escaped and cut
/// to `max` characters.
pub(crate) fn value(v: &Value, max: usize) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    esc(&cut(&text, max))
}

/// At most `max` characters of `s`, with an ellipsis when cut.
pub(crate) fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// A time as ISO 8601 (UTC, milliseconds).
pub(crate) fn time(at: Millis) -> String {
    esc(&format_millis(at))
}

/// A query string value, percent-encoded.
pub(crate) fn url_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One HTML page: the shell, the navigation of a signed-in session, and
/// the body pushed piece by piece (each piece already escaped).
pub(crate) struct Page {
    body: String,
}

impl Page {
    pub fn new(title: &str, session: Option<&Session>) -> Self {
        let mut body = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>{} · Kindred</title><link rel=\"stylesheet\" href=\"/ui/style.css\"><link rel=\"icon\" href=\"/ui/icon.svg\"></head><body>",
            esc(title)
        );
        if let Some(s) = session {
            body.push_str(&format!(
                "<header><nav><a class=\"brand\" href=\"/ui\">Kindred</a>\
                 <a href=\"/ui\">Profiles</a><a href=\"/ui/computations\">Audiences &amp; traits</a>\
                 <a href=\"/ui/changes\">Changes</a><a href=\"/ui/destinations\">Destinations</a>\
                 <a href=\"/ui/settings\">Identity settings</a></nav>\
                 <div class=\"who\">space <b>{}</b> · {}\
                 <form method=\"post\" action=\"/ui/session/end\"><button type=\"submit\">Sign out</button></form></div></header>",
                esc(&s.space_id),
                if s.admin { "admin" } else { "read only" },
            ));
        }
        body.push_str("<main>");
        Self { body }
    }

    pub fn push(&mut self, piece: &str) {
        self.body.push_str(piece);
    }

    pub fn finish(mut self) -> Html<String> {
        self.body.push_str("</main></body></html>");
        Html(self.body)
    }
}

/// A table of already escaped cells.
pub(crate) fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    if rows.is_empty() {
        return "<p class=\"empty\">None.</p>".to_string();
    }
    let mut out = String::from("<table><thead><tr>");
    for h in head {
        out.push_str(&format!("<th>{}</th>", esc(h)));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            out.push_str(&format!("<td>{cell}</td>"));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

/// A link to a profile's page.
pub(crate) fn profile_link(profile_id: &str) -> String {
    format!(
        "<a href=\"/ui/profiles/{}\">{}</a>",
        url_part(profile_id),
        esc(profile_id)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"y\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;y&quot;"
        );
        assert_eq!(value(&serde_json::json!("<b>"), 10), "&lt;b&gt;");
        assert_eq!(
            value(&serde_json::json!({"a": "<"}), 100),
            "{&quot;a&quot;:&quot;&lt;&quot;}"
        );
    }

    #[test]
    fn cuts_long_text_and_encodes_url_parts() {
        assert_eq!(cut("abcdef", 4), "abc…");
        assert_eq!(cut("abc", 4), "abc");
        assert_eq!(url_part("a b/<c>"), "a%20b%2F%3Cc%3E");
    }
}
