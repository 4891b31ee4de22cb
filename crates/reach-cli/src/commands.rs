//! What each subcommand does.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use reach::api::client::ApiClient;
use reach::api::{LookupRequest, LookupResponse, SendRequest, SendResponse, Status};
use reach::{Event, Node};

use crate::cli::{BenchCommand, ChaosCommand, Cli, Command, DataDirArg, LabCommand, NodeArgs};
use crate::config::Config;
use crate::demo;

/// UDP port `reach node` listens on when neither flag nor config says.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4433";

pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Node(args) => run_node(args).await,
        Command::Id {
            ticket: true,
            data_dir: dir,
        } => {
            let client = ApiClient::from_data_dir(&data_dir(&dir)?)?;
            let t: serde_json::Value = client.get("/v1/ticket").await?;
            println!("{}", t["ticket"].as_str().unwrap_or_default());
            Ok(())
        }
        Command::Id {
            ticket: false,
            data_dir: dir,
        } => {
            let dir = data_dir(&dir)?;
            let (kp, created) = reach::keystore::load_or_create(&dir)?;
            if created {
                eprintln!(
                    "created a new identity in {}",
                    reach::keystore::key_path(&dir).display()
                );
            }
            println!("{}", kp.peer_id());
            Ok(())
        }
        Command::Status { data_dir: d, json } => {
            let client = ApiClient::from_data_dir(&data_dir(&d)?)?;
            let status: serde_json::Value = client.get("/v1/status").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                let status: Status = serde_json::from_value(status)?;
                print_status(&status);
            }
            Ok(())
        }
        Command::Send {
            peer,
            message,
            file,
            addrs,
            durable,
            attempts,
            ttl,
            data_dir: d,
        } => {
            let client = ApiClient::from_data_dir(&data_dir(&d)?)?;
            if let Some(class) = durable {
                let durable = crate::daemon::Durable {
                    class,
                    attempts,
                    ttl_s: ttl,
                };
                return crate::daemon::send_durable(&client, &peer, message, file, &addrs, durable)
                    .await;
            }
            let message =
                match crate::daemon::send_bytes(&client, &peer, message, file, &addrs).await? {
                    Some(text) => text,
                    None => return Ok(()),
                };
            let resp: SendResponse = client
                .post(
                    "/v1/send",
                    &SendRequest {
                        peer: peer.peer(),
                        addrs,
                        ticket: peer.ticket(),
                        message,
                    },
                )
                .await?;
            println!("delivered {} bytes to {}", resp.bytes, peer.peer());
            Ok(())
        }
        Command::Lookup {
            peer,
            json,
            data_dir: d,
        } => {
            let client = ApiClient::from_data_dir(&data_dir(&d)?)?;
            let resp: LookupResponse = client.post("/v1/lookup", &LookupRequest { peer }).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&resp)?);
            } else {
                println!("{peer}");
                for a in &resp.addrs {
                    println!(
                        "  {:<10} {}",
                        format!("{:?}", a.kind).to_lowercase(),
                        a.addr
                    );
                }
            }
            Ok(())
        }
        Command::Nat { json, data_dir: d } => {
            let client = ApiClient::from_data_dir(&data_dir(&d)?)?;
            let report: serde_json::Value = client.get("/v1/nat").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_nat(&report);
            }
            Ok(())
        }
        Command::Recv(args) => {
            let dir = data_dir(&args.data_dir)?;
            crate::daemon::recv(args, &dir).await
        }
        Command::Outbox { json, data_dir: d } => {
            crate::daemon::outbox(&ApiClient::from_data_dir(&data_dir(&d)?)?, json).await
        }
        Command::Peers { json, data_dir: d } => {
            crate::daemon::peers(&ApiClient::from_data_dir(&data_dir(&d)?)?, json).await
        }
        Command::Dashboard { data_dir: d } => {
            crate::dashboard::login_url(&ApiClient::from_data_dir(&data_dir(&d)?)?).await
        }
        Command::Ping {
            peer,
            count,
            data_dir: d,
        } => crate::daemon::ping(&ApiClient::from_data_dir(&data_dir(&d)?)?, &peer, count).await,
        Command::Connect {
            peer,
            addrs,
            data_dir: d,
        } => crate::daemon::connect(&ApiClient::from_data_dir(&data_dir(&d)?)?, &peer, addrs).await,
        Command::Lab(LabCommand::Nat {
            kinds,
            delay_ms,
            json,
        }) => lab_nat(kinds, delay_ms, json).await,
        Command::Lab(LabCommand::Failover) => {
            let r = tokio::select! {
                r = reach_lab::pairs::failover() => r?,
                _ = wait_for_stop_signal() => anyhow::bail!("interrupted; the lab was torn down"),
            };
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Command::Lab(LabCommand::Upgrade) => {
            let r = tokio::select! {
                r = reach_lab::pairs::upgrade() => r?,
                _ = wait_for_stop_signal() => anyhow::bail!("interrupted; the lab was torn down"),
            };
            println!("{}", serde_json::to_string(&r)?);
            anyhow::ensure!(
                r.received == r.sent && r.duplicates == 0 && r.send_errors == 0,
                "messages were lost, doubled or failed"
            );
            Ok(())
        }
        Command::Lab(LabCommand::Matrix {
            kinds,
            runs,
            delay_ms,
            json,
            markdown,
        }) => lab_matrix(kinds, runs, delay_ms, json, markdown).await,
        Command::Lab(LabCommand::Portmap {
            kinds,
            lease_secs,
            json,
        }) => lab_portmap(kinds, lease_secs, json).await,
        Command::Lab(LabCommand::Rooms { messages, json }) => lab_rooms(messages, json).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Events {
            follow,
            json,
            data_dir: d,
        } => {
            let dir = data_dir(&d)?;
            tokio::task::spawn_blocking(move || crate::eventlog::run(&dir, follow, json)).await?
        }
        Command::Pub(args) => {
            let dir = data_dir(&args.data_dir)?;
            crate::topics::publish(args, &dir).await
        }
        Command::Sub(args) => {
            let dir = data_dir(&args.data_dir)?;
            crate::topics::subscribe(args, &dir).await
        }
        Command::Members(args) => {
            let dir = data_dir(&args.data_dir)?;
            crate::topics::members(args, &dir).await
        }
        Command::Bench(BenchCommand::Connect { dialers, json }) => {
            let r = crate::bench::connect(dialers).await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "connect to first echoed byte, {dialers} fresh dialers each (median / p99):"
                );
                for (name, v) in [
                    ("raw quinn, server auth only", &r.quinn_server_auth),
                    ("raw quinn, mutual auth", &r.quinn_mutual),
                    ("raw quinn, mutual, pq off", &r.quinn_mutual_classical),
                    ("reach, pq off", &r.reach_classical),
                    ("reach, hybrid pq", &r.reach_hybrid),
                ] {
                    let groups = if v.groups.is_empty() {
                        String::new()
                    } else {
                        format!("  [{}]", v.groups.join(", "))
                    };
                    println!(
                        "  {name:<28} {:>6} µs / {:>6} µs  (handshake {:>6} µs){groups}",
                        v.median_us, v.p99_us, v.handshake_median_us
                    );
                }
                println!(
                    "ratios: hybrid / quinn mutual {:.2} (target ≤ 1.25), hybrid / classical {:.2} ({:+} µs; target ≤ 1.10 or ≤ +1000 µs)",
                    r.ratio_hybrid_vs_quinn_mutual, r.ratio_hybrid_vs_classical, r.hybrid_extra_us
                );
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Flood {
            handshakes,
            churn,
            json,
        }) => {
            let r = crate::bench::flood(handshakes, churn).await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "flood: {} handshakes in {:.1} s ({:.0}/s): {} accepted, {} refused, {} failed",
                    r.handshakes,
                    r.flood_s,
                    r.flood_rate_per_s,
                    r.handshakes_accepted,
                    r.handshakes_refused,
                    r.handshakes_failed
                );
                println!(
                    "churn: {} identities: {} accepted, {} refused; target evicted {} peer entries",
                    r.churn, r.churn_accepted, r.churn_refused, r.target_peers_evicted
                );
                println!(
                    "target RSS: {:.1} MiB before, {:.1} MiB peak, {:.1} MiB after",
                    r.target_rss_before_mib, r.target_peak_rss_mib, r.target_final_rss_mib
                );
                println!(
                    "honest peer: {}/{} delivered, p50 {:.1} ms, p99 {:.1} ms",
                    r.honest_delivered, r.honest_sent, r.honest_p50_ms, r.honest_p99_ms
                );
            }
            anyhow::ensure!(r.targets_met, "the flood targets were not met");
            Ok(())
        }
        Command::Bench(BenchCommand::Topics {
            messages,
            latency_messages,
            json,
        }) => {
            let r = crate::bench::topics(messages, latency_messages).await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "forwarding through one home: {} msgs/s end to end ({} messages, {} publishers, once and in order: {})",
                    r.forward_msgs_per_s,
                    r.forward_messages,
                    r.forward_publishers,
                    r.forward_in_order_once
                );
                println!(
                    "the home saturated: {} msgs/s taken, {} copies/s delivered ({} each), {} msgs per home CPU-second, home cores {} (once and in order: {})",
                    r.capacity_msgs_per_s,
                    r.capacity_copies_per_s,
                    r.capacity_copies_per_message,
                    r.capacity_home_msgs_per_cpu_s,
                    r.capacity_home_cores,
                    r.capacity_in_order_once
                );
                println!(
                    "the home alone: {:.3} ms CPU per message, {} msgs per CPU-second ({} copies each; target ≥ 100,000)",
                    r.forward_home_cpu_ms_per_message,
                    r.forward_home_msgs_per_cpu_s,
                    r.forward_copies_per_message
                );
                println!(
                    "one federation hop adds p50 {:.3} ms, p99 {:.3} ms (target p99 ≤ 1 ms)",
                    r.hop_added_p50_ms, r.hop_added_p99_ms
                );
                println!(
                    "quiet topic p99 {:.3} ms alone, {:.3} ms with another topic flooded at {} publishes/s offered (limit {}/s): ratio {:.3} (target ≤ 1.10)",
                    r.flood_quiet_p99_alone_ms,
                    r.flood_quiet_p99_flooded_ms,
                    r.flood_offered_per_s,
                    r.flood_limit_per_s,
                    r.flood_p99_ratio
                );
            }
            anyhow::ensure!(
                r.forward_in_order_once,
                "a forwarded message was lost, duplicated or reordered"
            );
            anyhow::ensure!(
                r.capacity_in_order_once,
                "in the saturation run, a message was lost, duplicated or reordered"
            );
            anyhow::ensure!(r.targets_met, "the topics targets were not met");
            Ok(())
        }
        Command::Bench(BenchCommand::TopicsFlooder {
            home_id,
            home_addr,
            topic,
            members,
            rate,
        }) => {
            crate::bench::topics_flood::flooder(home_id, home_addr, topic, members as usize, rate)
                .await
        }
        Command::Bench(BenchCommand::Outbox {
            single,
            messages,
            concurrency,
            size,
            dir,
            backlog,
            resend_trials,
            json,
        }) => {
            let r = crate::bench::outbox(
                single,
                messages,
                concurrency,
                size as usize,
                dir,
                backlog,
                resend_trials,
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "one at a time ({} msgs): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (target p99 ≤ 5 ms)",
                    r.single_messages, r.single_p50_ms, r.single_p99_ms, r.single_max_ms
                );
                println!(
                    "{} enqueuers, {} msgs: {:.0} msgs/s (target ≥ 10,000), p50 {:.2} ms, p99 {:.2} ms, {:.1} per commit",
                    r.concurrency,
                    r.concurrent_messages,
                    r.concurrent_msgs_per_s,
                    r.concurrent_p50_ms,
                    r.concurrent_p99_ms,
                    r.concurrent_requests_per_commit
                );
                println!(
                    "store-side drain: {:.0} msgs/s; on {} ({}), checked {} on disk after reopening",
                    r.drain_store_msgs_per_s, r.dir, r.filesystem, r.on_disk_after
                );
                println!(
                    "drain of a {}-message backlog to a returning peer: {:.0} msgs/s (target ≥ 5,000), received once and in order: {}",
                    r.drain_backlog, r.drain_msgs_per_s, r.drain_received_in_order
                );
                println!(
                    "peer reachable to first resend received ({} trials): p50 {:.1} ms, p99 {:.1} ms (target ≤ {:.0} ms)",
                    r.resend_trials, r.resend_p50_ms, r.resend_p99_ms, r.resend_target_ms
                );
            }
            anyhow::ensure!(r.targets_met, "the outbox targets were not met");
            Ok(())
        }
        Command::Chaos(ChaosCommand::Outbox {
            messages,
            kills,
            seed,
            rate,
            moderate_to_nowhere,
            attempts,
            deadline,
            json,
        }) => {
            let r = crate::chaos::outbox(crate::chaos::ChaosOptions {
                messages,
                kills,
                seed,
                rate,
                moderate_to_nowhere,
                attempts,
                deadline: std::time::Duration::from_secs(deadline),
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} sent, {} delivered, {} lost, {} duplicates, {} order violations, {} redelivered after a kill of B",
                    r.sent,
                    r.delivered,
                    r.lost,
                    r.duplicates,
                    r.order_violations,
                    r.redelivered_after_kill
                );
                println!(
                    "{} kills (A {}, B {}), B stopped {} times; {:.1} s",
                    r.kills, r.kills_a, r.kills_b, r.stops_b, r.wall_s
                );
                println!(
                    "moderate to nowhere: {} of {} seen at {} attempts, {} abandoned and logged",
                    r.moderate.seen_at_attempts,
                    r.moderate.messages,
                    r.moderate.attempts,
                    r.moderate.abandoned_logged
                );
            }
            anyhow::ensure!(r.ok, "chaos checks failed: {}", r.failures.join("; "));
            Ok(())
        }
        Command::Bench(BenchCommand::Relay {
            mib,
            rounds,
            pings,
            json,
        }) => {
            let r = crate::bench::relay(mib, rounds, pings).await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "bulk ({} MiB x {}): direct {:.1} MiB/s, relayed {:.1} MiB/s, ratio {:.2}",
                    mib, rounds, r.direct_mib_s, r.relayed_mib_s, r.bulk_ratio
                );
                println!(
                    "ping p50 ({} pings): direct {} µs, relayed {} µs, overhead {} µs",
                    pings, r.direct_rtt_p50_us, r.relayed_rtt_p50_us, r.rtt_overhead_p50_us
                );
                println!(
                    "relay forwarding (one core): {:.0} packets/s, {} bytes forwarded, {} dropped",
                    r.relay_forwarded_pps, r.relay_forwarded_bytes, r.relay_dropped
                );
            }
            Ok(())
        }
    }
}

