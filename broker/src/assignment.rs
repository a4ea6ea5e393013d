//! The consumer-group assignment rules as a pure decision: the membership of one
//! (consumer group, topic) on this leader, one member's heartbeat and the time
//! it is handled (`now`, injected, never read here) give the offsets to commit,
//! the queues granted and released, and the member's answer. No I/O, no clock,
//! no Raft: [`crate::consumer_group`] reads the state, calls
//! [`GroupTopic::decide`], proposes the commits through Raft, then applies
//! [`GroupTopic::settle`] and builds the reply from [`Decision::assigned`].
//!
//! The rules (see the protocol comment in `raftmq/v1/messaging.proto`):
//!
//! * **Liveness.** A member not heard from for the session timeout is presumed
//!   dead and forgotten; its queues are free.
//! * **Commits.** A reported offset is committed for a queue the member holds, or
//!   that nobody else holds (a new leader learning holdings, or a member back
//!   after being presumed dead); reporting `held` makes it the member's. A queue
//!   with an administrator's reset pending ignores reported offsets.
//! * **Fair share.** Members sorted by id each target a contiguous share of the
//!   queues, sizes differing by at most one ([`share`]).
//! * **Release before grant.** A queue leaves its holder's answer when it falls
//!   out of the holder's share, but stays held until the holder reports it with
//!   `held = false` and that final offset is committed ([`GroupTopic::settle`]);
//!   only free queues are granted.
//! * **Grace period.** For a while after election the leader only confirms what
//!   members report holding (even outside their share) and grants nothing.
//! * **Leaving.** A leaving member's offsets are committed, it is answered with
//!   no queues and forgotten, so its queues are free at once.
//! * **Resets.** A holder of a reset queue hears the reset offset on its next
//!   answer (`reset`), once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use raftmq_proto::v1 as pb;
use tokio::time::Instant;

/// Member `index` of `members` (sorted ids) gets a contiguous share of the
/// queues, sizes differing by at most one; with more members than queues some
/// get none (RocketMQ's "averagely" strategy).
pub fn share(queues: u32, members: usize, index: usize) -> std::ops::Range<u32> {
    let (n, m, i) = (u64::from(queues), members.max(1) as u64, index as u64);
    // Both bounds are at most `queues`, so they fit in u32.
    (i * n / m) as u32..((i + 1) * n / m) as u32
}

/// Why a heartbeat's report of queues is refused (INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadReport {
    /// More queues reported than the topic has.
    TooMany { reported: usize, queues: u32 },
    /// A queue id at or past the topic's queue count.
    OutOfRange { queue_id: u32, queues: u32 },
    /// One queue reported twice.
    Twice { queue_id: u32 },
}

impl fmt::Display for BadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadReport::TooMany { reported, queues } => {
                write!(f, "heartbeat reports {reported} queues; at most {queues} are allowed")
            }
            BadReport::OutOfRange { queue_id, queues } => {
                write!(f, "queue_id {queue_id} is out of range: at most {queues} queues")
            }
            BadReport::Twice { queue_id } => write!(f, "queue {queue_id} is reported twice in one heartbeat"),
        }
    }
}

/// Checks what a member reports against a topic of `queues` queues: no more
/// held queues than the topic has, every held id below `queues`, none twice.
/// The first problem, in report order. A *released* queue past the count is
/// accepted (and ignored by [`GroupTopic::decide`]): the topic may have been
/// shrunk while the member held it, and its final report must not lock the
/// member out. The shell bounds the whole report by `MAX_QUEUES` first.
pub fn check_report(reported: &[pb::HeldQueue], queues: u32) -> Result<(), BadReport> {
    let held = reported.iter().filter(|q| q.held).count();
    if held > queues as usize {
        return Err(BadReport::TooMany { reported: held, queues });
    }
    let mut seen = BTreeSet::new();
    for q in reported {
        if q.held && q.queue_id >= queues {
            return Err(BadReport::OutOfRange {
                queue_id: q.queue_id,
                queues,
            });
        }
        if !seen.insert(q.queue_id) {
            return Err(BadReport::Twice { queue_id: q.queue_id });
        }
    }
    Ok(())
}

