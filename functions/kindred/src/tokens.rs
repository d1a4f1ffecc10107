//! `kindred tokens <space> list|create|revoke`: rotate a space's write
//! keys, access tokens and admin tokens on a running Kindred (the Admin
//! API's `/tokens`).

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::destinations::{render, text};

#[derive(Args, Clone, Debug)]
pub struct TokensArgs {
    /// The space.
    pub space_id: String,
    #[command(subcommand)]
    pub command: Option<TokensCommand>,
    /// Where Kindred serves (the local server or the AWS stack's ApiUrl).
    #[arg(
        long,
        global = true,
        env = "KINDRED_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// The space's admin token.
    #[arg(
        long,
        global = true,
        env = "KINDRED_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

#[derive(Subcommand, Clone, Debug)]
pub enum TokensCommand {
    /// Every key and token of the space: id, prefix, kind, label, times (the default).
    List,
    /// Mints a key or token and prints its secret, once.
    Create {
        /// write_key, access_token or admin_token.
        #[arg(long)]
        kind: String,
        #[arg(long)]
        label: Option<String>,
    },
    /// Revokes a key or token by its id (the 12 characters after the prefix's `_`).
    Revoke { id: String },
}

pub async fn run(args: TokensArgs) -> anyhow::Result<()> {
    let token = args
        .token
        .context("the space's admin token is required (--token or KINDRED_ADMIN_TOKEN)")?;
    let base = format!(
        "{}/v1/spaces/{}/tokens",
        args.url.trim_end_matches('/'),
        args.space_id
    );
    let client = reqwest::Client::new();
    let request = match args.command.unwrap_or(TokensCommand::List) {
        TokensCommand::List => client.get(&base),
        TokensCommand::Create { kind, label } => client
            .post(&base)
            .json(&json!({"kind": kind, "label": label})),
        TokensCommand::Revoke { id } => client.delete(format!("{base}/{id}")),
    };
    let response = request
        .basic_auth(&token, Some(""))
        .send()
        .await
        .with_context(|| format!("calling {base}"))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{status}: {}", text(&body["error"]["message"]));
    }
    if let Some(rows) = body["data"].as_array() {
        let mut cells = vec![["ID", "PREFIX", "KIND", "LABEL", "CREATED", "REVOKED"]
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()];
        for t in rows {
            cells.push(
                ["id", "prefix", "kind", "label", "created_at", "revoked_at"]
                    .iter()
                    .map(|f| text(&t[*f]))
                    .collect(),
            );
        }
        print!("{}", render(&cells));
    } else if body.get("token").is_some() {
        // The secret is shown this once: print the whole answer as JSON.
        println!("{body}");
    } else {
        println!("revoked");
    }
    Ok(())
}