/// The data dir from the flag/env, else the XDG default.
fn data_dir(arg: &DataDirArg) -> Result<PathBuf> {
    if let Some(d) = &arg.data_dir {
        return Ok(d.clone());
    }
    default_data_dir()
}

fn default_data_dir() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("reach"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("cannot find a data dir: set --data-dir, REACH_DATA_DIR or HOME")?;
    Ok(PathBuf::from(home).join(".local/share/reach"))
}

async fn run_node(args: NodeArgs) -> Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let dir = match (&args.data_dir.data_dir, &config.data_dir) {
        (Some(d), _) | (None, Some(d)) => d.clone(),
        (None, None) => default_data_dir()?,
    };
    let listen: SocketAddr = match args.listen.or(config.listen) {
        Some(a) => a,
        None => DEFAULT_LISTEN.parse()?,
    };
    let api_listen: SocketAddr = match args.api_listen.or(config.api_listen) {
        Some(a) => a,
        None => reach::api::DEFAULT_API_LISTEN.parse()?,
    };
    let mut bootstrap = config.bootstrap.clone();
    bootstrap.extend(&args.bootstrap);
    let mode = if args.client {
        reach::DhtMode::Client
    } else {
        config.dht_mode.unwrap_or_default()
    };
    let mut builder = Node::builder()
        .bind(listen)
        .connection_events(true)
        .data_dir(&dir)
        .bootstrap(bootstrap)
        .dht_mode(mode)
        .relay_service(args.relay.or(config.relay).unwrap_or_default())
        .acquire_relay(
            args.acquire_relay
                .or(config.acquire_relay)
                .unwrap_or_default(),
        )
        .hole_punching(!args.no_hole_punching && config.hole_punching.unwrap_or(true))
        .port_mapping(reach::PortMapping {
            enabled: !args.no_port_mapping && config.port_mapping.unwrap_or(true),
            gateway: config.port_mapping_gateway,
            ..reach::PortMapping::default()
        })
        .post_quantum(args.pq.or(config.pq).unwrap_or_default())
        .event_log(config.event_log.unwrap_or(true));
    if let Some(limits) = &config.relay_limits {
        builder = builder.relay_limits(limits.to_limits());
    }
    reach::api::raise_fd_limit();
    if let Some(limits) = &config.connection_limits {
        builder = builder.connection_limits(limits.to_limits());
    }
    if let Some(limits) = &config.topic_limits {
        builder = builder.topic_limits(limits.to_limits());
    }
    if let Some(federation) = &config.topic_federation {
        builder = builder.topic_federation(federation.to_federation());
    }
    if let Some(limits) = &config.store_limits {
        builder = builder.store_limits(limits.to_limits());
    }
    // Before anything announces the node: a SIGTERM from then on must
    // stop it gracefully (the default action would kill it mid-write).
    let stop = stop_signal()?;
    let node = builder.spawn().await?;
    let api = reach::api::serve(node.clone(), &dir, api_listen).await?;
    println!("peer id     {}", node.peer_id());
    for a in node.local_addrs() {
        println!("listening   {a} (udp)");
    }
    println!(
        "control API http://{} (token in {})",
        api.addr(),
        dir.join(reach::api::TOKEN_FILE).display()
    );
    println!("data dir    {}", dir.display());

    {
        let node = node.clone();
        tokio::spawn(async move {
            node.joined().await;
            let r = node.routing_snapshot();
            println!(
                "dht         joined: {} contacts in the routing table",
                r.size
            );
        });
    }
    let printer = {
        let node = node.clone();
        let json = args.json;
        let recv_hub = api.recv_hub();
        tokio::spawn(async move {
            while let Some(event) = node.next_event().await {
                recv_hub.publish(&event);
                match event {
                    Event::Message { from, data } => {
                        if json {
                            println!("{}", message_json(&from, &data));
                        } else {
                            println!("message from {from}: {}", escape_text(&data));
                        }
                    }
                    Event::Durable(m) => {
                        if json {
                            println!("{}", durable_json(&m));
                        } else {
                            println!(
                                "durable message from {} #{}: {}",
                                m.from,
                                m.seq,
                                escape_text(&m.data)
                            );
                        }
                        // Printed and in the API's backlog: done with it.
                        if let Err(e) = node.durable_done(&m).await {
                            eprintln!(
                                "warning: could not mark durable message {} done: {e}",
                                m.seq
                            );
                        }
                    }
                    Event::Stream(s) => {
                        println!(
                            "stream from {} (closed: this node does not serve streams)",
                            s.peer
                        );
                    }
                    other => {
                        if let Some(line) = connection_line(&other, json) {
                            println!("{line}");
                        }
                    }
                }
            }
        })
    };
    stop.await?;
    eprintln!("shutting down");
    api.stop().await;
    node.shutdown().await;
    printer.abort();
    Ok(())
}