/// The timing the rules depend on.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// When this leader started answering in its term: the grace period runs
    /// from here.
    pub leading_since: Instant,
    /// How long after `leading_since` only reported holdings are confirmed.
    pub grace: Duration,
    /// A member silent this long is presumed dead.
    pub session_timeout: Duration,
}

impl Timing {
    pub fn in_grace(&self, now: Instant) -> bool {
        now < self.leading_since + self.grace
    }
}

/// One member's heartbeat, as far as the rules care.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat<'a> {
    pub client_id: &'a str,
    pub tag_expression: &'a str,
    /// What the member reports (checked with [`check_report`] beforehand; ids at
    /// or past the queue count are ignored here).
    pub queues: &'a [pb::HeldQueue],
    pub leaving: bool,
}

/// One member of a consumer group on one topic.
#[derive(Debug, Clone)]
pub struct Member {
    pub last_seen: Instant,
    pub tag_expression: String,
    /// Queues this member holds as far as the leader knows: granted to it, or
    /// revoked but not yet reported released.
    pub holds: BTreeSet<u32>,
}

/// One consumer group's members on one topic: soft state of the leader.
#[derive(Debug, Clone, Default)]
pub struct GroupTopic {
    members: BTreeMap<String, Member>,
    /// Offsets an administrator reset while a member held the queue; the holder
    /// hears of it on its next heartbeat, and until then its commits for the
    /// queue are ignored so they cannot overwrite the reset.
    pending_resets: HashMap<u32, u64>,
}

/// A queue in a heartbeat's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assigned {
    pub queue_id: u32,
    /// The offset of an administrator's reset to jump to; `None`: the group's
    /// committed offset.
    pub reset: Option<u64>,
}

/// What to do about one heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Members presumed dead (not heard from for the session timeout) and
    /// forgotten, with the queues they held, now free.
    pub presumed_dead: Vec<(String, Vec<u32>)>,
    /// The member was not known before this heartbeat.
    pub joined: bool,
    /// Reported offsets to commit, (queue, offset), before anything else
    /// (the caller may skip those equal to the committed offset).
    pub commits: Vec<(u32, u64)>,
    /// Free queues granted to the member now; one the group never committed an
    /// offset for needs its start offset committed before the answer.
    pub granted: Vec<u32>,
    /// Queues the member no longer holds once `commits` are applied
    /// ([`GroupTopic::settle`]); until then nobody else is granted them.
    pub released: Vec<u32>,
    /// The member is leaving: forget it once `commits` are applied.
    pub leaving: bool,
    /// The queues the member may consume, ascending.
    pub assigned: Vec<Assigned>,
    /// The answer is not settled (a queue awaits release by another member, or
    /// the grace period runs): heartbeat again soon.
    pub rebalancing: bool,
}

impl GroupTopic {
    /// Members by id, live or not yet found dead.
    pub fn members(&self) -> impl Iterator<Item = (&str, &Member)> {
        self.members.iter().map(|(id, m)| (id.as_str(), m))
    }

    /// Whether some member was heard from within `session_timeout` of `now`.
    pub fn has_live_member(&self, now: Instant, session_timeout: Duration) -> bool {
        self.members
            .values()
            .any(|m| now.duration_since(m.last_seen) < session_timeout)
    }

    /// Nothing left to remember: the caller may drop this entry.
    pub fn is_idle(&self) -> bool {
        self.members.is_empty() && self.pending_resets.is_empty()
    }

    /// An administrator committed `offsets` (queue, offset): holders of those
    /// queues are told on their next heartbeat, and their commits for them are
    /// ignored until then.
    pub fn note_reset(&mut self, offsets: &[(u32, u64)]) {
        let held: BTreeSet<u32> = self.members.values().flat_map(|m| m.holds.iter().copied()).collect();
        for &(q, o) in offsets {
            if held.contains(&q) {
                self.pending_resets.insert(q, o);
            }
        }
    }

