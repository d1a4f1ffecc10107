//! `kindred backfill <space> <key>`: rebuilds a computed trait or audience
//! from every profile's stored history on a running Kindred, showing the
//! progress the definition's `GET` reports.

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::Value;

#[derive(Args, Clone, Debug)]
pub struct BackfillArgs {
    /// The space.
    pub space_id: String,
    /// The computed trait's or audience's key.
    pub key: String,
    /// Where Kindred serves (the local server or the AWS stack's ApiUrl).
    #[arg(long, env = "KINDRED_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The space's admin token.
    #[arg(long, env = "KINDRED_ADMIN_TOKEN", hide_env_values = true)]
    pub token: String,
}

pub(crate) async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: &str,
) -> anyhow::Result<(reqwest::StatusCode, Value)> {
    let response = client
        .request(method, url)
        .basic_auth(token, Some(""))
        .send()
        .await
        .with_context(|| format!("calling {url}"))?;
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    Ok((status, body))
}

fn bar(done: u64, total: u64) -> String {
    const WIDTH: u64 = 30;
    let filled = (done * WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH)
        .min(WIDTH);
    let percent = (done * 100).checked_div(total).unwrap_or(100);
    format!(
        "[{}{}] {percent:>3}% {done}/{total} profiles",
        "#".repeat(filled as usize),
        ".".repeat((WIDTH - filled) as usize)
    )
}

pub async fn run(args: BackfillArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let base = args.url.trim_end_matches('/');
    let mut definition = None;
    for collection in ["audiences", "computed_traits"] {
        let url = format!(
            "{base}/v1/spaces/{}/{collection}/{}",
            args.space_id, args.key
        );
        let (status, body) = call(&client, reqwest::Method::GET, &url, &args.token).await?;
        match status.as_u16() {
            200 => {
                definition = Some(url);
                break;
            }
            404 => continue,
            _ => bail!("{status}: {}", body["error"]["message"]),
        }
    }
    let Some(url) = definition else {
        bail!(
            "no computed trait or audience {:?} in space {:?}",
            args.key,
            args.space_id
        );
    };
    let (status, body) = call(
        &client,
        reqwest::Method::POST,
        &format!("{url}/backfill"),
        &args.token,
    )
    .await?;
    if !status.is_success() {
        bail!("{status}: {}", body["error"]["message"]);
    }
    let mut err = std::io::stderr();
    let mut total = 0;
    loop {
        let (status, body) = call(&client, reqwest::Method::GET, &url, &args.token).await?;
        if !status.is_success() {
            bail!("{status}: {}", body["error"]["message"]);
        }
        match body["status"].as_str() {
            Some("backfilling") => {
                let done = body["progress"]["done"].as_u64().unwrap_or(0);
                total = body["progress"]["total"].as_u64().unwrap_or(0);
                write!(err, "\r{}", bar(done, total))?;
                err.flush()?;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Some("ready") => {
                writeln!(err, "\r{}", bar(total, total))?;
                println!(
                    "{} {:?} is ready (version {})",
                    body["class"].as_str().unwrap_or("definition"),
                    args.key,
                    body["version"]
                );
                return Ok(());
            }
            _ => {
                writeln!(err)?;
                bail!(
                    "the backfill failed: {}",
                    body["error"].as_str().unwrap_or("unknown error")
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bar;

    #[test]
    fn the_bar_fills_with_progress() {
        assert_eq!(
            bar(0, 10),
            format!("[{}]   0% 0/10 profiles", ".".repeat(30))
        );
        assert_eq!(
            bar(5, 10),
            format!("[{}{}]  50% 5/10 profiles", "#".repeat(15), ".".repeat(15))
        );
        assert_eq!(bar(0, 0), format!("[{}] 100% 0/0 profiles", "#".repeat(30)));
    }
}
