//! Listing transfers, newest first, filtered and paged, with a bound on the
//! work of one page.
//!
//! A listing walks the account history (`history.rs`) back from the end:
//! every transfer is booked there, so no second index is kept and the hot
//! path pays nothing for listings.
//!
//! - Of one account: its chain, newest entry first. The cursor is the head
//!   the next page starts from (the form `GET /v1/accounts/{id}/transfers`
//!   has always handed out).
//! - Of the whole ledger: every executor's history file, backwards
//!   ([`HistoryReader::entries_before`]), merged newest entry first (ties
//!   by executor). The cursor is each file's end not walked yet, so a page
//!   resumes exactly where the last one stopped, whatever was booked since.
//!
//! A transfer is listed at exactly one entry of a walk: where it was booked
//! ([`listed_at`]): a movement or a hold named after it, or, for a post or
//! void, the settlement named after it; never at the release of an expired
//! hold (named after the pending transfer, listed at its hold). The whole
//! ledger lists only debit-side entries: every transfer has exactly one.
//! Records are read from the executors (memory or archive) in groups, and
//! filters compare the record, so a status is the one `GET
//! /v1/transfers/{id}` shows now.
//!
//! Work is bounded: a page reads at most [`MAX_SCAN_ENTRIES`] entries; when
//! it stops there before `limit` matched, it answers what it found with the
//! cursor to go on from.

use std::time::Duration;

use peakstack_domain::{ErrorCode, Id, Transfer, TransferStatus};

use crate::history::{HistoryReader, LegEntry, LegEvent};
use crate::protocol::ExecutorId;
use crate::runtime::{Engine, Lookup};
use peakstack_domain::Side;

/// Most history entries one page reads.
pub const MAX_SCAN_ENTRIES: usize = 4096;
/// How far one executor's clock may be behind another's when it books a
/// transfer the other made (executor clocks only move forward, but each on
/// its own: a step back of the machine's clock holds one back, not all).
/// A walk back stops at an entry booked this much before `since`.
pub const CLOCK_SLACK_MS: u64 = 10_000;
/// Most records asked of the executors in one query: they answer between
/// batches, so a query is kept short.
const LOOKUP_CHUNK: usize = 256;
/// A record named in the history but not decided yet (a post's settlement
/// is booked just before its record commits) is asked again this often,
/// this many times, before the walk leaves it out.
const UNDECIDED_RETRIES: usize = 25;
const UNDECIDED_WAIT: Duration = Duration::from_millis(2);
/// The prefix of a cursor over the whole ledger.
const ALL_CURSOR_PREFIX: char = 'h';

/// What a listed transfer must be; every filter given must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransferFilter {
    pub status: Option<TransferStatus>,
    /// Only posts and voids of this pending transfer.
    pub pending_id: Option<Id>,
    /// Made at or after, in epoch milliseconds.
    pub since_ms: Option<u64>,
    /// Made before, in epoch milliseconds.
    pub until_ms: Option<u64>,
}

impl TransferFilter {
    pub fn matches(&self, transfer: &Transfer) -> bool {
        self.status.is_none_or(|status| transfer.status == status)
            && self.pending_id.as_ref().is_none_or(|pending| transfer.pending_id() == Some(pending))
            && self.since_ms.is_none_or(|since| transfer.timestamp_ms >= since)
            && self.until_ms.is_none_or(|until| transfer.timestamp_ms < until)
    }

    /// Whether an entry booked at `time_ms`, and every one before it, is
    /// too old to list a transfer the filter takes.
    fn is_before_window(&self, time_ms: u64) -> bool {
        self.since_ms.is_some_and(|since| time_ms.saturating_add(CLOCK_SLACK_MS) < since)
    }

    /// Whether `entry` holds the pending transfer the filter names: its
    /// posts and voids all come after it.
    fn ends_walk_at(&self, entry: &LegEntry) -> bool {
        matches!(entry.event, LegEvent::Held { .. }) && self.pending_id.as_ref() == Some(&entry.transfer_id)
    }
}

/// Which transfers a listing walks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransferSource {
    /// Those that touched the account.
    Account(Id),
    /// Every transfer of the ledger.
    All,
}

#[derive(Debug)]
pub struct TransferPage {
    pub transfers: Vec<Transfer>,
    /// Where the next page starts; `None` when the walk is over.
    pub next: Option<String>,
}

/// Whether `record`, the transfer `entry` names, is listed at `entry`: at
/// the movement or hold that made it, or at the settlement a post or void
/// made; not at the release of an expired hold.
pub fn listed_at(entry: &LegEntry, record: &Transfer) -> bool {
    match entry.event {
        LegEvent::Posted { .. } | LegEvent::Held { .. } => true,
        LegEvent::Settled { .. } => record.pending_id().is_some(),
    }
}

