//! The daemon commands for programs and people: `reach recv`, `reach send`
//! with a file or stdin, `reach peers`, `reach ping`, `reach connect`.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use reach::api::client::ApiClient;
use reach::api::daemon::{BuildInfo, PeersResponse, PingRequest, PingResponse};
use reach::api::recv::{RecvEvent, base64_decode};
use reach::api::{ConnectRequest, SendResponse};

use crate::cli::DataDirArg;

use crate::cli::PeerRef;

#[derive(Debug, Args)]
pub struct RecvArgs {
    /// Keep printing messages and connection events until Ctrl-C, instead
    /// of exiting after the first message.
    #[arg(long)]
    pub follow: bool,
    /// Print each event as the API's JSON object, one per line
    /// (`{"kind":"message","seq","from","data_b64","len"}`, connection
    /// events, `{"kind":"missed","count"}`).
    #[arg(long)]
    pub json: bool,
    /// Start with the events after this seq still in the node's backlog
    /// (0: all of it) instead of the next one.
    #[arg(long, value_name = "SEQ")]
    pub since: Option<u64>,
    #[command(flatten)]
    pub data_dir: DataDirArg,
}

/// `reach recv`.
pub async fn recv(args: RecvArgs, dir: &Path) -> Result<()> {
    let client = ApiClient::from_data_dir(dir)?;
    let path = match args.since {
        Some(s) => format!("/v1/recv?since={s}"),
        None => "/v1/recv".to_string(),
    };
    let mut events = client.open_events(&path).await?;
    let mut out = std::io::stdout().lock();
    loop {
        let data = tokio::select! {
            d = events.next() => d?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(data) = data else {
            anyhow::bail!("the node closed the event stream (it stopped)");
        };
        let event: RecvEvent =
            serde_json::from_str(&data).with_context(|| "malformed event from the control API")?;
        let is_message = matches!(event, RecvEvent::Message { .. });
        if !args.follow && !is_message {
            continue;
        }
        if args.json {
            writeln!(out, "{data}")?;
        } else {
            writeln!(out, "{}", event_line(&event)?)?;
        }
        out.flush()?;
        if !args.follow {
            return Ok(());
        }
    }
}

/// An event as one human line; message text escaped as `reach node` does.
fn event_line(event: &RecvEvent) -> Result<String> {
    Ok(match event {
        RecvEvent::Message { from, data_b64, .. } => {
            let data = base64_decode(data_b64).context("message data is not base64")?;
            format!(
                "message from {from}: {}",
                crate::commands::escape_text(&data)
            )
        }
        RecvEvent::Connected {
            peer,
            path,
            direction,
            ..
        } => format!("connected {peer} ({path}, {direction})"),
        RecvEvent::Disconnected { peer, .. } => format!("disconnected {peer}"),
        RecvEvent::PathChanged { peer, path, .. } => format!("path {peer} now {path}"),
        RecvEvent::Missed { count } => format!("missed {count} events (this reader was too slow)"),
    })
}

/// `reach send`: a file or stdin goes as raw bytes; returns the text to
/// send as JSON otherwise (the existing path).
pub async fn send_bytes(
    client: &ApiClient,
    peer_ref: &PeerRef,
    message: Option<String>,
    file: Option<PathBuf>,
    addrs: &[SocketAddr],
) -> Result<Option<String>> {
    let limit = reach::MAX_MESSAGE_LEN;
    let data = match read_message(message, file, limit)? {
        Message::Text(m) => return Ok(Some(m)),
        Message::Bytes(data) => data,
    };
    let peer = peer_ref.peer();
    connect_first(client, peer_ref, addrs).await?;
    let resp: SendResponse = client
        .post_bytes(&format!("/v1/send?peer={peer}"), data)
        .await?;
    println!("delivered {} bytes to {}", resp.bytes, peer);
    Ok(None)
}

/// `reach send --durable`'s options.
pub struct Durable {
    pub class: String,
    pub attempts: Option<u32>,
    pub ttl_s: Option<u64>,
}

/// `reach send --durable`: the message (text, `-` for stdin, or a file)
/// committed to the node's outbox; prints its id.
pub async fn send_durable(
    client: &ApiClient,
    peer_ref: &PeerRef,
    message: Option<String>,
    file: Option<PathBuf>,
    addrs: &[SocketAddr],
    durable: Durable,
) -> Result<()> {
    let data = match read_message(message, file, reach::outbox::MAX_DURABLE_MESSAGE_LEN)? {
        Message::Text(m) => m.into_bytes(),
        Message::Bytes(data) => data,
    };
    anyhow::ensure!(
        data.len() <= reach::outbox::MAX_DURABLE_MESSAGE_LEN,
        "a durable message is at most {} bytes",
        reach::outbox::MAX_DURABLE_MESSAGE_LEN
    );
    let peer = peer_ref.peer();
    // A ticket or address is only a hint for the first try: the outbox
    // finds the peer by its id from then on.
    if let Err(e) = connect_first(client, peer_ref, addrs).await {
        eprintln!("note: {peer} is not reachable now ({e}); the message waits in the outbox");
    }
    let mut path = format!("/v1/send?peer={peer}&durable={}", durable.class);
    if let Some(n) = durable.attempts {
        path.push_str(&format!("&attempts={n}"));
    }
    if let Some(t) = durable.ttl_s {
        path.push_str(&format!("&ttl_s={t}"));
    }
    let resp: SendResponse = client.post_bytes(&path, data).await?;
    match resp.durable_id {
        Some(id) => println!(
            "committed durable message {id} ({} bytes) for {peer}: `reach outbox` shows it until delivered",
            resp.bytes
        ),
        None => anyhow::bail!("the node did not say it committed the message"),
    }
    Ok(())
}

/// `reach outbox`: the durable messages waiting for their receivers.
pub async fn outbox(client: &ApiClient, json: bool) -> Result<()> {
    let resp: reach::api::OutboxResponse = client.get("/v1/outbox").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&resp)?);
        return Ok(());
    }
    if resp.pending.is_empty() {
        println!("outbox empty: every durable message was delivered (or given up)");
        return Ok(());
    }
    println!(
        "{:>6}  {:<52}  {:>5}  {:>8}  {:>8}  {:>9}  delivery",
        "id", "peer", "seq", "bytes", "attempts", "next try"
    );
    for e in &resp.pending {
        let next = e.next_try_ms.map_or("awaiting".to_string(), |ms| {
            format!("{:.1}s", ms as f64 / 1000.0)
        });
        println!(
            "{:>6}  {:<52}  {:>5}  {:>8}  {:>8}  {:>9}  {}",
            e.id, e.peer, e.seq, e.bytes, e.attempts, next, e.delivery
        );
    }
    Ok(())
}

