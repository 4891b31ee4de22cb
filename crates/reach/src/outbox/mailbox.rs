//! Sealed DHT mailboxes: durable messages for a recipient that stays
//! offline, stored in the DHT where it finds them when it comes back.
//!
//! **Sender.** A critical message still pending [`DEFAULT_MAILBOX_AFTER`]
//! (a [`NodeBuilder`](crate::NodeBuilder) knob) after it was enqueued,
//! whose recipient is not connected, is sealed for the recipient
//! ([`seal`]) and stored at the k nodes closest to its mailbox key in the
//! current epoch ([`reach_proto::mailbox::deposit_key`]). While it stays
//! pending it is deposited again when the epoch changes and every
//! [`REDEPOSIT_INTERVAL`] (so storers that left are replaced); the record is
//! the same each time, so a storer that holds it just confirms it. When
//! the recipient acks it (directly) or it is abandoned, the sender signs
//! deletion notices with the record's throwaway key and the storers drop
//! it. A message larger than
//! [`MAX_MAILBOX_MESSAGE`](reach_proto::mailbox::MAX_MAILBOX_MESSAGE) is not deposited: it
//! stays on the direct path only (counted in `outbox_mailbox_too_large`).
//!
//! **Recipient.** On joining the DHT and every [`FETCH_INTERVAL`] the node
//! reads every record of its mailbox in the current and the previous epoch
//! ([`reach_proto::mailbox::epochs_to_fetch`]), page by page from each
//! storer, opens and verifies each box, and takes each message through the
//! same path as a direct durable message: the outbox's received log (so a
//! message that also came, or comes later, directly is handed over once),
//! the durable inbox, [`Event::Durable`](crate::Event::Durable),
//! [`Node::durable_done`](crate::Node::durable_done). Then it acks: it
//! dials each sender (when reachable, the sender's outbox resends at once,
//! the receiver acks the duplicate, and the sender deletes the message and
//! says `OutboxDelivered`), and it always signs a deletion notice for each
//! record with the throwaway key from the box and sends it to the storers.
//! Boxes that do not open or verify are counted
//! (`outbox_mailbox_rejected`) and skipped.
//!
//! **The ack through the storers.** A sender that was away when the
//! recipient fetched learns of it at its next deposit of the message (at
//! once after a restart, else within [`REDEPOSIT_INTERVAL`]): the storers
//! refuse the deleted record and show the deletion notice, signed with the
//! record's throwaway key, which only the recipient (from inside the box)
//! and the sender hold. The sender checks it and takes it as the ack: the
//! message leaves the outbox with `OutboxDelivered`
//! (`outbox_mailbox_acked`).
//!
//! **Order.** One fetch hands each sender's messages over in seq order.
//! Across paths it cannot be strict: the receiver's log takes any seq in
//! its window (moderate messages are never deposited, so gaps in a
//! sender's seqs are normal and cannot be waited for), so a message that a
//! fetch missed (a storer without it) and that comes later, directly or at
//! the next fetch, is handed over after newer ones. It is still handed
//! over exactly once.

pub mod seal;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reach_proto::dht::Key;
use reach_proto::dht::record::{DeletionNotice, MAX_MAILBOX_TTL, RecordKind};
use reach_proto::mailbox::{epoch_of, epoch_start_ms, epochs_to_fetch};
use reach_proto::outbox::Delivery;
use reach_proto::{Keypair, PeerId};
use tokio::time::Instant;

use super::delivery::Durable;
use super::{MessageId, Receipt};
use crate::dht::{Dht, unix_ms};
use crate::node::bus::{NodeEvent, NodeEvents};
use crate::node::core::Core;
use crate::node::stats;
use crate::peers::Peers;

/// How long a critical message waits for its recipient before it is also
/// deposited in the recipient's mailbox (the default): long enough
/// that a peer that is merely reconnecting gets it directly, short enough
/// that a sender that goes away soon after still leaves it behind.
pub const DEFAULT_MAILBOX_AFTER: Duration = Duration::from_secs(30);