    /// Applies `hb` from a member at `now` to a topic of `queues` queues. Updates
    /// the membership up to the point where offsets must be durable (dead members
    /// dropped, the member joined or refreshed, reported and granted queues held,
    /// delivered resets cleared); the rest waits for [`GroupTopic::settle`].
    pub fn decide(&mut self, hb: &Heartbeat<'_>, queues: u32, now: Instant, timing: &Timing) -> Decision {
        let in_grace = timing.in_grace(now);
        let mut presumed_dead = Vec::new();
        self.members.retain(|id, m| {
            let alive = now.duration_since(m.last_seen) < timing.session_timeout;
            if !alive {
                presumed_dead.push((id.clone(), m.holds.iter().copied().collect()));
            }
            alive
        });
        let held_by_others: BTreeSet<u32> = self
            .members
            .iter()
            .filter(|(id, _)| id.as_str() != hb.client_id)
            .flat_map(|(_, m)| m.holds.iter().copied())
            .collect();
        let joined = !self.members.contains_key(hb.client_id);
        let member = self.members.entry(hb.client_id.to_owned()).or_insert_with(|| Member {
            last_seen: now,
            tag_expression: String::new(),
            holds: BTreeSet::new(),
        });
        member.last_seen = now;
        hb.tag_expression.clone_into(&mut member.tag_expression);
        // Commits: for queues this member holds, or reports and nobody else holds
        // (a new leader learning holds, or a member back after being presumed dead).
        let mut commits = Vec::new();
        for q in hb.queues {
            if q.queue_id >= queues || self.pending_resets.contains_key(&q.queue_id) {
                continue;
            }
            if member.holds.contains(&q.queue_id) || !held_by_others.contains(&q.queue_id) {
                commits.push((q.queue_id, q.offset));
                if q.held {
                    member.holds.insert(q.queue_id);
                }
            }
        }
        let still_held: BTreeSet<u32> = hb.queues.iter().filter(|q| q.held).map(|q| q.queue_id).collect();
        // Released (or never received) queues stay held until the commits are
        // applied, so nobody else is granted them from a stale offset.
        let released: Vec<u32> = member.holds.difference(&still_held).copied().collect();
        let target: BTreeSet<u32> = if hb.leaving {
            BTreeSet::new()
        } else {
            let index = self.members.keys().position(|id| id == hb.client_id).unwrap_or(0);
            share(queues, self.members.len(), index).collect()
        };
        let mut granted = Vec::new();
        if !hb.leaving && !in_grace {
            let all_held: BTreeSet<u32> = self.members.values().flat_map(|m| m.holds.iter().copied()).collect();
            let member = self.members.get_mut(hb.client_id).expect("inserted above");
            for &q in &target {
                if !all_held.contains(&q) {
                    member.holds.insert(q);
                    granted.push(q);
                }
            }
        }
        let member = &self.members[hb.client_id];
        let assigned: Vec<u32> = member
            .holds
            .iter()
            .copied()
            .filter(|q| still_held.contains(q) || granted.contains(q))
            .filter(|q| in_grace || target.contains(q))
            .collect();
        let rebalancing = in_grace || assigned.iter().copied().collect::<BTreeSet<_>>() != target;
        let assigned = assigned
            .into_iter()
            .map(|q| Assigned {
                queue_id: q,
                reset: self.pending_resets.remove(&q),
            })
            .collect();
        Decision {
            presumed_dead,
            joined,
            commits,
            granted,
            released,
            leaving: hb.leaving,
            assigned,
            rebalancing,
        }
    }

