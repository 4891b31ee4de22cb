//! Topics on real nodes over loopback: homes (public nodes and relays),
//! members behind relays, federation links found through the DHT,
//! re-homing when a relay dies, rate limits.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{loopback, node_holding_a_relay, relay_node, until, within};
use reach::{Node, PeerId, RelayMode, Subscription, TopicEvent};

const TOPIC: &str = "lobby";

/// A public node, its own home, in the DHT through `via`.
async fn public_home(via: &Node) -> Node {
    common::topic_home(via, reach::Keypair::generate(), Default::default()).await
}

fn held(n: &Node) -> Option<PeerId> {
    n.relay_status().held_relay
}

fn member_ids(n: &Node) -> BTreeSet<PeerId> {
    n.members(TOPIC)
        .unwrap()
        .into_iter()
        .map(|(m, _)| m)
        .collect()
}

/// Reads `sub` until it holds messages `first..=want` of each publisher in
/// `from`, checking each publisher's ids run on by one with the data it
/// sent (nothing twice, nothing skipped, nothing out of order).
async fn collect_from(sub: &mut Subscription, from: &[(PeerId, &str)], first: u64, want: u64) {
    collect_on(TOPIC, sub, from, first, want).await
}

/// [`collect_from`] on the topic `topic`.
async fn collect_on(
    topic: &str,
    sub: &mut Subscription,
    from: &[(PeerId, &str)],
    first: u64,
    want: u64,
) {
    let mut next: BTreeMap<PeerId, u64> = from.iter().map(|(p, _)| (*p, first)).collect();
    let tags: BTreeMap<PeerId, &str> = from.iter().copied().collect();
    within("every message arrives", async {
        while next.values().any(|n| *n <= want) {
            match sub.next().await.expect("the node runs") {
                TopicEvent::Message(m) => {
                    let Some(n) = next.get_mut(&m.from) else {
                        continue;
                    };
                    assert_eq!(m.id, *n, "in order, once, per publisher");
                    assert_eq!(m.topic, topic);
                    assert_eq!(
                        &m.data[..],
                        format!("{}-{}", tags[&m.from], m.id).as_bytes()
                    );
                    *n += 1;
                }
                TopicEvent::Missed { count } => panic!("missed {count} events"),
                _ => {}
            }
        }
    })
    .await;
}

async fn collect(sub: &mut Subscription, from: &[(PeerId, &str)], want: u64) {
    collect_from(sub, from, 1, want).await
}

async fn publish_n(n: &Node, tag: &str, count: u64) {
    publish_on(TOPIC, n, tag, count).await
}

