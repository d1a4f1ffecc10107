//! `kindred destinations <space>`: each destination of a space with how
//! its deliveries stand (what `GET .../destinations/{id}/status` reports),
//! from a running Kindred.

use anyhow::bail;
use clap::Args;
use serde_json::Value;

use crate::backfill::call;

#[derive(Args, Clone, Debug)]
pub struct DestinationsArgs {
    /// The space.
    pub space_id: String,
    /// Where Kindred serves (the local server or the AWS stack's ApiUrl).
    #[arg(long, env = "KINDRED_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The space's admin token.
    #[arg(long, env = "KINDRED_ADMIN_TOKEN", hide_env_values = true)]
    pub token: String,
}

pub(crate) fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The table: one row per destination, its settings and delivery counts.
pub fn table(rows: &[(Value, Value)]) -> String {
    let header = [
        "ID",
        "KIND",
        "ENDPOINT",
        "DELIVERED",
        "PENDING",
        "RETRYING",
        "DEAD",
        "LAST SUCCESS",
        "LAST ERROR",
    ];
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for (d, s) in rows {
        let endpoint = d
            .get("url")
            .or_else(|| d.get("host"))
            .unwrap_or(&Value::Null);
        let error = match s.get("last_error") {
            Some(e) if !e.is_null() => format!(
                "{} {} ({})",
                text(&e["status"]),
                text(&e["message"]),
                text(&e["at"])
            ),
            _ => "-".into(),
        };
        let mut id = text(&d["id"]);
        if d["enabled"] == Value::Bool(false) {
            id.push_str(" (disabled)");
        }
        cells.push(vec![
            id,
            text(&d["kind"]),
            text(endpoint),
            text(&s["delivered"]),
            text(&s["pending"]),
            text(&s["retrying"]),
            text(&s["dead"]),
            text(&s["last_success_at"]),
            error,
        ]);
    }
    render(&cells)
}

/// Left-aligned columns, two spaces apart; the first row is the header.
pub(crate) fn render(cells: &[Vec<String>]) -> String {
    let columns = cells.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in cells {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub async fn run(args: DestinationsArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let base = format!(
        "{}/v1/spaces/{}/destinations",
        args.url.trim_end_matches('/'),
        args.space_id
    );
    let (status, body) = call(&client, reqwest::Method::GET, &base, &args.token).await?;
    if !status.is_success() {
        bail!("{status}: {}", body["error"]["message"]);
    }
    let mut rows = Vec::new();
    for d in body["data"].as_array().cloned().unwrap_or_default() {
        let url = format!("{base}/{}/status", text(&d["id"]));
        let (status, s) = call(&client, reqwest::Method::GET, &url, &args.token).await?;
        if !status.is_success() {
            bail!("{status}: {}", s["error"]["message"]);
        }
        rows.push((d, s));
    }
    if rows.is_empty() {
        println!("space {:?} has no destinations", args.space_id);
    } else {
        print!("{}", table(&rows));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::table;
    use serde_json::json;

    #[test]
    fn the_table_shows_each_destination_and_its_counts() {
        let t = table(&[
            (
                json!({"id": "crm", "kind": "webhook", "url": "http://h/x", "enabled": true}),
                json!({"delivered": 12, "pending": 0, "retrying": 3, "dead": 1,
                       "last_success_at": "2026-11-29T10:00:00.000Z",
                       "last_error": {"status": 503, "message": "Service Unavailable: busy", "at": "t"}}),
            ),
            (
                json!({"id": "ads", "kind": "segment", "host": "http://s", "enabled": false}),
                json!({"delivered": 0, "pending": 5, "retrying": 0, "dead": 0,
                       "last_success_at": null, "last_error": null}),
            ),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID "));
        assert!(lines[1].starts_with("crm "));
        assert!(lines[1].contains("503 Service Unavailable: busy (t)"));
        assert!(lines[2].starts_with("ads (disabled)"));
        assert!(lines[2].contains("http://s"));
        // Columns line up.
        assert_eq!(lines[0].find("KIND"), lines[1].find("webhook"));
    }
}