/// What `send` was given: text to send as is, or bytes read from stdin or
/// a file (at most `limit`, checked by the caller).
enum Message {
    Text(String),
    Bytes(Vec<u8>),
}

fn read_message(message: Option<String>, file: Option<PathBuf>, limit: usize) -> Result<Message> {
    let data = match (file, message) {
        (Some(f), _) => {
            let mut data = Vec::new();
            std::fs::File::open(&f)
                .and_then(|h| h.take(limit as u64 + 1).read_to_end(&mut data))
                .with_context(|| format!("reading {}", f.display()))?;
            data
        }
        (None, Some(m)) if m == "-" => {
            let mut data = Vec::new();
            std::io::stdin()
                .lock()
                .take(limit as u64 + 1)
                .read_to_end(&mut data)
                .context("reading the message from stdin")?;
            data
        }
        (None, Some(m)) => return Ok(Message::Text(m)),
        (None, None) => anyhow::bail!("give a message, `-` for stdin, or --file"),
    };
    anyhow::ensure!(
        data.len() <= limit,
        "the message is over the limit of {limit} bytes"
    );
    Ok(Message::Bytes(data))
}

/// Dials the peer first when the user gave addresses or a ticket.
async fn connect_first(client: &ApiClient, peer_ref: &PeerRef, addrs: &[SocketAddr]) -> Result<()> {
    let peer = peer_ref.peer();
    if !addrs.is_empty() || peer_ref.ticket().is_some() {
        let _: serde_json::Value = client
            .post(
                "/v1/connect",
                &ConnectRequest {
                    peer,
                    addrs: addrs.to_vec(),
                    ticket: peer_ref.ticket(),
                },
            )
            .await?;
    }
    Ok(())
}

/// `reach peers`.
pub async fn peers(client: &ApiClient, json: bool) -> Result<()> {
    let resp: PeersResponse = client.get("/v1/peers").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&resp)?);
        return Ok(());
    }
    if resp.peers.is_empty() {
        println!("no peers connected");
    }
    for p in &resp.peers {
        println!(
            "{}  {:<21}  {:<8} rtt {} ms  {}",
            p.peer, p.addr, p.path, p.rtt_ms, p.direction
        );
    }
    Ok(())
}

/// `reach ping`.
pub async fn ping(client: &ApiClient, peer_ref: &PeerRef, count: u32) -> Result<()> {
    let peer = peer_ref.peer();
    if peer_ref.ticket().is_some() {
        connect_quietly(client, peer_ref, Vec::new()).await?;
    }
    let resp: PingResponse = client
        .post(
            "/v1/ping",
            &PingRequest {
                peer,
                count: Some(count),
            },
        )
        .await?;
    for (i, rtt) in resp.rtts_us.iter().enumerate() {
        println!(
            "reply from {peer}: seq={} time={:.3} ms path={}",
            i + 1,
            *rtt as f64 / 1000.0,
            resp.path
        );
    }
    Ok(())
}

/// `reach connect`.
pub async fn connect(client: &ApiClient, peer: &PeerRef, addrs: Vec<SocketAddr>) -> Result<()> {
    connect_quietly(client, peer, addrs).await?;
    println!("connected to {}", peer.peer());
    Ok(())
}

/// Has the running node connect to `peer` (with its ticket, if named by
/// one, and `addrs`).
async fn connect_quietly(client: &ApiClient, peer: &PeerRef, addrs: Vec<SocketAddr>) -> Result<()> {
    let _: serde_json::Value = client
        .post(
            "/v1/connect",
            &ConnectRequest {
                peer: peer.peer(),
                addrs,
                ticket: peer.ticket(),
            },
        )
        .await?;
    Ok(())
}

/// The version lines of `reach status`.
pub fn print_build(b: &BuildInfo) {
    println!(
        "version   {} ({} build), up {}",
        b.version,
        b.profile,
        uptime(b.uptime_s)
    );
}

fn uptime(s: u64) -> String {
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}