/// How often a pending message is deposited again within one epoch: a
/// storer that left the network takes its copy with it, and the k closest
/// nodes change under churn; hourly is the DHT's republish period.
pub const REDEPOSIT_INTERVAL: Duration = Duration::from_secs(3600);

/// How long a deposit that no storer accepted (no DHT nodes reachable, all
/// of them full) waits before it is tried again: each try is a lookup and
/// k stores, so not every round, yet soon enough that a network that comes
/// back gets the message well within the recipient's absence.
pub const DEPOSIT_RETRY: Duration = Duration::from_secs(30);

/// How often a node reads its mailbox after the read on joining: a sender
/// deposits only after its message waited [`DEFAULT_MAILBOX_AFTER`] for a
/// recipient that is not connected, so a connected recipient rarely has
/// mail, and one that was away reads on joining.
pub const FETCH_INTERVAL: Duration = Duration::from_secs(300);

/// Messages deposited in one round at most: each is a lookup and k
/// stores, so a large backlog goes out over several rounds instead of
/// thousands of streams at once.
pub const MAX_DEPOSITS_PER_ROUND: usize = 64;

/// The longest and shortest time between two deposit rounds; between
/// them, a quarter of the node's mailbox delay.
pub const MAX_DEPOSIT_CHECK: Duration = Duration::from_secs(5);
/// See [`MAX_DEPOSIT_CHECK`].
pub const MIN_DEPOSIT_CHECK: Duration = Duration::from_millis(100);