async fn publish_on(topic: &str, n: &Node, tag: &str, count: u64) {
    for i in 1..=count {
        let r = n
            .publish(topic, format!("{tag}-{i}").into_bytes())
            .await
            .unwrap_or_else(|e| panic!("{tag} publishes {i}: {e} ({})", e.kind()));
        assert_eq!(r.id, i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_homes_deliver_every_message_once_in_order_with_presence() {
    common::logs();
    let h1 = relay_node().await;
    let h2 = relay_node().await;
    h2.bootstrap(&[h1.local_addr()]).await;
    let m1 = node_holding_a_relay(&h1).await;
    within("m1 joins", m1.joined()).await;
    until("m1 holds a relay", || held(&m1).is_some()).await;

    let mut s_h1 = h1.subscribe_topic(TOPIC).unwrap();
    let mut s_h2 = h2.subscribe_topic(TOPIC).unwrap();
    let mut s_m1 = m1.subscribe_topic(TOPIC).unwrap();
    until("the homes link up", || {
        h1.topics_status().links.contains(&h2.peer_id())
            && h2.topics_status().links.contains(&h1.peer_id())
    })
    .await;
    let three: BTreeSet<PeerId> = [&h1, &h2, &m1].iter().map(|n| n.peer_id()).collect();
    until("presence converges", || {
        [&h1, &h2, &m1].iter().all(|n| member_ids(n) == three)
    })
    .await;

    // A join once the homes are linked: visible everywhere within 2 s.
    let m2 = node_holding_a_relay(&h2).await;
    within("m2 joins", m2.joined()).await;
    until("m2 holds a relay", || held(&m2).is_some()).await;
    let joined_at = Instant::now();
    let mut s_m2 = m2.subscribe_topic(TOPIC).unwrap();
    until("m2 is seen everywhere", || {
        [&h1, &h2, &m1, &m2]
            .iter()
            .all(|n| member_ids(n).contains(&m2.peer_id()))
    })
    .await;
    let took = joined_at.elapsed();
    eprintln!("a join was seen at every node after {took:?}");
    assert!(took <= Duration::from_secs(2), "presence took {took:?}");

    // Everyone publishes; everyone gets everything once, in order.
    const N: u64 = 40;
    let nodes = [(&h1, "h1"), (&h2, "h2"), (&m1, "m1"), (&m2, "m2")];
    let from: Vec<(PeerId, &str)> = nodes.iter().map(|(n, t)| (n.peer_id(), *t)).collect();
    within(
        "everyone publishes",
        futures::future::join_all(nodes.iter().map(|(n, t)| publish_n(n, t, N))),
    )
    .await;
    for sub in [&mut s_h1, &mut s_h2, &mut s_m1, &mut s_m2] {
        collect(sub, &from, N).await;
    }
    let r = m1.publish(TOPIC, b"report".to_vec()).await.unwrap();
    assert_eq!((r.homes, r.members), (2, 4), "{r:?}");
    assert!(h1.stats().topics.federation_links >= 1);
    assert!(m1.stats().topics.delivered >= 4 * N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_a_relay_publishes_and_receives_through_it() {
    common::logs();
    let relay = relay_node().await;
    let other = public_home(&relay).await;
    let m = node_holding_a_relay(&relay).await;
    within("m joins", m.joined()).await;
    until("m holds the relay", || held(&m) == Some(relay.peer_id())).await;

    let mut s_m = m.subscribe_topic(TOPIC).unwrap();
    let mut s_o = other.subscribe_topic(TOPIC).unwrap();
    let both: BTreeSet<PeerId> = [m.peer_id(), other.peer_id()].into();
    until("presence converges", || {
        member_ids(&m) == both && member_ids(&other) == both
    })
    .await;
    let st = m.topics_status();
    assert_eq!(st.home, Some(relay.peer_id()));
    assert_eq!(st.subscribed[0].home, Some(relay.peer_id()));
    assert!(
        relay
            .topics_status()
            .served
            .iter()
            .any(|s| s.topic == TOPIC),
        "the relay serves the topic for its client"
    );

    publish_n(&m, "m", 10).await;
    publish_n(&other, "o", 10).await;
    let from = [(m.peer_id(), "m"), (other.peer_id(), "o")];
    collect(&mut s_o, &from, 10).await;
    collect(&mut s_m, &from, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_relay_dies_rehomes_and_the_dead_home_drops_out() {
    common::logs();
    let r1 = relay_node().await;
    let r2 = relay_node().await;
    r2.bootstrap(&[r1.local_addr()]).await;
    let o = public_home(&r2).await;
    let m = Node::builder()
        .bind(loopback())
        .bootstrap([r1.local_addr(), r2.local_addr()])
        .relay_service(RelayMode::Off)
        .acquire_relay(RelayMode::On)
        .spawn()
        .await
        .unwrap();
    within("m joins", m.joined()).await;
    until("m holds a relay", || held(&m).is_some()).await;
    let (old, other) = if held(&m) == Some(r1.peer_id()) {
        (r1, r2)
    } else {
        (r2, r1)
    };

    // The old relay is a member itself (its own home), so it has a member
    // that goes down with it.
    let _s_old = old.subscribe_topic(TOPIC).unwrap();
    let mut s_m = m.subscribe_topic(TOPIC).unwrap();
    let mut s_o = o.subscribe_topic(TOPIC).unwrap();
    let three: BTreeSet<PeerId> = [old.peer_id(), m.peer_id(), o.peer_id()].into();
    until("presence converges", || {
        member_ids(&o) == three && member_ids(&m) == three
    })
    .await;
    publish_n(&o, "o", 5).await;
    publish_n(&m, "m", 5).await;
    let from = [(o.peer_id(), "o"), (m.peer_id(), "m")];
    collect(&mut s_m, &from, 5).await;

    let killed_at = Instant::now();
    old.shutdown().await;
    until("m re-homes on the other relay", || {
        m.topics_status()
            .subscribed
            .first()
            .is_some_and(|s| s.home == Some(other.peer_id()))
    })
    .await;
    eprintln!("re-homed {:?} after the relay stopped", killed_at.elapsed());
    // Published after the move: m gets all of it, and o gets m's, each
    // once and in order (the per-origin marks carry across homes).
    for i in 6..=15 {
        o.publish(TOPIC, format!("o-{i}").into_bytes())
            .await
            .unwrap();
        m.publish(TOPIC, format!("m-{i}").into_bytes())
            .await
            .unwrap();
    }
    collect_from(&mut s_m, &from, 6, 15).await;
    collect(&mut s_o, &from, 15).await;
    until("the dead home's members drop out of o's presence", || {
        o.members(TOPIC)
            .unwrap()
            .iter()
            .all(|(member, home)| *member != old.peer_id() && *home != old.peer_id())
    })
    .await;
    let gone = killed_at.elapsed();
    eprintln!("the dead home's members left o's view after {gone:?}");
    assert!(
        gone <= reach_proto::topics::HOME_STALE + Duration::from_secs(3),
        "the dead home's members left o's view after {gone:?}"
    );
    assert!(member_ids(&o).contains(&m.peer_id()));
    assert!(m.stats().topics.rehomed >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_over_the_rate_limit_is_refused_with_a_typed_error() {
    common::logs();
    let relay = relay_node().await;
    let m = node_holding_a_relay(&relay).await;
    within("m joins", m.joined()).await;
    until("m holds the relay", || held(&m) == Some(relay.peer_id())).await;
    let mut sub = m.subscribe_topic(TOPIC).unwrap();
    until("m is served by its relay", || {
        m.topics_status()
            .subscribed
            .first()
            .is_some_and(|s| s.home == Some(relay.peer_id()))
    })
    .await;

    // Far more than one second's allowance of one publisher, as fast as
    // the home answers.
    let mut taken = 0u64;
    let mut refused = None;
    for i in 0..(3 * reach_proto::topics::DEFAULT_PUBLISHER_RATE) {
        match m
            .publish(TOPIC, format!("m-{}", taken + 1).into_bytes())
            .await
        {
            Ok(r) => {
                taken += 1;
                assert_eq!(r.id, taken, "publish {i}");
            }
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("a publish over the limit is refused");
    assert_eq!(e.kind(), "publisher_rate_limited", "{e}");
    assert!(matches!(
        e,
        reach::Error::Topic(reach::TopicRefusal::PublisherRateLimited)
    ));
    assert!(m.stats().topics.refused_rate >= 1);
    // The home that refused it counts it too.
    assert!(relay.stats().topics.refused_rate >= 1);
    assert!(
        taken >= reach_proto::topics::DEFAULT_PUBLISHER_RATE / 2,
        "taken {taken}"
    );
    // What was taken arrives with no gap left by the refusal.
    collect(&mut sub, &[(m.peer_id(), "m")], taken).await;
    // Data over the size limit: refused before anything is sent.
    let big = vec![0u8; reach_proto::topics::MAX_DATA_LEN + 1];
    let e = m.publish(TOPIC, big).await.unwrap_err();
    assert_eq!(e.kind(), "topic_message_too_big");
    // Not subscribed: a typed error, not a silent nothing.
    let e = m.publish("elsewhere", b"x".to_vec()).await.unwrap_err();
    assert_eq!(e.kind(), "topic_not_subscribed");
}

/// A private topic: never in the DHT, carried over the configured link to
/// the trusted home, and not to a home that links in without that trust
/// (it offers the topic and is ignored; it receives nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_topic_reaches_the_trusted_configured_home_and_no_other() {
    common::logs();
    const OPS: &str = "ops";
    let boot = relay_node().await;
    let (ka, kb) = (reach::Keypair::generate(), reach::Keypair::generate());
    let (pa, pb) = (ka.peer_id(), kb.peer_id());
    // A keeps a link to B; A and B trust each other with "ops".
    let private = |trusted: PeerId, peers: Vec<PeerId>| reach::TopicFederation {
        peers,
        trusted: vec![trusted],
        private_topics: vec![OPS.into()],
    };
    let a = common::topic_home(&boot, ka, private(pb, vec![pb])).await;
    let b = common::topic_home(&boot, kb, private(pa, vec![])).await;
    // C links to A by its own configuration; A does not trust it.
    let c = common::topic_home(
        &boot,
        reach::Keypair::generate(),
        reach::TopicFederation {
            peers: vec![pa],
            ..Default::default()
        },
    )
    .await;
    let mut s_a = a.subscribe_topic(OPS).unwrap();
    let mut s_b = b.subscribe_topic(OPS).unwrap();
    let mut s_c = c.subscribe_topic(OPS).unwrap();
    assert_eq!(a.topics_status().configured, vec![b.peer_id()]);
    until("A dials its configured home B, and C dials A", || {
        let links = a.topics_status().links;
        links.contains(&b.peer_id()) && links.contains(&c.peer_id())
    })
    .await;
    until("A ignored C's offer of the private topic", || {
        a.stats().topics.untrusted_joins >= 1
    })
    .await;
    until("A and B carry the topic to each other", || {
        a.topics_status()
            .served
            .iter()
            .any(|s| s.topic == OPS && s.links == 1)
            && b.topics_status()
                .served
                .iter()
                .any(|s| s.topic == OPS && s.links == 1)
    })
    .await;
    publish_on(OPS, &a, "a", 3).await;
    collect_on(OPS, &mut s_b, &[(a.peer_id(), "a")], 1, 3).await;
    collect_on(OPS, &mut s_a, &[(a.peer_id(), "a")], 1, 3).await;
    // B has all three; C, linked to A all along, has none of them.
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::ZERO, s_c.next()).await {
        assert!(
            !matches!(ev, TopicEvent::Message(_)),
            "an untrusted home got a private message: {ev:?}"
        );
    }
    assert!(
        c.topics_status().served.iter().all(|s| s.links == 0),
        "C carries the private topic with no one"
    );
    // C, for which the topic is not private, publishes its topic record;
    // A and B never do.
    let nodes = [&boot, &a, &b, &c];
    let publishers = || -> BTreeSet<PeerId> {
        nodes
            .iter()
            .flat_map(|n| n.stored_records(reach_proto::dht::record::RecordKind::Topic))
            .map(|r| r.publisher)
            .collect()
    };
    until("C's topic record is stored", || {
        publishers().contains(&c.peer_id())
    })
    .await;
    let found = publishers();
    assert!(
        !found.contains(&a.peer_id()) && !found.contains(&b.peer_id()),
        "a private topic's record in the DHT: {found:?}"
    );
}

#[tokio::test]
async fn a_bad_private_topic_name_is_a_config_error() {
    let err = Node::builder()
        .bind(loopback())
        .topic_federation(reach::TopicFederation {
            private_topics: vec![String::new()],
            ..Default::default()
        })
        .spawn()
        .await
        .expect_err("an empty topic name");
    assert_eq!(err.kind(), "config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_mid_window_leave_no_gap_and_no_duplicate() {
    common::logs();
    // A home whose publisher limit refuses most of a burst.
    let relay = Node::builder()
        .bind(loopback())
        .relay_service(RelayMode::On)
        .acquire_relay(RelayMode::Off)
        .topic_limits(reach::TopicLimits {
            topic_rate: 10_000,
            publisher_rate: 40,
            ..Default::default()
        })
        .spawn()
        .await
        .unwrap();
    let m = node_holding_a_relay(&relay).await;
    let s = node_holding_a_relay(&relay).await;
    for n in [&m, &s] {
        within("a member joins", n.joined()).await;
        until("it holds the relay", || held(n) == Some(relay.peer_id())).await;
    }
    let mut s_m = m.subscribe_topic(TOPIC).unwrap();
    let mut s_s = s.subscribe_topic(TOPIC).unwrap();
    let both: BTreeSet<PeerId> = [m.peer_id(), s.peer_id()].into();
    until("presence converges", || {
        member_ids(&m) == both && member_ids(&s) == both
    })
    .await;

    // Far more publishes at once than the limit lets through, so refusals
    // land with others in flight behind them.
    const CALLS: usize = 300;
    let results = within(
        "the burst is answered",
        futures::future::join_all(
            (0..CALLS).map(|i| m.publish(TOPIC, format!("call-{i}").into_bytes())),
        ),
    )
    .await;
    let mut taken: BTreeMap<u64, String> = BTreeMap::new();
    let mut refused = 0;
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(r) => assert!(
                taken.insert(r.id, format!("call-{i}")).is_none(),
                "id {} given twice",
                r.id
            ),
            Err(e) => {
                assert_eq!(e.kind(), "publisher_rate_limited", "{e}");
                refused += 1;
            }
        }
    }
    let k = taken.len() as u64;
    assert!(refused > 0 && k > 0, "taken {k}, refused {refused}");
    assert_eq!(
        taken.keys().copied().collect::<Vec<_>>(),
        (1..=k).collect::<Vec<_>>(),
        "the ids taken have no gap"
    );
    // Once the limit allows again, one more: it must come right after.
    let last = format!("last-{}", k + 1);
    let r = within("one more is taken", async {
        loop {
            match m.publish(TOPIC, last.clone().into_bytes()).await {
                Ok(r) => return r,
                Err(e) => {
                    assert_eq!(e.kind(), "publisher_rate_limited", "{e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await;
    assert_eq!(r.id, k + 1);
    taken.insert(k + 1, last);
    // Both subscribers (the publisher's own and the other member's) get
    // exactly what was taken, once, in order, with the data of the call
    // that was answered with that id: nothing refused, nothing twice.
    for sub in [&mut s_s, &mut s_m] {
        within("every taken message arrives", async {
            for (id, data) in &taken {
                let m = loop {
                    match sub.next().await.expect("the node runs") {
                        TopicEvent::Message(m) => break m,
                        TopicEvent::Missed { count } => panic!("missed {count} events"),
                        _ => {}
                    }
                };
                assert_eq!((m.id, &m.data[..]), (*id, data.as_bytes()));
            }
        })
        .await;
    }
}

/// A public node, its own home, whose federation links close after
/// `grace` without a shared topic; in the DHT through `via` (if any),
/// with `peers` as configured federation homes.
async fn home_with_grace(via: Option<&Node>, grace: Duration, peers: Vec<PeerId>) -> Node {
    let mut b = Node::builder()
        .bind(loopback())
        .relay_service(RelayMode::Off)
        .acquire_relay(RelayMode::Off)
        .topic_limits(reach::TopicLimits {
            link_idle_grace: grace,
            ..Default::default()
        })
        .topic_federation(reach::TopicFederation {
            peers,
            ..Default::default()
        });
    if let Some(via) = via {
        b = b.bootstrap([via.local_addr()]);
    }
    let n = b.spawn().await.unwrap();
    if via.is_some() {
        within("the home joins", n.joined()).await;
    }
    n
}

fn linked(a: &Node, b: &Node) -> bool {
    a.topics_status().links.contains(&b.peer_id()) && b.topics_status().links.contains(&a.peer_id())
}

fn unlinked(a: &Node, b: &Node) -> bool {
    !a.topics_status().links.contains(&b.peer_id())
        && !b.topics_status().links.contains(&a.peer_id())
}

/// Publishes `tag-1` on `topic` from `from` and waits for it at `sub`: the
/// link between the two homes carries the topic.
async fn carries(topic: &str, from: &Node, sub: &mut Subscription, tag: &str) {
    publish_on(topic, from, tag, 1).await;
    collect_on(topic, sub, &[(from.peer_id(), tag)], 1, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_shares_no_topic_closes_after_the_grace_and_a_new_topic_reopens_it() {
    common::logs();
    // Short, so the test does not wait the 30 s default.
    let grace = Duration::from_millis(500);
    let h1 = home_with_grace(None, grace, Vec::new()).await;
    let h2 = home_with_grace(Some(&h1), grace, Vec::new()).await;

    let s1 = h1.subscribe_topic("first").unwrap();
    let mut s2 = h2.subscribe_topic("first").unwrap();
    until("the homes link up (found through the DHT)", || {
        linked(&h1, &h2)
    })
    .await;
    carries("first", &h1, &mut s2, "h1").await;
    // A link carrying a topic stays, however long past the grace.
    tokio::time::sleep(grace * 4).await;
    assert!(linked(&h1, &h2), "a link carrying a topic is kept");
    let closed = |n: &Node| n.stats().topics.links_closed_idle;
    assert_eq!(closed(&h1) + closed(&h2), 0);

    // The members leave: the homes leave the topic on the link, which then
    // shares nothing and closes after the grace.
    let left_at = Instant::now();
    drop(s1);
    drop(s2);
    until("the idle link closes", || unlinked(&h1, &h2)).await;
    let took = left_at.elapsed();
    eprintln!("the idle link closed {took:?} after the members left");
    assert!(took >= grace, "closed before the grace: {took:?}");
    // Each side closes it at its own grace, unless the other's close
    // reached it first.
    let n_closed = closed(&h1) + closed(&h2);
    assert!((1..=2).contains(&n_closed), "closed {n_closed} times");
    for n in [&h1, &h2] {
        assert_eq!(n.stats().topics.federation_links, 0);
        assert!(n.topics_status().served.is_empty());
    }

    // A topic both serve again: they find each other and link again.
    let mut t1 = h1.subscribe_topic("second").unwrap();
    let _t2 = h2.subscribe_topic("second").unwrap();
    until("a new shared topic links the homes again", || {
        linked(&h1, &h2)
    })
    .await;
    publish_on("second", &h2, "h2", 1).await;
    collect_on("second", &mut t1, &[(h2.peer_id(), "h2")], 1, 1).await;
    assert_eq!(closed(&h1) + closed(&h2), n_closed, "the new link is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_to_a_configured_home_stays_when_no_topic_is_shared() {
    common::logs();
    let grace = Duration::from_millis(300);
    let k1 = reach::Keypair::generate();
    let k2 = reach::Keypair::generate();
    let (p1, p2) = (k1.peer_id(), k2.peer_id());
    let build = |key: reach::Keypair, peer: PeerId| {
        Node::builder()
            .keypair(key)
            .bind(loopback())
            .relay_service(RelayMode::Off)
            .acquire_relay(RelayMode::Off)
            .topic_limits(reach::TopicLimits {
                link_idle_grace: grace,
                ..Default::default()
            })
            .topic_federation(reach::TopicFederation {
                peers: vec![peer],
                ..Default::default()
            })
    };
    let h1 = build(k1, p2).spawn().await.unwrap();
    let h2 = build(k2, p1)
        .bootstrap([h1.local_addr()])
        .spawn()
        .await
        .unwrap();
    within("h2 joins", h2.joined()).await;
    let s1 = h1.subscribe_topic("ops").unwrap();
    let mut s2 = h2.subscribe_topic("ops").unwrap();
    until("the configured homes link up", || linked(&h1, &h2)).await;
    carries("ops", &h1, &mut s2, "h1").await;
    drop(s1);
    drop(s2);
    until("neither serves the topic", || {
        h1.topics_status().served.is_empty() && h2.topics_status().served.is_empty()
    })
    .await;
    // Many graces later the configured link is still there.
    tokio::time::sleep(grace * 5).await;
    assert!(linked(&h1, &h2), "a configured link is kept");
    assert_eq!(
        h1.stats().topics.links_closed_idle + h2.stats().topics.links_closed_idle,
        0
    );
}

#[tokio::test]
async fn a_zero_link_idle_grace_is_a_config_error() {
    let err = Node::builder()
        .bind(loopback())
        .topic_limits(reach::TopicLimits {
            link_idle_grace: Duration::ZERO,
            ..Default::default()
        })
        .spawn()
        .await
        .expect_err("a zero grace");
    assert_eq!(err.kind(), "config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_that_left_is_not_redialed_on_its_lingering_topic_record() {
    common::logs();
    let grace = Duration::from_millis(500);
    let h1 = home_with_grace(None, grace, Vec::new()).await;
    let h2 = home_with_grace(Some(&h1), grace, Vec::new()).await;
    let s1 = h1.subscribe_topic("first").unwrap();
    let s2 = h2.subscribe_topic("first").unwrap();
    until("the homes link up", || linked(&h1, &h2)).await;
    // h2 leaves; its topic record stays in the DHT for minutes.
    drop(s2);
    until("the idle link closes", || unlinked(&h1, &h2)).await;
    // h1 serves the topic anew (its lookups start over at once) and a new
    // home joins it: h1 finds the topic's homes again.
    let ups = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut events = h1.subscribe();
    let seen = ups.clone();
    tokio::spawn(async move {
        while let Some(ev) = events.next().await {
            if let reach::NodeEvent::TopicLinkUp { peer } = ev {
                seen.lock().unwrap().push(peer);
            }
        }
    });
    drop(s1);
    let mut s1 = h1.subscribe_topic("first").unwrap();
    let h3 = home_with_grace(Some(&h1), grace, Vec::new()).await;
    let _s3 = h3.subscribe_topic("first").unwrap();
    until("h1 links with the new home", || linked(&h1, &h3)).await;
    carries("first", &h3, &mut s1, "h3").await;
    // h1's lookups at 0, 1 and 2 s after it served the topic again found
    // h2's old record: not dialed (it would only close again).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ups = ups.lock().unwrap().clone();
    assert!(ups.contains(&h3.peer_id()), "{ups:?}");
    assert!(
        !ups.contains(&h2.peer_id()),
        "h2 was linked again on its stale record"
    );
}
