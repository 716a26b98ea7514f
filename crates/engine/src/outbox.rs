//! Reliable messages between executors: what may be eventual (stock given
//! back by a cancelled order, a promotion's budget restored, a coupon
//! returned) goes as a message written in the same batch as the change
//! that causes it (the outbox is executor state, so it is in the log's
//! replay and in the checkpoint), delivered at least once, applied exactly
//! once by a receiver that remembers what it applied, and retried with
//! backoff until it is, or until [`MAX_ATTEMPTS`] refusals make it a dead
//! letter that an operator sees and replays (never dropped silently).
//!
//! - The sender numbers its messages (`id`, per executor) and keeps each
//!   until the receiver answers `Delivered` without an error (a logged
//!   peer input on both sides: a replay does the same). A message to
//!   itself is applied at once, in the same step.
//! - The receiver keeps, per sender, the ids it applied above the
//!   sender's `floor` (the lowest id the sender still keeps for it, sent
//!   with every delivery): a repeat is answered from there and applied
//!   nothing; a refusal changes nothing and is not remembered, so a retry
//!   applies again.
//! - Resends (on the tick) back off from [`REDELIVER_MIN_MS`] to
//!   [`REDELIVER_MAX_MS`]; what to resend when is not state, it is rebuilt
//!   after a restart (every kept message goes out again at once).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use peakstack_domain::wire::{CodecError, Reader, Writer};
use peakstack_domain::ErrorCode;

use crate::codec::Codec;
use crate::executor::{Effects, ExecutorCore};
use crate::parts::PartCommand;
use crate::protocol::{ExecutorId, PeerMsg};

/// Refusals after which a message is a dead letter.
pub const MAX_ATTEMPTS: u32 = 8;
pub const REDELIVER_MIN_MS: u64 = 250;
pub const REDELIVER_MAX_MS: u64 = 30_000;
/// Most messages one tick sends again.
const MAX_REDELIVERIES_PER_TICK: usize = 1024;

/// A message the sender keeps until it is applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Outgoing {
    pub dest: ExecutorId,
    pub command: PartCommand,
    pub created_ms: u64,
    /// Refusals so far, and the last one's code.
    pub attempts: u32,
    pub last_error: Option<ErrorCode>,
    /// No longer retried: an operator replays it (see [`ExecutorCore::replay_dead_letter`]).
    pub dead: bool,
}

/// One kept message, for operators (`GET /v1/dead-letters`).
#[derive(Clone, Debug, PartialEq)]
pub struct MessageView {
    pub executor: ExecutorId,
    pub id: u64,
    pub message: Outgoing,
}

/// The printable id of a message: `msg_<executor>_<id>`.
pub fn message_name(executor: ExecutorId, id: u64) -> String {
    format!("msg_{executor}_{id}")
}

/// The (executor, id) a printable message id names.
pub fn parse_message_name(text: &str) -> Option<(ExecutorId, u64)> {
    let rest = text.strip_prefix("msg_")?;
    let (executor, id) = rest.split_once('_')?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(executor) || !digits(id) {
        return None;
    }
    Some((executor.parse().ok()?, id.parse().ok()?))
}

#[derive(Default)]
pub(crate) struct Outbox {
    next: u64,
    pending: BTreeMap<u64, Outgoing>,
    /// (when, id, wait after that): resends; rebuilt after a restart.
    schedule: BinaryHeap<Reverse<(u64, u64, u64)>>,
}

/// What a receiver applied, per sender.
#[derive(Default, Clone, Debug, PartialEq)]
pub(crate) struct Inbox {
    by_sender: BTreeMap<ExecutorId, Received>,
}

#[derive(Default, Clone, Debug, PartialEq)]
struct Received {
    /// Every id below it is done: the sender keeps none of them.
    floor: u64,
    applied: BTreeSet<u64>,
}

impl Outbox {
    /// Messages kept (backlog, dead letters included) and dead letters.
    pub fn counts(&self) -> (usize, usize) {
        (self.pending.len(), self.pending.values().filter(|m| m.dead).count())
    }

    /// The lowest id kept for `dest` (or the next id): its receiver may
    /// forget every id below.
    fn floor(&self, dest: ExecutorId) -> u64 {
        self.pending.iter().find(|(_, m)| m.dest == dest).map_or(self.next.max(1), |(id, _)| *id)
    }