/// A received message as printable text on one line: invalid UTF-8 becomes
/// U+FFFD, and every character that could forge a line or drive the
/// terminal (C0 and C1 controls including newline and ESC, DEL, and the
/// Unicode bidi overrides that reorder what is shown) is written as a Rust
/// escape (`\n`, `\u{1b}`, …). A backslash is doubled, so the escaping
/// cannot be imitated by the sender.
pub(crate) fn escape_text(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || is_bidi_control(c) || matches!(c, '\u{2028}' | '\u{2029}') => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// Unicode's explicit bidirectional formatting characters: they make a
/// terminal show text in another order than it was sent.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A received message as one line of JSON: `{"peer", "len", "text"}` when it
/// is UTF-8, else `{"peer", "len", "hex"}` with the bytes in lowercase hex.
/// JSON itself escapes only C0 controls; DEL, C1 controls (some terminals
/// act on them), the Unicode line/paragraph separators and bidi overrides
/// are written as `\uXXXX` escapes too, so the line is safe on a terminal.
/// A connection event as one line: `connected <peer> (<path>, <direction>)`,
/// `disconnected <peer>`, `path <peer> now <path>`; with `json`, an object
/// with an `event` field. Peer ids and paths are plain ASCII: nothing to
/// escape.
fn connection_line(event: &Event, json: bool) -> Option<String> {
    let dir = |d: &reach::Direction| match d {
        reach::Direction::Inbound => "inbound",
        reach::Direction::Outbound => "outbound",
    };
    Some(match (event, json) {
        (Event::Connected { peer, path, direction }, false) => {
            format!("connected {peer} ({path}, {})", dir(direction))
        }
        (Event::Connected { peer, path, direction }, true) => serde_json::json!({
            "event": "connected", "peer": peer.to_string(), "path": path, "direction": dir(direction)
        })
        .to_string(),
        (Event::Disconnected { peer }, false) => format!("disconnected {peer}"),
        (Event::Disconnected { peer }, true) => {
            serde_json::json!({ "event": "disconnected", "peer": peer.to_string() }).to_string()
        }
        (Event::PathChanged { peer, path }, false) => format!("path {peer} now {path}"),
        (Event::PathChanged { peer, path }, true) => serde_json::json!({
            "event": "path_changed", "peer": peer.to_string(), "path": path
        })
        .to_string(),
        _ => return None,
    })
}

fn message_json(from: &reach::PeerId, data: &[u8]) -> String {
    json_line(message_value("message", from, data))
}

/// A durable message as one JSON line: a message with its `seq`.
fn durable_json(m: &reach::DurableMessage) -> String {
    let mut v = message_value("durable_message", &m.from, &m.data);
    v["seq"] = m.seq.into();
    json_line(v)
}

fn message_value(event: &str, from: &reach::PeerId, data: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(data) {
        Ok(text) => {
            serde_json::json!({ "event": event, "peer": from.to_string(), "len": data.len(), "text": text })
        }
        Err(_) => {
            let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
            serde_json::json!({ "event": event, "peer": from.to_string(), "len": data.len(), "hex": hex })
        }
    }
}

/// `value` on one line, every control or bidi character escaped.
fn json_line(value: serde_json::Value) -> String {
    let mut out = String::new();
    for c in value.to_string().chars() {
        if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') || is_bidi_control(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Waits for Ctrl-C (SIGINT) or SIGTERM, so `kill` and service managers stop
/// the node as cleanly as Ctrl-C does.
/// Installs the SIGTERM handler now and returns what waits for Ctrl-C or
/// SIGTERM.
fn stop_signal() -> Result<impl std::future::Future<Output = Result<()>>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        Ok(())
    })
}