    /// The offsets `decision` asked for are committed: the member `client_id`
    /// lets go of what it released, or is forgotten if it is leaving.
    pub fn settle(&mut self, client_id: &str, decision: &Decision) {
        if decision.leaving {
            self.members.remove(client_id);
        } else if let Some(m) = self.members.get_mut(client_id) {
            for q in &decision.released {
                m.holds.remove(q);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUEUES: u32 = 4;
    const INTERVAL: Duration = Duration::from_secs(1);

    /// A clock the tests move by hand, and the timing of a leader elected at its start.
    struct Clock {
        start: Instant,
        now: Instant,
    }

    impl Clock {
        fn new() -> Clock {
            let start = Instant::now();
            Clock { start, now: start }
        }

        /// Past the grace period of a leader elected at `start`.
        fn settled() -> Clock {
            let mut c = Clock::new();
            c.advance(INTERVAL * 3);
            c
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
        }

        fn timing(&self) -> Timing {
            Timing {
                leading_since: self.start,
                grace: INTERVAL * 3,
                session_timeout: INTERVAL * 5,
            }
        }
    }

    fn held(queue_id: u32, offset: u64) -> pb::HeldQueue {
        pb::HeldQueue {
            queue_id,
            offset,
            held: true,
        }
    }

    fn released(queue_id: u32, offset: u64) -> pb::HeldQueue {
        pb::HeldQueue {
            queue_id,
            offset,
            held: false,
        }
    }

    /// One heartbeat, settled at once (as if its commits were applied).
    fn beat(gt: &mut GroupTopic, clock: &Clock, id: &str, queues: &[pb::HeldQueue], leaving: bool) -> Decision {
        let hb = Heartbeat {
            client_id: id,
            tag_expression: "*",
            queues,
            leaving,
        };
        let d = gt.decide(&hb, QUEUES, clock.now, &clock.timing());
        gt.settle(id, &d);
        d
    }

    /// What a well-behaved member reports: what it was last assigned, held.
    fn holding(d: &Decision, offset: u64) -> Vec<pb::HeldQueue> {
        d.assigned.iter().map(|a| held(a.queue_id, offset)).collect()
    }

    fn ids(d: &Decision) -> Vec<u32> {
        d.assigned.iter().map(|a| a.queue_id).collect()
    }

    fn holds(gt: &GroupTopic, id: &str) -> Vec<u32> {
        gt.members()
            .find(|(m, _)| *m == id)
            .map(|(_, m)| m.holds.iter().copied().collect())
            .unwrap_or_default()
    }

    #[test]
    fn shares_cover_every_queue_once_and_differ_by_at_most_one() {
        for queues in 0..20u32 {
            for members in 1..8usize {
                let shares: Vec<_> = (0..members).map(|i| share(queues, members, i)).collect();
                let all: Vec<u32> = shares.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(
                    all,
                    (0..queues).collect::<Vec<_>>(),
                    "{queues} queues, {members} members"
                );
                let sizes: Vec<usize> = shares.iter().map(|r| r.len()).collect();
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(max - min <= 1, "{queues} queues over {members} members: {sizes:?}");
            }
        }
    }

    #[test]
    fn a_first_member_joins_and_is_granted_every_free_queue() {
        let clock = Clock::settled();
        let mut gt = GroupTopic::default();
        let d = beat(&mut gt, &clock, "a", &[], false);
        assert!(d.joined);
        assert_eq!(d.granted, vec![0, 1, 2, 3]);
        assert_eq!(ids(&d), vec![0, 1, 2, 3]);
        assert!(d.assigned.iter().all(|a| a.reset.is_none()));
        assert!(d.commits.is_empty() && d.released.is_empty());
        assert!(!d.rebalancing);
        // Its next heartbeat confirms them, commits its offsets, grants nothing new.
        let again = beat(&mut gt, &clock, "a", &holding(&d, 7), false);
        assert!(!again.joined);
        assert!(again.granted.is_empty());
        assert_eq!(again.commits, vec![(0, 7), (1, 7), (2, 7), (3, 7)]);
        assert_eq!(ids(&again), vec![0, 1, 2, 3]);
        assert!(!again.rebalancing);
    }

    #[test]
    fn members_get_fair_contiguous_shares_by_sorted_id() {
        let clock = Clock::settled();
        let mut gt = GroupTopic::default();
        // "b" and "a" join an empty group one after the other: each gets its share.
        let b = beat(&mut gt, &clock, "b", &[], false);
        assert_eq!(ids(&b), vec![0, 1, 2, 3]);
        let a = beat(&mut gt, &clock, "a", &[], false);
        // "a" sorts first, so its share is 0..2, held by "b" for now.
        assert!(a.granted.is_empty() && a.assigned.is_empty() && a.rebalancing);
        let b = beat(&mut gt, &clock, "b", &holding(&b, 0), false);
        assert_eq!(ids(&b), vec![2, 3], "b keeps its own share only");
        assert!(!b.rebalancing);
        // b releases 0 and 1.
        let b = beat(
            &mut gt,
            &clock,
            "b",
            &[released(0, 5), released(1, 6), held(2, 0), held(3, 0)],
            false,
        );
        assert_eq!(ids(&b), vec![2, 3]);
        let a = beat(&mut gt, &clock, "a", &[], false);
        assert_eq!(a.granted, vec![0, 1]);
        assert_eq!(ids(&a), vec![0, 1]);
        assert!(!a.rebalancing);
        // Five queues over two members would be 2 + 3; three members over four: 1, 1, 2.
        assert_eq!(share(5, 2, 0), 0..2);
        assert_eq!(share(5, 2, 1), 2..5);
        assert_eq!(share(4, 3, 2), 2..4);
    }

    #[test]
    fn a_queue_is_granted_only_after_its_holder_released_it_and_the_offset_is_committed() {
        let clock = Clock::settled();
        let mut gt = GroupTopic::default();
        let b = beat(&mut gt, &clock, "b", &[], false);
        let _ = beat(&mut gt, &clock, "a", &[], false);
        // b is told to drop 0 and 1 but still holds them until it reports them released.
        let b = beat(&mut gt, &clock, "b", &holding(&b, 3), false);
        assert_eq!(ids(&b), vec![2, 3]);
        assert!(b.released.is_empty());
        assert_eq!(holds(&gt, "b"), vec![0, 1, 2, 3]);
        let a = beat(&mut gt, &clock, "a", &[], false);
        assert!(a.granted.is_empty(), "granted {:?} before b released them", a.granted);
        assert!(a.rebalancing);
        // b releases: its final offsets are to be committed, and until then (no
        // settle yet) the queues stay b's.
        let hb = [released(0, 10), released(1, 11), held(2, 3), held(3, 3)];
        let d = gt.decide(
            &Heartbeat {
                client_id: "b",
                tag_expression: "*",
                queues: &hb,
                leaving: false,
            },
            QUEUES,
            clock.now,
            &clock.timing(),
        );
        assert_eq!(d.commits, vec![(0, 10), (1, 11), (2, 3), (3, 3)]);
        assert_eq!(d.released, vec![0, 1]);
        assert_eq!(holds(&gt, "b"), vec![0, 1, 2, 3], "released only once committed");
        let early = gt.decide(
            &Heartbeat {
                client_id: "a",
                tag_expression: "*",
                queues: &[],
                leaving: false,
            },
            QUEUES,
            clock.now,
            &clock.timing(),
        );
        assert!(early.granted.is_empty());
        gt.settle("a", &early);
        gt.settle("b", &d);
        assert_eq!(holds(&gt, "b"), vec![2, 3]);
        let a = beat(&mut gt, &clock, "a", &[], false);
        assert_eq!(a.granted, vec![0, 1]);
        assert_eq!(ids(&a), vec![0, 1]);
    }

    #[test]
    fn a_member_silent_for_the_session_timeout_is_presumed_dead_and_its_queues_are_free() {
        let mut clock = Clock::settled();
        let mut gt = GroupTopic::default();
        let a = beat(&mut gt, &clock, "a", &[], false);
        assert_eq!(ids(&a), vec![0, 1, 2, 3]);
        // "b" joins just before a's session times out: a is alive, holds b's share,
        // and b waits for a release that never comes.
        clock.advance(INTERVAL * 5 - Duration::from_millis(1));
        let b = beat(&mut gt, &clock, "b", &[], false);
        assert!(b.presumed_dead.is_empty());
        assert!(b.assigned.is_empty() && b.rebalancing);
        // a falls silent; b keeps heartbeating.
        for _ in 0..5 {
            clock.advance(INTERVAL);
            let b = beat(&mut gt, &clock, "b", &[], false);
            if !b.presumed_dead.is_empty() {
                assert_eq!(b.presumed_dead, vec![("a".to_owned(), vec![0, 1, 2, 3])]);
                assert_eq!(b.granted, vec![0, 1, 2, 3], "alone now, b gets every queue");
                assert!(gt.members().all(|(id, _)| id == "b"));
                return;
            }
        }
        panic!("a was never presumed dead");
    }

    #[test]
    fn a_member_back_after_being_presumed_dead_rejoins_and_reclaims_free_queues() {
        let mut clock = Clock::settled();
        let mut gt = GroupTopic::default();
        let a = beat(&mut gt, &clock, "a", &[], false);
        clock.advance(INTERVAL * 6);
        let back = beat(&mut gt, &clock, "a", &holding(&a, 9), false);
        assert_eq!(back.presumed_dead, vec![("a".to_owned(), vec![0, 1, 2, 3])]);
        assert!(back.joined);
        // Nobody else holds them: its offsets are committed and the queues confirmed.
        assert_eq!(back.commits, vec![(0, 9), (1, 9), (2, 9), (3, 9)]);
        assert!(back.granted.is_empty());
        assert_eq!(ids(&back), vec![0, 1, 2, 3]);
    }

    #[test]
    fn during_the_grace_period_only_reported_holdings_are_confirmed() {
        let mut clock = Clock::new();
        let mut gt = GroupTopic::default();
        // a reports 0 and 3 (outside its eventual share), b reports 3 too: the
        // first to report wins it; nothing free is granted.
        let a = beat(&mut gt, &clock, "a", &[held(0, 4), held(3, 8)], false);
        assert_eq!(ids(&a), vec![0, 3]);
        assert_eq!(a.commits, vec![(0, 4), (3, 8)]);
        assert!(a.granted.is_empty() && a.rebalancing);
        let b = beat(&mut gt, &clock, "b", &[held(3, 2)], false);
        assert!(b.commits.is_empty(), "a holds 3: b's offset is ignored");
        assert!(b.assigned.is_empty() && b.granted.is_empty() && b.rebalancing);
        let c = beat(&mut gt, &clock, "c", &[], false);
        assert!(c.assigned.is_empty() && c.granted.is_empty() && c.rebalancing);
        // Just before the grace period ends: still no grants.
        clock.advance(INTERVAL * 3 - Duration::from_millis(1));
        assert!(beat(&mut gt, &clock, "c", &[], false).granted.is_empty());
        // After it: shares apply (a: 0, b: 1, c: 2..4), a's 3 is revoked and only
        // free queues are granted.
        clock.advance(Duration::from_millis(1));
        let a = beat(&mut gt, &clock, "a", &[held(0, 4), held(3, 8)], false);
        assert_eq!(ids(&a), vec![0]);
        let b = beat(&mut gt, &clock, "b", &[], false);
        assert_eq!(b.granted, vec![1]);
        let c = beat(&mut gt, &clock, "c", &[], false);
        assert_eq!(c.granted, vec![2], "3 is still a's until released");
        assert!(c.rebalancing);
    }

    #[test]
    fn a_leaving_member_commits_gets_nothing_and_is_forgotten_so_others_take_its_queues() {
        let clock = Clock::settled();
        let mut gt = GroupTopic::default();
        let a = beat(&mut gt, &clock, "a", &[], false);
        let b = beat(&mut gt, &clock, "b", &[], false);
        assert!(b.assigned.is_empty());
        let a = beat(&mut gt, &clock, "a", &holding(&a, 1), false);
        assert_eq!(ids(&a), vec![0, 1]);
        // a leaves, reporting its final offsets (held = false, as a client does).
        let final_offsets: Vec<_> = a.assigned.iter().map(|q| released(q.queue_id, 20)).collect();
        let hb = [final_offsets.as_slice(), &[released(2, 21), released(3, 22)]].concat();
        let left = beat(&mut gt, &clock, "a", &hb, true);
        assert!(left.leaving);
        assert_eq!(left.commits, vec![(0, 20), (1, 20), (2, 21), (3, 22)]);
        assert!(left.assigned.is_empty() && left.granted.is_empty());
        assert!(gt.members().all(|(id, _)| id == "b"));
        let b = beat(&mut gt, &clock, "b", &[], false);
        assert_eq!(b.granted, vec![0, 1, 2, 3]);
        // The last member leaving leaves nothing to remember.
        let _ = beat(&mut gt, &clock, "b", &holding(&b, 0), true);
        assert!(gt.is_idle());
    }

    #[test]
    fn a_reset_reaches_the_holder_once_and_its_stale_commits_are_ignored_until_then() {
        let clock = Clock::settled();
        let mut gt = GroupTopic::default();
        let a = beat(&mut gt, &clock, "a", &[], false);
        assert_eq!(ids(&a), vec![0, 1, 2, 3]);
        // Queue 9 is held by nobody: no reset to deliver for it.
        gt.note_reset(&[(1, 100), (9, 5)]);
        assert!(!gt.is_idle());
        let d = beat(&mut gt, &clock, "a", &holding(&a, 50), false);
        assert_eq!(
            d.commits,
            vec![(0, 50), (2, 50), (3, 50)],
            "the reset queue keeps its offset"
        );
        assert_eq!(
            d.assigned,
            vec![
                Assigned {
                    queue_id: 0,
                    reset: None
                },
                Assigned {
                    queue_id: 1,
                    reset: Some(100)
                },
                Assigned {
                    queue_id: 2,
                    reset: None
                },
                Assigned {
                    queue_id: 3,
                    reset: None
                },
            ]
        );
        // Delivered once: the next heartbeat commits queue 1 again.
        let d = beat(&mut gt, &clock, "a", &holding(&d, 101), false);
        assert!(d.assigned.iter().all(|a| a.reset.is_none()));
        assert_eq!(d.commits, vec![(0, 101), (1, 101), (2, 101), (3, 101)]);
    }

    #[test]
    fn reports_are_bounded_by_the_topic_s_queue_count() {
        let many: Vec<_> = (0..20_000).map(|q| held(q, 0)).collect();
        assert_eq!(
            check_report(&many, QUEUES),
            Err(BadReport::TooMany {
                reported: 20_000,
                queues: QUEUES
            })
        );
        assert_eq!(
            check_report(&[held(0, 0), held(4, 0)], QUEUES),
            Err(BadReport::OutOfRange {
                queue_id: 4,
                queues: QUEUES
            })
        );
        assert_eq!(
            check_report(&[held(1, 0), released(1, 0)], QUEUES),
            Err(BadReport::Twice { queue_id: 1 })
        );
        assert_eq!(check_report(&[held(3, 0), held(0, 0)], QUEUES), Ok(()));
        // A queue the topic lost while the member held it can still be released.
        assert_eq!(check_report(&[held(0, 0), released(QUEUES + 3, 9)], QUEUES), Ok(()));
        assert_eq!(check_report(&[], 0), Ok(()));
        assert!(
            BadReport::OutOfRange {
                queue_id: 4,
                queues: QUEUES
            }
            .to_string()
            .contains("queue_id 4")
        );
    }
}
