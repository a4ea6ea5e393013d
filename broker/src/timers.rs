//! The leader's timer loop: finds due timers (delayed messages, push-consumer
//! retries) in the applied state and fires them with one `FireTimers` command per
//! batch. Firing is idempotent in the state machine (a timer no longer pending is
//! skipped), so a deposed leader's late command or a new leader re-firing what
//! the old one already fired delivers nothing twice. A leader elected after a due
//! time fires at once: the loop starts by scanning from the earliest timer.
//!
//! Never early: a timer fires only when the leader's clock has reached its due
//! time. Timely: the loop sleeps until the earliest due time and is woken when an
//! apply schedules an earlier one.

use std::time::Duration;

use raftmq_raft_store::{Command, TimerKey};
use tracing::Instrument;

use crate::api_error::ApiError;
use crate::group::GroupHandle;
use crate::messaging::now_ms;

/// Timers fired per Raft entry.
const FIRE_BATCH: usize = 2048;
/// How far behind the last fired due time the next scan starts. Fired timers
/// leave RocksDB tombstones at the head of the index; starting the scan near the
/// last fired time steps over them. A timer can be scheduled with a due time
/// behind a fired one only if its send was stamped before that firing and
/// applied after it: the margin covers that window many times over.
const RESCAN_MARGIN_MS: u64 = 10_000;
/// A full scan from the earliest timer at least this often, whatever the margin.
const FULL_SCAN_EVERY: Duration = Duration::from_secs(60);
/// Longest sleep without re-reading the earliest due time.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// What the loop does next, from what it read: a pure decision, tested below.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Fire(Vec<TimerKey>),
    SleepUntil(Option<u64>),
}

fn decide(due: Vec<TimerKey>, next_due: Option<u64>) -> Step {
    if due.is_empty() {
        Step::SleepUntil(next_due)
    } else {
        Step::Fire(due)
    }
}

/// Starts the loop on this replica; it works only while the replica leads.
pub fn spawn(group: GroupHandle) {
    let span = tracing::info_span!("timers", group = %group.group());
    group.tasks().spawn(run(group.clone()).instrument(span));
}

async fn run(group: GroupHandle) {
    group.while_leading(|term| lead(&group, term)).await;
}

/// Fires timers until this node stops leading `term` or shuts down.
async fn lead(group: &GroupHandle, term: u64) {
    tracing::debug!(term, "leading: firing due timers");
    let stop = group.shutdown();
    let store = group.store().clone();
    let mut from_due = 0u64;
    let mut full_scan_at = tokio::time::Instant::now() + FULL_SCAN_EVERY;
    loop {
        if !group.leads(term) {
            return;
        }
        if tokio::time::Instant::now() >= full_scan_at {
            from_due = 0;
            full_scan_at = tokio::time::Instant::now() + FULL_SCAN_EVERY;
        }
        // Register for wake-ups before reading, so a timer scheduled between the
        // read and the sleep still wakes us.
        let added = store.timer_added();
        tokio::pin!(added);
        added.as_mut().enable();
        let now = now_ms();
        let read = (|| {
            let due = store.due_timers(from_due, now, FIRE_BATCH)?;
            let next = if due.is_empty() {
                store.next_timer_due(from_due)?
            } else {
                None
            };
            Ok::<_, std::io::Error>(decide(due, next))
        })();
        let step = match read {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "reading due timers failed; retrying");
                Step::SleepUntil(Some(now + 100))
            }
        };
        match step {
            Step::Fire(due) => {
                let last = due.last().map_or(0, |t| t.due_ms);
                let n = due.len();
                let cmd = Command::FireTimers {
                    store_timestamp_ms: now,
                    timers: due,
                };
                match group.write(cmd).await {
                    Ok(_) => {
                        tracing::trace!(timers = n, "fired");
                        from_due = from_due.max(last.saturating_sub(RESCAN_MARGIN_MS));
                    }
                    Err(ApiError::NotLeader { .. }) => return,
                    Err(e) => {
                        // Nothing was lost: the timers stay pending until a fire applies.
                        tracing::warn!(error = %e, timers = n, "firing timers failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                            _ = stop.cancelled() => return,
                        }
                    }
                }
            }
            Step::SleepUntil(next) => {
                let wait = next
                    .map(|due| Duration::from_millis(due.saturating_sub(now_ms())))
                    .unwrap_or(MAX_SLEEP)
                    .min(MAX_SLEEP);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = &mut added => {}
                    _ = group.deposed(term) => return,
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_what_is_due_else_sleeps_until_the_next() {
        let k = TimerKey {
            due_ms: 5,
            created_index: 1,
            slot: 0,
        };
        assert_eq!(decide(vec![k], Some(9)), Step::Fire(vec![k]));
        assert_eq!(decide(vec![], Some(9)), Step::SleepUntil(Some(9)));
        assert_eq!(decide(vec![], None), Step::SleepUntil(None));
    }
}
