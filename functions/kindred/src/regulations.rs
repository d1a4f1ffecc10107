//! `kindred regulations <space> list|create|show`: delete and suppress
//! people, or lift a suppression, on a running Kindred (the Admin API's
//! `/regulations`).

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::destinations::{render, text};

#[derive(Args, Clone, Debug)]
pub struct RegulationsArgs {
    /// The space.
    pub space_id: String,
    #[command(subcommand)]
    pub command: Option<RegulationsCommand>,
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
pub enum RegulationsCommand {
    /// The space's regulations, newest first, and how many events of
    /// suppressed people were dropped (the default).
    List,
    /// Starts a regulation and prints its id.
    Create {
        /// SUPPRESS_WITH_DELETE, DELETE_INTERNAL, SUPPRESS_ONLY or UNSUPPRESS.
        #[arg(long = "type")]
        regulation_type: String,
        /// USER_ID or an identifier type (email, anonymous_id, ...).
        #[arg(long, default_value = "USER_ID")]
        subject_type: String,
        /// The subjects (at most 5,000).
        #[arg(required = true)]
        subject_ids: Vec<String>,
    },
    /// One regulation, with each subject's status.
    Show { id: String },
}

pub async fn run(args: RegulationsArgs) -> anyhow::Result<()> {
    let token = args
        .token
        .context("the space's admin token is required (--token or KINDRED_ADMIN_TOKEN)")?;
    let base = format!(
        "{}/v1/spaces/{}/regulations",
        args.url.trim_end_matches('/'),
        args.space_id
    );
    let client = reqwest::Client::new();
    let command = args.command.unwrap_or(RegulationsCommand::List);
    let request = match &command {
        RegulationsCommand::List => client.get(&base),
        RegulationsCommand::Create {
            regulation_type,
            subject_type,
            subject_ids,
        } => client.post(&base).json(&json!({
            "regulation_type": regulation_type,
            "subject_type": subject_type,
            "subject_ids": subject_ids,
        })),
        RegulationsCommand::Show { id } => client.get(format!("{base}/{id}")),
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
    match command {
        RegulationsCommand::List => {
            let mut cells = vec![["ID", "TYPE", "STATUS", "SUBJECTS", "DELETED", "CREATED"]
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()];
            for r in body["data"].as_array().into_iter().flatten() {
                cells.push(
                    [
                        "id",
                        "regulation_type",
                        "status",
                        "subject_count",
                        "profiles_deleted",
                        "created_at",
                    ]
                    .iter()
                    .map(|f| text(&r[*f]))
                    .collect(),
                );
            }
            print!("{}", render(&cells));
            println!(
                "events of suppressed people dropped: {}",
                text(&body["suppressed_events"])
            );
        }
        RegulationsCommand::Create { .. } => {
            println!("{}", text(&body["id"]));
        }
        RegulationsCommand::Show { .. } => {
            println!(
                "{} {} {} (subjects: {}, profiles deleted: {})",
                text(&body["id"]),
                text(&body["regulation_type"]),
                text(&body["status"]),
                text(&body["subject_count"]),
                text(&body["profiles_deleted"])
            );
            let mut cells = vec![["INDEX", "STATUS", "DELETED", "REASON"]
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()];
            for s in body["subjects"].as_array().into_iter().flatten() {
                cells.push(
                    ["index", "status", "profiles_deleted", "reason"]
                        .iter()
                        .map(|f| text(&s[*f]))
                        .collect(),
                );
            }
            print!("{}", render(&cells));
        }
    }
    Ok(())
}