/// Where a walk stands.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Position {
    /// The next entry of an account's chain, as a head (offset + 1; 0:
    /// none left), and the account's fingerprint every entry must carry.
    Account { executor: ExecutorId, fingerprint: u64, head: u64 },
    /// Per executor, the end of the entries not walked yet.
    All { ends: Vec<u64> },
}

impl Position {
    /// The cursor a page that stops here hands out; `None` at the end.
    fn cursor(&self) -> Option<String> {
        match self {
            Position::Account { head: 0, .. } => None,
            Position::Account { head, .. } => Some(head.to_string()),
            Position::All { ends } if ends.iter().all(|&end| end == 0) => None,
            Position::All { ends } => {
                let ends: Vec<String> = ends.iter().map(u64::to_string).collect();
                Some(format!("{ALL_CURSOR_PREFIX}{}", ends.join(".")))
            }
        }
    }

    /// Nothing left to walk.
    fn finish(&mut self) {
        match self {
            Position::Account { head, .. } => *head = 0,
            Position::All { ends } => ends.iter_mut().for_each(|end| *end = 0),
        }
    }
}

/// Reads a whole-ledger cursor against the history lengths now: one end
/// per executor, none past what is written.
fn parse_all_cursor(cursor: &str, lens: &[u64]) -> Result<Vec<u64>, ErrorCode> {
    let ends = cursor
        .strip_prefix(ALL_CURSOR_PREFIX)
        .ok_or(ErrorCode::InvalidRequest)?
        .split('.')
        .map(|end| end.parse::<u64>().map_err(|_| ErrorCode::InvalidRequest))
        .collect::<Result<Vec<u64>, ErrorCode>>()?;
    if ends.len() != lens.len() || ends.iter().zip(lens).any(|(end, len)| end > len) {
        return Err(ErrorCode::InvalidRequest);
    }
    Ok(ends)
}

/// An entry a page may list, and where the walk stands right after it.
struct Candidate {
    entry: LegEntry,
    resume: Position,
}

struct Walker {
    position: Position,
    /// For the whole ledger: per executor, the entries read but not walked
    /// yet, oldest first (the last is the next).
    read: Vec<Vec<(u64, LegEntry)>>,
}

impl Walker {
    fn new(position: Position) -> Walker {
        let executors = match &position {
            Position::All { ends } => ends.len(),
            Position::Account { .. } => 0,
        };
        Walker { position, read: vec![Vec::new(); executors] }
    }

    fn is_done(&self) -> bool {
        self.position.cursor().is_none()
    }

    /// Walks up to `budget` entries, stopping at `max` candidates.
    /// Answers the candidates and how many entries it walked.
    fn gather(
        &mut self,
        readers: &[HistoryReader],
        filter: &TransferFilter,
        budget: usize,
        max: usize,
    ) -> Result<(Vec<Candidate>, usize), ErrorCode> {
        let mut candidates = Vec::new();
        let mut walked = 0;
        while walked < budget && candidates.len() < max {
            let Some((executor, entry)) = self.next_entry(readers)? else { break };
            walked += 1;
            if filter.is_before_window(entry.time_ms) {
                // This executor's older entries are older still.
                match &mut self.position {
                    Position::Account { head, .. } => *head = 0,
                    Position::All { ends } => {
                        ends[executor] = 0;
                        self.read[executor].clear();
                    }
                }
                continue;
            }
            let whole_ledger = matches!(self.position, Position::All { .. });
            if whole_ledger && entry.event.side() == Side::Credit {
                continue;
            }
            if filter.ends_walk_at(&entry) {
                self.position.finish();
            }
            candidates.push(Candidate { entry, resume: self.position.clone() });
        }
        Ok((candidates, walked))
    }

    /// The next entry back, and the executor whose history holds it.
    fn next_entry(&mut self, readers: &[HistoryReader]) -> Result<Option<(usize, LegEntry)>, ErrorCode> {
        match &mut self.position {
            Position::Account { head: 0, .. } => Ok(None),
            Position::Account { executor, fingerprint, head } => {
                let entry = readers[usize::from(*executor)].entry(*head).map_err(|_| ErrorCode::InvalidRequest)?;
                // Every entry read moves strictly back along the chain.
                if entry.account != *fingerprint || entry.previous >= *head {
                    return Err(ErrorCode::InvalidRequest);
                }
                *head = entry.previous;
                Ok(Some((usize::from(*executor), entry)))
            }
            Position::All { ends } => {
                for (executor, read) in self.read.iter_mut().enumerate() {
                    if read.is_empty() && ends[executor] > 0 {
                        *read =
                            readers[executor].entries_before(ends[executor]).map_err(|_| ErrorCode::InvalidRequest)?;
                    }
                }
                // Newest first; of two booked in the same millisecond, the
                // lower executor's first.
                let newest = (0..self.read.len())
                    .filter_map(|executor| self.read[executor].last().map(|(_, entry)| (entry.time_ms, executor)))
                    .max_by_key(|&(time_ms, executor)| (time_ms, std::cmp::Reverse(executor)));
                let Some((_, executor)) = newest else { return Ok(None) };
                let (start, entry) = self.read[executor].pop().expect("the newest is there");
                ends[executor] = start;
                Ok(Some((executor, entry)))
            }
        }
    }
}