async fn wait_for_stop_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn print_nat(r: &serde_json::Value) {
    let s = |k: &str| {
        r.get(k)
            .map(|v| v.to_string().trim_matches('"').to_string())
            .unwrap_or_default()
    };
    println!("local        {}", s("local"));
    if let Some(ext) = r.get("external").and_then(|e| e.as_array()) {
        for e in ext {
            println!(
                "external     {} (reported by {} peers{})",
                e["addr"].as_str().unwrap_or("?"),
                e["reporters"],
                if e["confirmed"] == true {
                    ", confirmed"
                } else {
                    ""
                }
            );
        }
    }
    println!("mapping      {}", s("mapping"));
    println!("filtering    {}", s("filtering"));
    println!("translated   {}", s("translated"));
    println!("port kept    {}", s("port_preserving"));
    println!("hairpin      {}", s("hairpin"));
    print_port_mapping(&r["port_mapping"]);
    if !r["note"].is_null() {
        println!("note         {}", s("note"));
    }
}

/// `reach nat`'s port-mapping lines: protocol, external address, lease
/// and renewals, or why there is no mapping.
fn print_port_mapping(p: &serde_json::Value) {
    let s = |k: &str| p[k].as_str().unwrap_or("-").to_string();
    if p.is_null() {
        println!("port mapping unknown");
        return;
    }
    println!(
        "port mapping {} via {} (gateway {})",
        s("state"),
        s("protocol"),
        s("gateway")
    );
    if !p["external"].is_null() {
        println!(
            "  external   {} (lease {} s, {} renewals, published: {})",
            s("external"),
            p["lease_secs"],
            p["renewals"],
            s("published")
        );
    }
    if !p["error"].is_null() {
        println!("  why        {}", s("error"));
    }
}

