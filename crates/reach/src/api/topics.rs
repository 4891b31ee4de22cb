//! Topics through the control API (`reach pub`, `reach sub`,
//! `reach members`):
//!
//! - `POST /v1/topics/publish` `{"topic","data_b64"}`: publishes (the node
//!   joins the topic for the moment of the publish if no subscription holds
//!   it) and answers the [`PublishReport`](crate::PublishReport), or a
//!   typed error (`topic_rate_limited`, `topic_no_home`, …).
//! - `GET /v1/topics/members?topic=T`: the members known, with their homes.
//! - `GET /v1/topics/sub?topic=T`: a server-sent-events stream of the
//!   topic's messages and presence changes, one JSON object per `data:`
//!   line; the subscription lasts as long as the stream. At most
//!   [`MAX_TOPIC_STREAMS`] at once (past it: 503 `busy`).
//!
//! Topic names in a query are percent-encoded.

use serde::{Deserialize, Serialize};

use crate::topics::TopicEvent;
use reach_proto::PeerId;

/// How long a publish waits for the node's home to take the topic when the
/// node was not subscribed: the member session's own answer timeout.
pub const PUBLISH_ATTACH_WAIT: std::time::Duration = crate::topics::HOME_TIMEOUT;

/// `GET /v1/topics/sub` streams open at once, all topics together: each
/// holds an API connection and a topic subscription for as long as it
/// lasts, so this keeps them from taking every connection of
/// [`super::MAX_API_CONNECTIONS`] (the same cap as `/v1/recv`'s streams).
pub const MAX_TOPIC_STREAMS: usize = 32;

/// Body of `POST /v1/topics/publish`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishRequest {
    pub topic: String,
    /// The message's bytes, standard base64.
    pub data_b64: String,
}

/// One member in a [`MembersResponse`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberEntry {
    pub member: PeerId,
    pub home: PeerId,
}

/// Answer of `GET /v1/topics/members`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MembersResponse {
    pub topic: String,
    pub members: Vec<MemberEntry>,
}

/// One event of the `/v1/topics/sub` stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TopicStreamEvent {
    /// A message: `id` is the publisher's sequence number on the topic.
    Message {
        topic: String,
        from: PeerId,
        id: u64,
        data_b64: String,
        len: usize,
    },
    Joined {
        member: PeerId,
        home: PeerId,
    },
    Left {
        member: PeerId,
        home: PeerId,
    },
    /// The stream fell behind and `count` events were dropped.
    Missed {
        count: u64,
    },
}

impl From<TopicEvent> for TopicStreamEvent {
    fn from(e: TopicEvent) -> Self {
        match e {
            TopicEvent::Message(m) => TopicStreamEvent::Message {
                topic: m.topic,
                from: m.from,
                id: m.id,
                len: m.data.len(),
                data_b64: super::recv::base64_encode(&m.data),
            },
            TopicEvent::Joined { member, home } => TopicStreamEvent::Joined { member, home },
            TopicEvent::Left { member, home } => TopicStreamEvent::Left { member, home },
            TopicEvent::Missed { count } => TopicStreamEvent::Missed { count },
        }
    }
}

/// Percent-encodes a topic name for a query.
pub fn encode_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes a percent-encoded query value (`+` is a space); `None` if it is
/// not valid percent-encoding of UTF-8.
pub fn decode_name(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Publishes through `node`, joining the topic for the moment if needed.
pub(crate) async fn publish(
    node: &crate::Node,
    topic: &str,
    data: Vec<u8>,
) -> crate::Result<crate::PublishReport> {
    use crate::Error;
    use crate::topics::TopicRefusal;
    let _held = node.subscribe_topic(topic)?;
    let deadline = tokio::time::Instant::now() + PUBLISH_ATTACH_WAIT;
    loop {
        match node.publish(topic, data.clone()).await {
            Err(Error::Topic(TopicRefusal::NoHome)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_survive_percent_encoding() {
        for name in ["lobby", "a room/with spaces", "été", "x%y+z"] {
            assert_eq!(decode_name(&encode_name(name)).as_deref(), Some(name));
        }
        assert_eq!(decode_name("a+b").as_deref(), Some("a b"));
        assert_eq!(decode_name("%zz"), None);
        assert_eq!(decode_name("%ff"), None);
    }
}