impl LegEvent {
    /// The side of the account the entry books.
    pub fn side(&self) -> Side {
        match *self {
            LegEvent::Posted { side, .. } | LegEvent::Held { side, .. } | LegEvent::Settled { side, .. } => side,
        }
    }
}

impl Engine {
    /// A page of at most `limit` transfers of `source` that `filter`
    /// takes, newest first, from `after` (the `next` of the page before).
    /// `invalid_request` for a cursor this walk did not hand out;
    /// `account_not_found` for an account that does not exist.
    pub async fn list_transfers(
        &self,
        source: &TransferSource,
        filter: &TransferFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<TransferPage, ErrorCode> {
        let mut walker = Walker::new(self.start_walk(source, after).await?);
        let mut transfers = Vec::new();
        let mut walked = 0;
        while walked < MAX_SCAN_ENTRIES && !walker.is_done() {
            let (budget, taken) = (MAX_SCAN_ENTRIES - walked, filter.clone());
            let (back, gathered) = self
                .read_history(move |readers| {
                    let gathered = walker.gather(readers, &taken, budget, LOOKUP_CHUNK);
                    (walker, gathered)
                })
                .await?;
            walker = back;
            let (candidates, count) = gathered?;
            walked += count;
            let records = self.decided_records(&candidates).await?;
            for (candidate, record) in candidates.into_iter().zip(records) {
                let Some(record) = record else { continue };
                if listed_at(&candidate.entry, &record) && filter.matches(&record) {
                    transfers.push(record);
                    if transfers.len() == limit {
                        return Ok(TransferPage { transfers, next: candidate.resume.cursor() });
                    }
                }
            }
        }
        Ok(TransferPage { transfers, next: walker.position.cursor() })
    }

    async fn start_walk(&self, source: &TransferSource, after: Option<&str>) -> Result<Position, ErrorCode> {
        match source {
            TransferSource::Account(id) => {
                let account = self.account(id).await?.ok_or(ErrorCode::AccountNotFound)?;
                let head = match after {
                    None => account.history_head,
                    Some(cursor) => cursor.parse::<u64>().map_err(|_| ErrorCode::InvalidRequest)?,
                };
                if head > account.history_head {
                    return Err(ErrorCode::InvalidRequest);
                }
                let executor = self.layout().executor_of_account(id);
                Ok(Position::Account { executor, fingerprint: peakstack_domain::fnv1a64(id.as_str().as_bytes()), head })
            }
            TransferSource::All => {
                let lens = self.history_lens().await?;
                let ends = match after {
                    None => lens,
                    Some(cursor) => parse_all_cursor(cursor, &lens)?,
                };
                Ok(Position::All { ends })
            }
        }
    }

    /// The records the candidates name, in order; `None` for one that is
    /// still not decided after [`UNDECIDED_RETRIES`] tries.
    async fn decided_records(&self, candidates: &[Candidate]) -> Result<Vec<Option<Transfer>>, ErrorCode> {
        let mut records: Vec<Option<Transfer>> = candidates.iter().map(|_| None).collect();
        let mut waiting: Vec<usize> = (0..candidates.len()).collect();
        for attempt in 0..=UNDECIDED_RETRIES {
            if waiting.is_empty() {
                break;
            }
            if attempt > 0 {
                tokio::time::sleep(UNDECIDED_WAIT).await;
            }
            let ids: Vec<Id> = waiting.iter().map(|&index| candidates[index].entry.transfer_id.clone()).collect();
            let answers = self.lookup_transfers(&ids).await?;
            let mut still = Vec::new();
            for (index, answer) in waiting.into_iter().zip(answers) {
                match answer {
                    Lookup::Found(transfer) => records[index] = Some(transfer),
                    Lookup::Missing | Lookup::Undecided => still.push(index),
                }
            }
            waiting = still;
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peakstack_domain::{Currency, TransferKind};

    fn id(text: &str) -> Id {
        Id::parse(text).unwrap()
    }

    fn record(name: &str, kind: TransferKind, status: TransferStatus, timestamp_ms: u64) -> Transfer {
        Transfer {
            id: id(name),
            debit_account_id: id("a"),
            credit_account_id: id("b"),
            amount: 5,
            currency: Currency::parse("USD").unwrap(),
            kind,
            status,
            posted_amount: None,
            timestamp_ms,
            details: None,
        }
    }

    fn entry(name: &str, event: LegEvent, time_ms: u64) -> LegEntry {
        LegEntry { previous: 0, account: 1, time_ms, transfer_id: id(name), event }
    }

    const POSTED: LegEvent = LegEvent::Posted { side: Side::Debit, amount: 5 };
    const HELD: LegEvent = LegEvent::Held { side: Side::Debit, amount: 5 };
    const SETTLED: LegEvent = LegEvent::Settled { side: Side::Credit, held: 5, posted: 5 };

    #[test]
    fn a_transfer_is_listed_where_it_was_booked_and_never_at_an_expiry() {
        let pending = TransferKind::Pending { timeout_ms: 10, expires_at_ms: 20 };
        let post = TransferKind::Post { pending_id: id("h"), requested: None };
        let void = TransferKind::Void { pending_id: id("h") };
        let check = |event: LegEvent, kind: TransferKind, listed: bool| {
            let transfer = record("t", kind.clone(), TransferStatus::Posted, 1);
            assert_eq!(listed_at(&entry("t", event, 1), &transfer), listed, "{event:?} {kind:?}");
        };
        check(POSTED, TransferKind::Single, true);
        check(HELD, pending.clone(), true);
        check(SETTLED, post, true);
        check(SETTLED, void, true);
        // An expiry's release is named after the pending transfer itself.
        check(SETTLED, pending, false);
    }

    #[test]
    fn filters_combine_and_compare_the_record() {
        let post =
            record("p", TransferKind::Post { pending_id: id("h"), requested: None }, TransferStatus::Posted, 1_000);
        let check = |filter: TransferFilter, expected: bool| {
            assert_eq!(filter.matches(&post), expected, "{filter:?}");
        };
        check(TransferFilter::default(), true);
        check(TransferFilter { status: Some(TransferStatus::Posted), ..Default::default() }, true);
        check(TransferFilter { status: Some(TransferStatus::Pending), ..Default::default() }, false);
        check(TransferFilter { pending_id: Some(id("h")), ..Default::default() }, true);
        check(TransferFilter { pending_id: Some(id("other")), ..Default::default() }, false);
        // [since, until): since is in, until is out.
        check(TransferFilter { since_ms: Some(1_000), until_ms: Some(1_001), ..Default::default() }, true);
        check(TransferFilter { since_ms: Some(1_001), ..Default::default() }, false);
        check(TransferFilter { until_ms: Some(1_000), ..Default::default() }, false);
        let all = TransferFilter {
            status: Some(TransferStatus::Posted),
            pending_id: Some(id("h")),
            since_ms: Some(999),
            until_ms: Some(2_000),
        };
        check(all.clone(), true);
        check(TransferFilter { status: Some(TransferStatus::Voided), ..all }, false);
    }

    #[test]
    fn a_walk_stops_before_the_window_with_slack_and_at_the_named_hold() {
        let since = TransferFilter { since_ms: Some(100_000), ..Default::default() };
        assert!(!since.is_before_window(100_000 - CLOCK_SLACK_MS));
        assert!(since.is_before_window(100_000 - CLOCK_SLACK_MS - 1));
        assert!(!TransferFilter::default().is_before_window(0));
        let posts_of_h = TransferFilter { pending_id: Some(id("h")), ..Default::default() };
        assert!(posts_of_h.ends_walk_at(&entry("h", HELD, 1)));
        assert!(!posts_of_h.ends_walk_at(&entry("h", SETTLED, 1)), "an expiry comes after the hold");
        assert!(!posts_of_h.ends_walk_at(&entry("x", HELD, 1)));
    }

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        let position = Position::All { ends: vec![17, 0, 4096] };
        let cursor = position.cursor().unwrap();
        assert_eq!(parse_all_cursor(&cursor, &[17, 5, 5000]), Ok(vec![17, 0, 4096]));
        for bad in ["17.0.4096", "h17.0", "h17.0.4096.1", "h17.x.4096", "h", "h17.0.5001"] {
            assert_eq!(parse_all_cursor(bad, &[17, 5, 5000]), Err(ErrorCode::InvalidRequest), "{bad}");
        }
        assert_eq!(Position::All { ends: vec![0, 0] }.cursor(), None);
        assert_eq!(Position::Account { executor: 0, fingerprint: 1, head: 0 }.cursor(), None);
        assert_eq!(Position::Account { executor: 0, fingerprint: 1, head: 42 }.cursor().as_deref(), Some("42"));
    }
}