/// `reach lab nat`: the NAT classification over every lab kind.
fn parse_kinds(
    kinds: Vec<String>,
    default: &[reach_lab::nat::NatKind],
) -> Result<Vec<reach_lab::nat::NatKind>> {
    use reach_lab::nat::{MATRIX_KINDS, NatKind};
    Ok(if kinds.is_empty() {
        default.to_vec()
    } else {
        kinds
            .iter()
            .map(|k| {
                NatKind::parse(k).with_context(|| {
                    let names: Vec<&str> = MATRIX_KINDS.iter().map(|k| k.name()).collect();
                    format!("unknown NAT kind {k:?}; one of: {}", names.join(", "))
                })
            })
            .collect::<Result<Vec<_>>>()?
    })
}

/// `reach lab portmap`: port mapping against real miniupnpd.
async fn lab_rooms(messages: u32, json: bool) -> Result<()> {
    let opts = reach_lab::rooms::RoomsOptions {
        messages,
        ..Default::default()
    };
    let r = tokio::select! {
        r = reach_lab::rooms::run(&opts) => r?,
        _ = wait_for_stop_signal() => anyhow::bail!("interrupted; the lab was torn down"),
    };
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let f = &r.failover;
        println!(
            "homes {} (links: {}/{} configured up, {} discovered); members {}; presence {} ms",
            r.home_count,
            r.links.configured_up,
            r.links.configured_expected,
            r.links.discovered,
            r.members.len(),
            r.presence_converge_ms
                .map_or("-".to_string(), |v| v.to_string())
        );
        for (name, p) in [("steady", &r.steady), ("failover", &f.phase)] {
            println!(
                "{name}: published {} errors {:?}, delivered {}/{}, duplicates {}, out of order {}, all in {} ms",
                p.published,
                p.publish_errors,
                p.delivered,
                p.expected,
                p.duplicates,
                p.order_violations,
                p.all_delivered_ms
                    .map_or("-".to_string(), |v| v.to_string())
            );
        }
        println!(
            "killed relay {}: re-homed {:?} ms; dead home gone from every view after {} ms",
            f.killed_relay.map_or("-".to_string(), |p| p.to_string()),
            f.rehome_ms.values().collect::<Vec<_>>(),
            f.stale_drop_ms_max
                .map_or("-".to_string(), |v| v.to_string())
        );
    }
    anyhow::ensure!(r.passed, "failed checks: {}", r.failed.join("; "));
    Ok(())
}

