//! `reach pub`, `reach sub`, `reach members`: topics through a running
//! node's control API (see `reach::api::topics`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use reach::api::client::ApiClient;
use reach::api::recv::{base64_decode, base64_encode};
use reach::api::topics::{MembersResponse, PublishRequest, TopicStreamEvent, encode_name};

use crate::cli::DataDirArg;

#[derive(Debug, Args)]
pub struct PubArgs {
    /// The topic's name.
    pub topic: String,
    /// The message text; `-` reads the message's bytes from stdin.
    #[arg(required_unless_present = "file", conflicts_with = "file")]
    pub message: Option<String>,
    /// Publish this file's bytes (up to 64 KiB, a topic message's limit).
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub data_dir: DataDirArg,
}

#[derive(Debug, Args)]
pub struct SubArgs {
    /// The topic's name.
    pub topic: String,
    /// Print each event as the API's JSON object, one per line.
    #[arg(long)]
    pub json: bool,
    /// Exit after this many messages (default: until Ctrl-C).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    #[command(flatten)]
    pub data_dir: DataDirArg,
}

#[derive(Debug, Args)]
pub struct MembersArgs {
    /// The topic's name.
    pub topic: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub data_dir: DataDirArg,
}

/// Reads a message: the text, stdin for `-`, or a file, at most `limit`
/// bytes.
fn message_bytes(message: Option<String>, file: Option<PathBuf>, limit: usize) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    match (file, message.as_deref()) {
        (Some(f), _) => {
            std::fs::File::open(&f)
                .and_then(|h| h.take(limit as u64 + 1).read_to_end(&mut data))
                .with_context(|| format!("reading {}", f.display()))?;
        }
        (None, Some("-")) => {
            std::io::stdin()
                .lock()
                .take(limit as u64 + 1)
                .read_to_end(&mut data)
                .context("reading stdin")?;
        }
        (None, Some(text)) => data = text.as_bytes().to_vec(),
        (None, None) => anyhow::bail!("a message or --file is needed"),
    }
    anyhow::ensure!(
        data.len() <= limit,
        "the message is over {limit} bytes (a topic message's limit)"
    );
    Ok(data)
}

/// `reach pub`.
pub async fn publish(args: PubArgs, dir: &Path) -> Result<()> {
    let data = message_bytes(args.message, args.file, reach_proto::topics::MAX_DATA_LEN)?;
    let client = ApiClient::from_data_dir(dir)?;
    let report: reach::PublishReport = client
        .post(
            "/v1/topics/publish",
            &PublishRequest {
                topic: args.topic.clone(),
                data_b64: base64_encode(&data),
            },
        )
        .await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "published {} bytes on {} as message {} (home {}; {} homes, {} members known)",
            data.len(),
            args.topic,
            report.id,
            report.home,
            report.homes,
            report.members
        );
    }
    Ok(())
}

/// `reach members`.
pub async fn members(args: MembersArgs, dir: &Path) -> Result<()> {
    let client = ApiClient::from_data_dir(dir)?;
    let resp: MembersResponse = client
        .get(&format!(
            "/v1/topics/members?topic={}",
            encode_name(&args.topic)
        ))
        .await?;
    if args.json {
        println!("{}", serde_json::to_string(&resp)?);
    } else {
        for m in &resp.members {
            println!("{} (home {})", m.member, m.home);
        }
    }
    Ok(())
}

/// `reach sub`.
pub async fn subscribe(args: SubArgs, dir: &Path) -> Result<()> {
    let client = ApiClient::from_data_dir(dir)?;
    let mut events = client
        .open_events(&format!(
            "/v1/topics/sub?topic={}",
            encode_name(&args.topic)
        ))
        .await?;
    let mut out = std::io::stdout().lock();
    let mut messages = 0;
    loop {
        if args.count.is_some_and(|c| messages >= c) {
            return Ok(());
        }
        let data = tokio::select! {
            d = events.next() => d?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(data) = data else {
            anyhow::bail!("the node closed the topic stream (it stopped)");
        };
        let event: TopicStreamEvent =
            serde_json::from_str(&data).context("malformed event from the control API")?;
        if matches!(event, TopicStreamEvent::Message { .. }) {
            messages += 1;
        }
        if args.json {
            writeln!(out, "{data}")?;
        } else {
            writeln!(out, "{}", line(&event)?)?;
        }
        out.flush()?;
    }
}

fn line(event: &TopicStreamEvent) -> Result<String> {
    Ok(match event {
        TopicStreamEvent::Message {
            from, id, data_b64, ..
        } => {
            let data = base64_decode(data_b64).context("message data is not base64")?;
            format!("{from} #{id}: {}", crate::commands::escape_text(&data))
        }
        TopicStreamEvent::Joined { member, home } => format!("joined {member} (home {home})"),
        TopicStreamEvent::Left { member, home } => format!("left {member} (home {home})"),
        TopicStreamEvent::Missed { count } => {
            format!("missed {count} events (this reader was too slow)")
        }
    })
}