    fn deliver(&self, id: u64) -> (ExecutorId, PeerMsg) {
        let message = &self.pending[&id];
        let floor = self.floor(message.dest);
        (message.dest, PeerMsg::Deliver { id, floor, command: message.command.clone() })
    }
}

impl ExecutorCore {
    /// Sends `command` to the executor of its data as a reliable message;
    /// to this one it is applied now (a refusal makes it a dead letter at
    /// once: a command refused here would be refused again).
    pub(crate) fn send_reliably(&mut self, command: PartCommand, now_ms: u64, fx: &mut Effects) {
        let dest = command.message_executor(&self.layout);
        let outbox = &mut self.outbox;
        outbox.next = outbox.next.max(1);
        let id = outbox.next;
        outbox.next += 1;
        if dest == self.id {
            let (_, reply) = self.parts.apply(&command, now_ms);
            if let Some(error) = reply.error() {
                tracing::error!(executor = self.id, ?command, %error, "a reliable message to itself was refused: a dead letter");
                let message =
                    Outgoing { dest, command, created_ms: now_ms, attempts: 1, last_error: Some(error), dead: true };
                self.outbox.pending.insert(id, message);
            }
            return;
        }
        let message = Outgoing { dest, command, created_ms: now_ms, attempts: 0, last_error: None, dead: false };
        self.outbox.pending.insert(id, message);
        fx.outbox.push(self.outbox.deliver(id));
        self.outbox.schedule.push(Reverse((now_ms + REDELIVER_MIN_MS, id, REDELIVER_MIN_MS)));
    }

    /// A delivery from `from`: applied once, answered always.
    pub(crate) fn on_deliver(
        &mut self,
        from: ExecutorId,
        id: u64,
        floor: u64,
        command: &PartCommand,
        now_ms: u64,
        fx: &mut Effects,
    ) {
        let received = self.inbox.by_sender.entry(from).or_default();
        if floor > received.floor {
            received.floor = floor;
            received.applied = received.applied.split_off(&floor);
        }
        let error = if id < received.floor || received.applied.contains(&id) {
            None
        } else {
            let (_, reply) = self.parts.apply(command, now_ms);
            let error = reply.error();
            if error.is_none() {
                self.inbox.by_sender.get_mut(&from).expect("entered above").applied.insert(id);
            }
            error
        };
        fx.outbox.push((from, PeerMsg::Delivered { id, error }));
    }

    /// The receiver's answer: done, or one more refusal.
    pub(crate) fn on_delivered(&mut self, id: u64, error: Option<ErrorCode>) {
        let Some(message) = self.outbox.pending.get_mut(&id) else { return };
        match error {
            None => {
                self.outbox.pending.remove(&id);
            }
            Some(code) if !message.dead => {
                message.attempts += 1;
                message.last_error = Some(code);
                if message.attempts >= MAX_ATTEMPTS {
                    message.dead = true;
                    tracing::error!(executor = self.id, id, ?message.command, %code, "a reliable message is a dead letter");
                }
            }
            Some(_) => {}
        }
    }

    /// Sends again what is due, each message backing off (on the tick).
    pub(crate) fn outbox_tick(&mut self, now_ms: u64, fx: &mut Effects) {
        let mut sent = 0;
        while let Some(Reverse((at, id, wait))) = self.outbox.schedule.peek().copied() {
            if at > now_ms || sent >= MAX_REDELIVERIES_PER_TICK {
                break;
            }
            self.outbox.schedule.pop();
            match self.outbox.pending.get(&id) {
                Some(message) if !message.dead => {
                    fx.outbox.push(self.outbox.deliver(id));
                    let wait = (wait * 2).min(REDELIVER_MAX_MS);
                    self.outbox.schedule.push(Reverse((now_ms + wait, id, wait)));
                    sent += 1;
                }
                _ => {}
            }
        }
    }

    /// After a replay or a restore: every kept live message, to send again.
    pub fn outbox_resend(&mut self, now_ms: u64) -> Vec<(ExecutorId, PeerMsg)> {
        let ids: Vec<u64> = self.outbox.pending.iter().filter(|(_, m)| !m.dead).map(|(id, _)| *id).collect();
        self.outbox.schedule.clear();
        ids.into_iter()
            .map(|id| {
                self.outbox.schedule.push(Reverse((now_ms + REDELIVER_MIN_MS, id, REDELIVER_MIN_MS)));
                self.outbox.deliver(id)
            })
            .collect()
    }