async fn lab_portmap(kinds: Vec<String>, lease_secs: u64, json: bool) -> Result<()> {
    use reach_lab::portmap::{PortmapOptions, run};
    let opts = PortmapOptions {
        kinds: parse_kinds(kinds, &reach_lab::nat::PORTMAP_KINDS)?,
        lease: std::time::Duration::from_secs(lease_secs.max(2)),
    };
    let report = tokio::select! {
        r = run(&opts) => r?,
        _ = wait_for_stop_signal() => anyhow::bail!("interrupted; the lab was torn down"),
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{:<7} {:<7} {:>9} {:>8} {:>9} {:>7} {:>10} {:>9} {:>5} {:>4}",
            "kind",
            "proto",
            "mapped ms",
            "verified",
            "reachable",
            "renewed",
            "restart ms",
            "flush ms",
            "left",
            "met"
        );
        let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        for r in &report.results {
            println!(
                "{:<7} {:<7} {:>9} {:>8} {:>9} {:>7} {:>10} {:>9} {:>5} {:>4}",
                r.kind.name(),
                r.protocol
                    .map_or("-".to_string(), |p| format!("{p:?}").to_lowercase()),
                ms(r.mapped_ms),
                r.verified,
                r.reachable_from_outside,
                r.renewed,
                ms(r.remap_after_restart_ms),
                ms(r.remap_after_flush_ms),
                r.left_after_shutdown
                    .map_or("-".to_string(), |v| v.to_string()),
                r.targets_met
            );
            if let Some(e) = &r.error {
                println!("  {}: {e}", r.kind.name());
            }
        }
        for l in &report.lying_routers {
            println!(
                "{:<7} router lying about its address ({}): check failed {} times, published: {}, caught: {}",
                l.kind.name(),
                l.claimed.map_or("-".to_string(), |c| c.to_string()),
                l.verify_failures,
                l.announced || l.in_record,
                l.caught()
            );
        }
        if let Some(e) = &report.lying_error {
            println!("lying router: {e}");
        }
        if let Some(p) = &report.ipv6 {
            println!(
                "ipv6    PCP pinhole {} after {} ms: verified {}, left after shutdown {}",
                p.external.map_or("-".to_string(), |a| a.to_string()),
                p.mapped_ms.map_or("-".to_string(), |v| v.to_string()),
                p.verified,
                p.left_after_shutdown
                    .map_or("-".to_string(), |v| v.to_string())
            );
        }
        if let Some(e) = &report.ipv6_error {
            println!("ipv6: {e}");
        }
        println!("lease {} s, {} ms", report.lease_secs, report.wall_ms);
    }
    if !report.all_met {
        anyhow::bail!("port mapping missed a target (see above)");
    }
    Ok(())
}