/// How long the recipient tries to reach a sender to ack it directly: a
/// dial to a sender that is gone gives up after this.
pub const DIRECT_ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Senders dialed for direct acks after one fetch at most (the deletion
/// notices at the storers ack the rest).
pub const MAX_DIRECT_ACKS: usize = 32;

/// One deposit of a message: where, and the key that signed it.
struct Deposit {
    key: Key,
    /// `None`: not deposited (too large, or no storer took it), only
    /// remembered.
    throwaway: Option<Keypair>,
    at: Instant,
    /// When, after `at`, it is due again.
    again: Duration,
}

/// The mailbox capability of a node (see the module docs).
pub(crate) struct Mailbox {
    core: Arc<Core>,
    peers: Arc<Peers>,
    dht: Arc<Dht>,
    durable: Arc<Durable>,
    after: Duration,
    /// What this run deposited for each pending message, by epoch (the
    /// current and the previous one: older records have expired).
    deposited: Mutex<HashMap<MessageId, BTreeMap<u64, Deposit>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Mailbox {
    pub(crate) fn new(
        core: Arc<Core>,
        peers: Arc<Peers>,
        dht: Arc<Dht>,
        durable: Arc<Durable>,
        after: Duration,
    ) -> Arc<Self> {
        Arc::new(Mailbox {
            core,
            peers,
            dht,
            durable,
            after,
            deposited: Mutex::default(),
        })
    }

    /// Starts the sender's and the recipient's loops (a node without a data
    /// dir has no outbox, so no mailbox either).
    pub(crate) fn start(self: &Arc<Self>) {
        if self.durable.handle().is_none() {
            return;
        }
        // Subscribed now: no ack is missed once deposits start.
        let events = self.core.bus.subscribe();
        let me = self.clone();
        self.core.spawn(async move { me.ack_loop(events).await });
        let me = self.clone();
        self.core.spawn(async move { me.deposit_loop().await });
        let me = self.clone();
        self.core.spawn(async move { me.fetch_loop().await });
    }

    async fn joined(&self) {
        let mut rx = self.dht.joined.subscribe();
        let _ = rx.wait_for(|j| *j).await;
    }

    // ---- sender ----

    async fn deposit_loop(self: Arc<Self>) {
        let check = (self.after / 4).clamp(MIN_DEPOSIT_CHECK, MAX_DEPOSIT_CHECK);
        self.joined().await;
        loop {
            if self.durable.handle().is_none() {
                return;
            }
            self.deposit_round().await;
            tokio::time::sleep(check).await;
        }
    }

    /// Deposits what is due now (see the module docs).
    async fn deposit_round(&self) {
        let Some(outbox) = self.durable.handle() else {
            return;
        };
        let now_ms = unix_ms();
        let epoch = epoch_of(now_ms);
        let pending = outbox.pending();
        let due: Vec<_> = {
            let mut dep = lock(&self.deposited);
            // Forget messages no longer pending, and epochs whose records
            // have expired.
            let live: BTreeSet<MessageId> = pending.iter().map(|p| p.id).collect();
            dep.retain(|id, _| live.contains(id));
            for d in dep.values_mut() {
                d.retain(|&e, _| e + 1 >= epoch);
            }
            pending
                .into_iter()
                .filter(|p| matches!(p.delivery, Delivery::Critical))
                .filter(|p| p.age >= self.after && self.peers.live(&p.peer).is_none())
                .filter(|p| {
                    dep.get(&p.id)
                        .and_then(|d| d.get(&epoch))
                        .is_none_or(|d| d.at.elapsed() >= d.again)
                })
                .take(MAX_DEPOSITS_PER_ROUND)
                .collect()
        };
        for p in due {
            let Ok(Some(msg)) = outbox.read(p.id).await else {
                continue;
            };
            // A record lives at most a week from its creation; created at
            // the message's enqueue time (or the epoch's start, when the
            // message is older than the epoch), the same on every deposit
            // in the epoch, so a re-deposit is the very same record.
            let created_ms = p.created_ms.max(epoch_start_ms(epoch));
            let key = reach_proto::mailbox::deposit_key(&p.peer, now_ms);
            let sealed = match seal::seal(
                &self.core.keypair,
                &p.peer,
                msg.seq,
                &msg.data,
                epoch,
                key,
                created_ms,
                MAX_MAILBOX_TTL,
            ) {
                Ok(s) => s,
                Err(e) => {
                    stats::bump(&self.durable.counters.mailbox_too_large);
                    tracing::debug!(id = %p.id, error = %e, "not deposited in a mailbox");
                    // Remember it, so it is not sealed again every round.
                    lock(&self.deposited).entry(p.id).or_default().insert(
                        epoch,
                        Deposit {
                            key,
                            throwaway: None,
                            at: Instant::now(),
                            again: REDEPOSIT_INTERVAL,
                        },
                    );
                    continue;
                }
            };
            let (stored, taken) = self.dht.put_mailbox(sealed.record).await;
            tracing::debug!(id = %p.id, peer = %p.peer, stored, taken, "mailbox deposit");
            if taken {
                // The recipient deleted this very record with the key from
                // inside the box, which it does only once the message is
                // durably its own: that is its ack.
                if let Ok(Some(id)) = outbox.ack_seq(p.peer, msg.seq).await {
                    stats::bump(&self.durable.counters.delivered);
                    stats::bump(&self.durable.counters.mailbox_acked);
                    self.core.bus.emit(NodeEvent::OutboxDelivered {
                        id: id.0,
                        peer: p.peer,
                    });
                }
                continue;
            }
            if stored > 0 {
                stats::bump(&self.durable.counters.mailbox_deposited);
            }
            let mut dep = lock(&self.deposited);
            let d = dep.entry(p.id).or_default();
            // A failed try keeps an earlier deposit's key for deletion.
            let earlier = d.remove(&epoch).and_then(|e| e.throwaway);
            d.insert(
                epoch,
                Deposit {
                    key,
                    throwaway: if stored > 0 {
                        Some(sealed.throwaway)
                    } else {
                        earlier
                    },
                    at: Instant::now(),
                    again: if stored > 0 {
                        REDEPOSIT_INTERVAL
                    } else {
                        DEPOSIT_RETRY
                    },
                },
            );
        }
    }

    /// Deletes a message's deposits once it is acked (or abandoned).
    async fn ack_loop(self: Arc<Self>, mut events: NodeEvents) {
        while let Some(ev) = events.next().await {
            let id = match ev {
                NodeEvent::OutboxDelivered { id, .. } | NodeEvent::OutboxAbandoned { id, .. } => {
                    MessageId(id)
                }
                _ => continue,
            };
            let Some(deps) = lock(&self.deposited).remove(&id) else {
                continue;
            };
            let me = self.clone();
            self.core.spawn(async move {
                for d in deps.into_values() {
                    let Some(throwaway) = d.throwaway else {
                        continue;
                    };
                    let notice = DeletionNotice::sign(
                        &throwaway,
                        RecordKind::Mailbox,
                        d.key,
                        seal::RECORD_SEQ,
                    );
                    let n = me.dht.delete(d.key, &[notice]).await;
                    stats::add(&me.durable.counters.mailbox_deleted, n);
                }
            });
        }
    }

    // ---- recipient ----

    async fn fetch_loop(self: Arc<Self>) {
        self.joined().await;
        loop {
            if self.durable.handle().is_none() {
                return;
            }
            self.fetch().await;
            tokio::time::sleep(FETCH_INTERVAL).await;
        }
    }

    /// Reads, opens, delivers and acks everything in our mailbox (see the
    /// module docs).
    pub(crate) async fn fetch(&self) {
        let Some(outbox) = self.durable.handle() else {
            return;
        };
        let me = &self.core.keypair;
        let mut senders = BTreeSet::new();
        for epoch in epochs_to_fetch(unix_ms()) {
            let key = Key::for_mailbox(&me.peer_id(), epoch);
            let (records, storers) = self.dht.get_all(RecordKind::Mailbox, key).await;
            stats::add(&self.durable.counters.mailbox_fetched, records.len());
            let mut opened: Vec<(reach_proto::dht::record::SignedRecord, _)> = Vec::new();
            for r in records {
                match seal::open(me, &r) {
                    Ok(c) => {
                        stats::bump(&self.durable.counters.mailbox_opened);
                        opened.push((r, c));
                    }
                    Err(e) => {
                        stats::bump(&self.durable.counters.mailbox_rejected);
                        tracing::debug!(reason = e.kind(), "mailbox record refused");
                    }
                }
            }
            // Each sender's messages in their order.
            opened.sort_by_key(|(_, c)| (c.sender, c.seq));
            let mut notices = Vec::new();
            for (r, c) in opened {
                match outbox.receive(c.sender, c.seq, c.data.clone()).await {
                    Ok(Receipt::New(inbox)) => {
                        stats::bump(&self.durable.counters.received);
                        self.durable.hand_over(inbox, c.sender, c.seq, c.data).await;
                    }
                    Ok(Receipt::Duplicate | Receipt::TooOld) => {
                        stats::bump(&self.durable.counters.duplicates);
                    }
                    Err(e) => {
                        // Not recorded (inbox full, disk): not acked, so it
                        // stays in the mailbox for the next fetch.
                        tracing::debug!(sender = %c.sender, seq = c.seq, error = %e, "mailbox message not taken");
                        continue;
                    }
                }
                senders.insert(c.sender);
                let throwaway = Keypair::from_secret_bytes(c.throwaway);
                notices.push(DeletionNotice::for_record(&throwaway, &r));
            }
            if !notices.is_empty() {
                let n = self.dht.delete_at(&storers, &notices).await;
                stats::add(&self.durable.counters.mailbox_deleted, n);
            }
        }
        for sender in senders.into_iter().take(MAX_DIRECT_ACKS) {
            self.ack_directly(sender);
        }
    }

    /// Dials `sender` if it is not connected: a sender that is online sees
    /// us come up, resends what it still holds for us, and our received log
    /// acks it as a duplicate, which deletes it from its outbox.
    fn ack_directly(&self, sender: PeerId) {
        if self.peers.live(&sender).is_some() {
            return;
        }
        let peers = self.peers.clone();
        self.core.spawn(async move {
            match tokio::time::timeout(DIRECT_ACK_TIMEOUT, peers.connection(sender)).await {
                Ok(Ok(_)) => tracing::debug!(%sender, "mailbox: sender reached for a direct ack"),
                _ => tracing::debug!(%sender, "mailbox: sender not reachable; the storers' deletion acks"),
            }
        });
    }
}