    /// An operator's replay of a dead letter: retried from nothing (a
    /// message to itself is applied again now). False for an id that is
    /// not a dead letter.
    pub(crate) fn replay_dead_letter(&mut self, id: u64, now_ms: u64, fx: &mut Effects) -> bool {
        let Some(message) = self.outbox.pending.get(&id) else { return false };
        if !message.dead {
            return false;
        }
        if message.dest == self.id {
            let command = message.command.clone();
            let (_, reply) = self.parts.apply(&command, now_ms);
            let message = self.outbox.pending.get_mut(&id).expect("found above");
            match reply.error() {
                None => {
                    self.outbox.pending.remove(&id);
                }
                Some(error) => {
                    message.attempts += 1;
                    message.last_error = Some(error);
                }
            }
            return true;
        }
        let message = self.outbox.pending.get_mut(&id).expect("found above");
        message.dead = false;
        message.attempts = 0;
        fx.outbox.push(self.outbox.deliver(id));
        self.outbox.schedule.push(Reverse((now_ms + REDELIVER_MIN_MS, id, REDELIVER_MIN_MS)));
        true
    }

    /// Kept messages (backlog and dead letters), in id order after `after`.
    pub fn messages(&self, dead_only: bool, after: Option<u64>, limit: usize) -> Vec<MessageView> {
        self.outbox
            .pending
            .range(after.map_or(0, |a| a + 1)..)
            .filter(|(_, m)| !dead_only || m.dead)
            .take(limit)
            .map(|(id, m)| MessageView { executor: self.id, id: *id, message: m.clone() })
            .collect()
    }

    /// (kept, dead letters).
    pub fn outbox_counts(&self) -> (usize, usize) {
        self.outbox.counts()
    }

    /// The outbox and the inbox, for the checkpoint.
    pub(crate) fn encode_messages(&self, w: &mut Writer) {
        w.varint(self.outbox.next);
        w.varint(self.outbox.pending.len() as u64);
        for (id, m) in &self.outbox.pending {
            w.varint(*id);
            w.varint(u64::from(m.dest));
            m.command.encode(w);
            w.varint(m.created_ms);
            w.varint(u64::from(m.attempts));
            m.last_error.encode(w);
            w.bool(m.dead);
        }
        w.varint(self.inbox.by_sender.len() as u64);
        for (sender, received) in &self.inbox.by_sender {
            w.varint(u64::from(*sender));
            w.varint(received.floor);
            w.varint(received.applied.len() as u64);
            for id in &received.applied {
                w.varint(*id);
            }
        }
    }

    pub(crate) fn decode_messages(&mut self, r: &mut Reader<'_>) -> Result<(), CodecError> {
        let executor = |v: u64| ExecutorId::try_from(v).map_err(|_| CodecError("invalid executor"));
        self.outbox.next = r.varint()?;
        for _ in 0..r.len()? {
            let id = r.varint()?;
            let dest = executor(r.varint()?)?;
            let command = PartCommand::decode(r)?;
            let created_ms = r.varint()?;
            let attempts = u32::try_from(r.varint()?).map_err(|_| CodecError("invalid attempts"))?;
            let last_error = Option::<ErrorCode>::decode(r)?;
            let dead = r.bool()?;
            if id >= self.outbox.next {
                return Err(CodecError("a kept message above the next id"));
            }
            self.outbox.pending.insert(id, Outgoing { dest, command, created_ms, attempts, last_error, dead });
        }
        for _ in 0..r.len()? {
            let sender = executor(r.varint()?)?;
            let floor = r.varint()?;
            let mut applied = BTreeSet::new();
            for _ in 0..r.len()? {
                applied.insert(r.varint()?);
            }
            self.inbox.by_sender.insert(sender, Received { floor, applied });
        }
        Ok(())
    }

    /// Whether two executors keep the same messages (a replay's check).
    pub fn same_messages(&self, other: &ExecutorCore) -> bool {
        self.outbox.next == other.outbox.next
            && self.outbox.pending == other.outbox.pending
            && self.inbox == other.inbox
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_print_and_parse_back() {
        assert_eq!(message_name(3, 41), "msg_3_41");
        assert_eq!(parse_message_name("msg_3_41"), Some((3, 41)));
        for bad in ["msg_3", "msg__1", "msg_a_1", "txn_3_1", "msg_70000_1"] {
            assert_eq!(parse_message_name(bad), None, "{bad}");
        }
    }
}