async fn lab_matrix(
    kinds: Vec<String>,
    runs: u32,
    delay_ms: u32,
    json: bool,
    markdown: bool,
) -> Result<()> {
    use reach_lab::pairs::{PairMatrixOptions, run};
    let opts = PairMatrixOptions {
        kinds: parse_kinds(kinds, &reach_lab::nat::MATRIX_KINDS)?,
        runs,
        delay_ms,
    };
    let report = tokio::select! {
        r = run(&opts) => r?,
        _ = wait_for_stop_signal() => anyhow::bail!("interrupted; the lab was torn down"),
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else if markdown {
        print!("{}", report.punch_markdown());
        eprintln!(
            "{} runs per pair, {} ms",
            report.runs_per_pair, report.wall_ms
        );
        for p in report.pairs.iter().filter(|p| p.failed > 0) {
            eprintln!(
                "{} x {}: {}/{} connected; first failure: {}",
                p.a.name(),
                p.b.name(),
                p.connected,
                p.runs,
                p.error.as_deref().unwrap_or("?")
            );
        }
    } else {
        println!(
            "{:<11} {:<11} {:>4} {:>9} {:>6} {:>7} {:>8} {:>6} {:<17} {:>10} {:>10}",
            "a",
            "b",
            "runs",
            "connected",
            "direct",
            "relayed",
            "upgraded",
            "direct%",
            "strategy",
            "connect ms",
            "punch ms"
        );
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
        for p in &report.pairs {
            println!(
                "{:<11} {:<11} {:>4} {:>9} {:>6} {:>7} {:>8} {:>6.0}% {:<17} {:>10} {:>10}",
                p.a.name(),
                p.b.name(),
                p.runs,
                p.connected,
                p.direct,
                p.relayed,
                p.upgraded,
                p.direct_rate * 100.0,
                p.strategy,
                ms(p.connect_ms_p50),
                ms(p.time_to_direct_ms_p50),
            );
            if let Some(e) = &p.error {
                println!("            first failure: {e}");
            }
            if let Some(e) = &p.punch_error {
                println!("            first failed punch: {e}");
            }
        }
        println!(
            "all connected: {} ({} ms)",
            report.all_connected, report.wall_ms
        );
    }
    anyhow::ensure!(
        report.all_connected,
        "some pairs did not connect in every run"
    );
    Ok(())
}

async fn lab_nat(kinds: Vec<String>, delay_ms: u32, json: bool) -> Result<()> {
    use reach_lab::matrix::{NatMatrixOptions, run};
    let opts = NatMatrixOptions {
        kinds: parse_kinds(kinds, &reach_lab::nat::ALL_KINDS)?,
        delay_ms,
    };
    // Ctrl-C drops the run, and with it the lab, which tears itself down.
    let report = tokio::select! {
        r = run(&opts) => r?,
        _ = wait_for_stop_signal() => anyhow::bail!("interrupted; the lab was torn down"),
    };
    if json {
        let compact: Vec<serde_json::Value> = report
            .kinds
            .iter()
            .map(|k| {
                serde_json::json!({
                    "kind": k.kind,
                    "expected": { "mapping": k.expected_mapping, "filtering": k.expected_filtering },
                    "measured": { "mapping": k.measured_mapping, "filtering": k.measured_filtering },
                    "match": k.matches,
                    "translated": k.translated,
                    "port_preserving": k.port_preserving,
                    "hairpin": k.hairpin,
                    "external": k.external,
                    "coturn_external": k.coturn_external,
                    "coturn_agrees": k.coturn_agrees,
                    "stunclient_interop": k.stunclient_interop,
                    "external_published": k.external_published,
                    "join": k.join,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "kinds": compact, "all_match": report.all_match, "wall_ms": report.wall_ms })
        );
    } else {
        println!(
            "{:<10} {:<42} {:<42} {:<6} coturn",
            "kind", "expected (mapping/filtering)", "measured", "match"
        );
        for k in &report.kinds {
            let fmt = |m: &dyn std::fmt::Debug, f: &dyn std::fmt::Debug| format!("{m:?}/{f:?}");
            println!(
                "{:<10} {:<42} {:<42} {:<6} {}",
                k.kind.name(),
                fmt(&k.expected_mapping, &k.expected_filtering),
                fmt(&k.measured_mapping, &k.measured_filtering),
                if k.matches { "yes" } else { "NO" },
                if k.coturn_agrees { "agrees" } else { "DIFFERS" }
            );
        }
        println!("all match: {} ({} ms)", report.all_match, report.wall_ms);
    }
    anyhow::ensure!(
        report.all_match,
        "some NAT kinds were not classified as configured"
    );
    Ok(())
}

/// The hole-punching lines of `reach status`: techniques tried, with
/// successes of attempts, and the latest outcome per peer.
fn print_punch(p: &reach::punch::PunchStats) {
    let tried: Vec<String> = p
        .techniques
        .iter()
        .filter(|t| t.attempts > 0)
        .map(|t| format!("{} {}/{}", t.technique, t.successes, t.attempts))
        .collect();
    if tried.is_empty() {
        return;
    }
    let p50 = p
        .time_to_direct_ms_p50
        .map_or_else(String::new, |v| format!(", time to direct p50 {v:.0} ms"));
    println!(
        "punch     {}; {} fell back to relay{p50}",
        tried.join(", "),
        p.fallbacks
    );
    for o in p.recent.iter().take(MAX_STATUS_PUNCHES) {
        let how = match (&o.error_kind, o.direct) {
            (_, true) => format!("direct after {} ms", o.time_to_direct_ms.unwrap_or(0)),
            (None, false) => "relayed".to_string(),
            (Some(kind), false) => format!("relayed ({kind})"),
        };
        println!("  {}  {}  {how}", o.peer, o.technique);
    }
}

/// Latest punch outcomes `reach status` lists.
const MAX_STATUS_PUNCHES: usize = 5;

fn print_status(s: &Status) {
    println!("peer id   {}", s.peer_id);
    for a in &s.local_addrs {
        println!("address   {a}");
    }
    for e in &s.external {
        println!(
            "external  {} (seen by {} peer IPs{})",
            e.addr,
            e.reporters,
            if e.confirmed { ", confirmed" } else { "" }
        );
    }
    if s.connected_peers.is_empty() {
        println!("peers     none connected");
    } else {
        println!("peers     {} connected", s.connected_peers.len());
        for p in &s.connected_peers {
            let via = match (p.relay, p.standby_relay) {
                (Some(r), _) => format!("  via relay {r}"),
                (None, Some(r)) => format!("  direct (punched; relay {r} on standby)"),
                (None, None) => String::new(),
            };
            let kx = p.kx_group.as_deref().unwrap_or("unknown");
            println!(
                "  {}  {}  rtt {} ms  {}  {kx}{via}",
                p.peer, p.addr, p.rtt_ms, p.direction
            );
        }
    }
    if let Some(b) = &s.build {
        crate::daemon::print_build(b);
    }
    let st = &s.stats;
    println!(
        "handshake pq {}; by group: X25519MLKEM768 {}, X25519 {}, other {}",
        if s.post_quantum.is_empty() {
            "unknown"
        } else {
            &s.post_quantum
        },
        st.handshakes.hybrid,
        st.handshakes.x25519,
        st.handshakes.other
    );
    let r = &s.relay;
    let (state, at) = match r.reachability {
        reach::Reachability::Unknown => ("unknown", String::new()),
        reach::Reachability::Public(a) => ("public", format!(" at {a}")),
        reach::Reachability::Private => ("private", String::new()),
    };
    println!("reach     {state}{at}");
    if let Some(held) = r.held_relay {
        println!(
            "relay     holding {held} at {}",
            r.held_relay_addr
                .map_or_else(|| "?".to_string(), |a| a.to_string())
        );
    }
    if r.serving {
        println!(
            "relaying  for {} clients, {} circuits",
            r.reservations,
            r.circuits.len()
        );
    }
    print_punch(&s.punch);
    println!(
        "dht       {} contacts, {} records held, {} lookups",
        st.dht.routing_table_size, st.dht.records_stored, st.dht.lookups
    );
    println!(
        "messages  {} sent, {} received",
        st.core.messages_sent, st.core.messages_received
    );
    let t = &s.topics;
    if !t.subscribed.is_empty() || !t.served.is_empty() {
        println!(
            "topics    {} subscribed, {} served as a home, {} federation links",
            t.subscribed.len(),
            t.served.len(),
            t.links.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_messages_cannot_forge_lines_or_drive_the_terminal() {
        let sent = "hi\nmessage from someone: x\x1b[31m\r\u{7f}\u{9b}\u{202e}\\n";
        let shown = escape_text(sent.as_bytes());
        assert_eq!(
            shown,
            "hi\\nmessage from someone: x\\u{1b}[31m\\r\\u{7f}\\u{9b}\\u{202e}\\\\n"
        );
        assert!(!shown.chars().any(|c| c.is_control()));
        // Plain text, other scripts and emoji are shown as sent.
        assert_eq!(escape_text("héllo 世界 👋".as_bytes()), "héllo 世界 👋");
        // Invalid UTF-8 is replaced, never printed raw.
        assert_eq!(escape_text(b"a\xff\x1b"), "a\u{fffd}\\u{1b}");
    }

    #[test]
    fn json_messages_carry_text_or_hex() {
        let peer = reach::Keypair::generate().peer_id();
        let line = message_json(&peer, "a\nb\u{7f}\u{9b}[31m\u{2028}\u{202e}".as_bytes());
        assert!(!line.chars().any(|c| c.is_control()), "{line}");
        assert!(
            !line.contains('\u{2028}') && !line.contains('\u{202e}'),
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["text"], "a\nb\u{7f}\u{9b}[31m\u{2028}\u{202e}");
        let line = message_json(&peer, b"a\nb");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["text"], "a\nb");
        assert_eq!(v["len"], 3);
        assert_eq!(v["peer"], peer.to_string());
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&message_json(&peer, b"\xff\x00")).unwrap();
        assert_eq!(v["hex"], "ff00");
        assert!(v.get("text").is_none());
    }

    #[test]
    fn connection_events_print_as_one_line_or_one_tagged_object() {
        let peer = reach::Keypair::generate().peer_id();
        let relay = reach::Keypair::generate().peer_id();
        let connected = Event::Connected {
            peer,
            path: reach::PathKind::Relayed { relay },
            direction: reach::Direction::Outbound,
        };
        assert_eq!(
            connection_line(&connected, false).unwrap(),
            format!("connected {peer} (relayed via {relay}, outbound)")
        );
        let v: serde_json::Value =
            serde_json::from_str(&connection_line(&connected, true).unwrap()).unwrap();
        assert_eq!(v["event"], "connected");
        assert_eq!(v["path"]["kind"], "relayed");
        assert_eq!(v["path"]["relay"], relay.to_string());
        let changed = Event::PathChanged {
            peer,
            path: reach::PathKind::Direct,
        };
        assert_eq!(
            connection_line(&changed, false).unwrap(),
            format!("path {peer} now direct")
        );
        let gone = Event::Disconnected { peer };
        let v: serde_json::Value =
            serde_json::from_str(&connection_line(&gone, true).unwrap()).unwrap();
        assert_eq!(v["event"], "disconnected");
        assert_eq!(v["peer"], peer.to_string());
        let v: serde_json::Value = serde_json::from_str(&message_json(&peer, b"x")).unwrap();
        assert_eq!(v["event"], "message");
    }
}
