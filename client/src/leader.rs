//! Finding and following a broker group's leader: the one retry policy behind
//! every client call that must reach a leader (producer sends, pulls,
//! consumer-group heartbeats, admin calls). It owns the route-cache use, the
//! `NOT_LEADER` redirects, the short memory of dead endpoints, asking the
//! surviving replicas who leads, backoff, and both deadlines (per request and
//! per call). Callers only say which group they want and what to run on it.
//!
//! The decisions are in [`Chase`], which does no I/O and is unit-tested here;
//! [`follow`] runs it against the network.
//!
//! The policy, and why:
//! * A call goes to the group's leader: one a replica just named (a redirect) if
//!   any, else the route's. Replicas answer `NOT_LEADER` with the leader's
//!   endpoint from their own Raft state, fresher than any NameServer, so a
//!   redirect is followed at once and written into the route cache.
//! * An endpoint that fails without answering (reset, refused, no answer within
//!   `request_timeout`, UNAVAILABLE) is remembered as dead for [`DEAD_FOR`] by
//!   every call of the client. Redialling it would only fail again (or hang, if
//!   it is paused); the group's other replicas are asked who leads instead, the
//!   first one at once, then with a short backoff. They name the new leader as
//!   soon as they have elected one.
//! * A replica that has not noticed the death yet still names the dead endpoint.
//!   That is not followed: it means "no new leader yet", so the call waits
//!   briefly and asks again. Once the dead mark expires (longer than an
//!   election takes) the endpoint is tried again, so a leader that was only slow,
//!   and that its replicas therefore keep naming, is not shunned for long.
//! * When a round of asking has named no usable leader, the route is fetched
//!   again (the NameServers may know better, e.g. after a membership change).
//! * Everything is bounded: each request by `request_timeout` (plus the long-poll
//!   wait of a pull), the whole call by its deadline. Errors that retrying cannot
//!   fix (bad input, unknown group) are returned at once and unwrapped.
//! * A call that may use any group of the topic ([`Target::AnyGroup`]: unkeyed
//!   sends) moves to another group when its group has no reachable leader
//!   (every replica failed, or they answer that none leads), and the group is
//!   isolated for [`GROUP_FAULT_FOR`] in the client's [`GroupFaults`], which
//!   such calls' picks skip (RocketMQ's `sendLatencyFaultEnable`). If an attempt
//!   on the group may have been stored (no answer), the call first gives the
//!   group [`SWITCH_AFTER_UNKNOWN`] to elect a leader, which would answer the
//!   retry from its idempotence window; moving on after that may store the
//!   message twice (at-least-once), which is better than failing it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use raftmq_proto::v1 as pb;
use raftmq_proto::v1::admin_service_client::AdminServiceClient;

use crate::error::Error;
use crate::route::{Core, TopicRoute};

/// How long an endpoint that failed stays skipped. Longer than an election
/// (brokers' default election timeout is 200-400 ms, plus a vote round) so that
/// its replicas have moved on by the time it is tried again; short enough that a
/// leader that was merely slow for one request gets traffic back within a second.
pub(crate) const DEAD_FOR: Duration = Duration::from_secs(1);

/// How long a request to the leader waits before its replicas are asked whether
/// they still follow it. Well above a healthy answer (about a millisecond; tens
/// for a large fsynced batch), well below an election (the lease, 400 ms by
/// default, plus 200-400 ms), so asking costs nothing while the leader is well.
pub(crate) const HEDGE_AFTER: Duration = Duration::from_millis(250);

/// How often the replicas of a silent endpoint are asked, per client.
pub(crate) const HEDGE_EVERY: Duration = Duration::from_millis(50);

/// How long a broker group that had no reachable leader is skipped by calls that
/// may use any group (unkeyed sends). A few seconds: long enough that a dead
/// group costs one failed attempt per few seconds rather than one per send, short
/// enough that a group that recovered (an election takes about a second) gets
/// traffic back soon. A success on the group ends it at once.
pub(crate) const GROUP_FAULT_FOR: Duration = Duration::from_secs(3);

/// After an attempt whose outcome is unknown (no answer: it may have been
/// stored), how long a call that may use any group keeps to its group before
/// moving on. About an election: a group that lost only its leader names a new
/// one within it, and the retry there is deduplicated; a group that lost its
/// majority never will.
pub(crate) const SWITCH_AFTER_UNKNOWN: Duration = Duration::from_secs(1);

/// Redirects followed back to back without a pause: two stale replicas naming
/// each other must not spin.
const MAX_HOPS: u32 = 3;

/// Pause before asking again after an answer that named no usable leader:
/// 10 ms doubling to a 50 ms cap. An election takes a few hundred milliseconds and
/// each answer meanwhile costs about one, so a longer pause only adds its own
/// length to the failover a caller sees.
pub(crate) fn backoff(pauses: u32) -> Duration {
    Duration::from_millis(10u64 << pauses.min(3)).min(Duration::from_millis(50))
}

/// Endpoints that failed recently, shared by every call of one client so that
/// concurrent sends learn of a dead leader from the first one that meets it.
#[derive(Default)]
pub(crate) struct DeadSet {
    until: Mutex<HashMap<String, Instant>>,
}

impl DeadSet {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // Plain data: a panic elsewhere cannot leave it half-updated.
        self.until.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn mark(&self, endpoint: &str, now: Instant) {
        self.lock().insert(endpoint.to_owned(), now + DEAD_FOR);
    }

    /// It answered: whatever it said, it is alive.
    pub(crate) fn revive(&self, endpoint: &str) {
        let mut map = self.lock();
        if !map.is_empty() {
            map.remove(endpoint);
        }
    }

    pub(crate) fn is_dead(&self, endpoint: &str, now: Instant) -> bool {
        let mut map = self.lock();
        match map.get(endpoint) {
            Some(until) if *until > now => true,
            Some(_) => {
                map.remove(endpoint);
                false
            }
            None => false,
        }
    }
}

/// Broker groups that recently had no reachable leader, shared by every call of
/// one client: calls that may use any group skip them until the mark expires or
/// a call succeeds on the group.
#[derive(Default)]
pub(crate) struct GroupFaults {
    until: Mutex<HashMap<String, Instant>>,
}

impl GroupFaults {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // Plain data: a panic elsewhere cannot leave it half-updated.
        self.until.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn isolate(&self, group: &str, now: Instant) {
        self.lock().insert(group.to_owned(), now + GROUP_FAULT_FOR);
    }

    /// A call succeeded on it: it has a leader again.
    pub(crate) fn clear(&self, group: &str) {
        let mut map = self.lock();
        if !map.is_empty() {
            map.remove(group);
        }
    }

    pub(crate) fn is_isolated(&self, group: &str, now: Instant) -> bool {
        let mut map = self.lock();
        match map.get(group) {
            Some(until) if *until > now => true,
            Some(_) => {
                map.remove(group);
                false
            }
            None => false,
        }
    }
}

/// What the replicas of slow endpoints said about who leads, shared by every
/// call of one client so that a silent leader with many requests waiting on it
/// costs one question per [`HEDGE_EVERY`], not one per request.
#[derive(Default)]
pub(crate) struct Hedges {
    /// endpoint -> (when last asked, the leader the answer named instead of it)
    asked: Mutex<HashMap<String, (Instant, Option<String>)>>,
}

impl Hedges {
    /// Another leader a replica named for `endpoint` within the last two
    /// [`HEDGE_EVERY`], or `Ok(None)` if this caller should ask now (nobody
    /// asked recently), or `Err(())` to wait for the caller that does.
    fn check(&self, endpoint: &str, now: Instant) -> Result<Option<String>, ()> {
        let mut map = self.asked.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(endpoint) {
            Some((at, Some(moved))) if now.duration_since(*at) < HEDGE_EVERY * 2 => Ok(Some(moved.clone())),
            Some((at, _)) if now.duration_since(*at) < HEDGE_EVERY => Err(()),
            _ => {
                map.insert(endpoint.to_owned(), (now, None));
                Ok(None)
            }
        }
    }

    fn record(&self, endpoint: &str, at: Instant, moved: Option<String>) {
        let mut map = self.asked.lock().unwrap_or_else(PoisonError::into_inner);
        map.insert(endpoint.to_owned(), (at, moved));
    }
}

/// Resolves when the replicas of `group` name a leader other than `endpoint`
/// (which has not answered for [`HEDGE_AFTER`]); never while they still follow it.
async fn leader_moved(core: &Core, group: &pb::GroupRoute, endpoint: &str) -> String {
    tokio::time::sleep(HEDGE_AFTER).await;
    let mut turn = 0usize;
    loop {
        let now = Instant::now();
        match core.hedges.check(endpoint, now) {
            Ok(Some(moved)) => return moved,
            Err(()) => {}
            Ok(None) => {
                let replicas: Vec<&String> = std::iter::once(&group.leader_endpoint)
                    .chain(&group.follower_endpoints)
                    .filter(|e| !e.is_empty() && e.as_str() != endpoint && !core.dead.is_dead(e, now))
                    .collect();
                if !replicas.is_empty() {
                    let asked = replicas[turn % replicas.len()];
                    turn += 1;
                    let answer = ask_who_leads(core, asked, &group.broker_group, HEDGE_EVERY * 4).await;
                    let moved = answer
                        .redirect()
                        .filter(|l| !l.is_empty() && *l != endpoint)
                        .map(str::to_owned);
                    core.hedges.record(endpoint, now, moved.clone());
                    if let Some(moved) = moved {
                        tracing::debug!(silent = %endpoint, leader = %moved, "replicas of a silent endpoint name another leader");
                        return moved;
                    }
                }
            }
        }
        tokio::time::sleep(HEDGE_EVERY).await;
    }
}

/// What a failed attempt says about where the leader is; `None` from
/// [`Answer::of`] means the request itself is at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// `NOT_LEADER` naming this endpoint (or a replica reporting it leads).
    Redirect(String),
    /// `NOT_LEADER` from a replica that knows no leader: mid-election.
    Leaderless,
    /// No usable answer: the connection broke or was refused, nothing came back
    /// within the request's deadline, or the node cannot serve now (UNAVAILABLE).
    Unreachable,
}

impl Answer {
    pub(crate) fn of(e: &Error) -> Option<Answer> {
        if let Some(leader) = e.redirect() {
            Some(Answer::Redirect(leader.to_owned()))
        } else if e.leaderless() {
            Some(Answer::Leaderless)
        } else if e.is_retriable() {
            Some(Answer::Unreachable)
        } else {
            None
        }
    }
}

/// The next endpoint to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Dial {
    pub(crate) endpoint: String,
    /// Believed to lead (a redirect's target or the route's leader); false for a
    /// follower asked because no leader is usable.
    pub(crate) leader: bool,
}

/// What to do after an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Verdict {
    /// Before the next attempt (zero: at once).
    pub(crate) pause: Duration,
    /// Fetch the route from a NameServer before the next attempt.
    pub(crate) refresh: bool,
}

/// One call's pursuit of a group's leader: the decisions, without I/O. `dead`
/// says whether an endpoint is in the client's dead set now.
#[derive(Debug, Default)]
pub(crate) struct Chase {
    /// A leader a replica named, tried before the route's.
    redirect: Option<String>,
    /// Redirects followed back to back.
    hops: u32,
    /// Rotation over the followers asked.
    asked: usize,
    /// Pauses so far (the backoff's exponent).
    pauses: u32,
    /// The one immediate follower query after a failure has been spent.
    prompt_spent: bool,
    /// Answers since the last route refresh that named no usable leader.
    fruitless: usize,
}

impl Chase {
    /// Whom to dial, or `None` when every replica of `group` is dead (then wait
    /// with [`Chase::stuck`]).
    pub(crate) fn next(&mut self, group: &pb::GroupRoute, dead: impl Fn(&str) -> bool) -> Option<Dial> {
        if let Some(r) = &self.redirect {
            if !dead(r) {
                return Some(Dial {
                    endpoint: r.clone(),
                    leader: true,
                });
            }
            self.redirect = None;
        }
        let leader = group.leader_endpoint.as_str();
        if !leader.is_empty() && !dead(leader) {
            return Some(Dial {
                endpoint: leader.to_owned(),
                leader: true,
            });
        }
        let alive: Vec<&String> = group
            .follower_endpoints
            .iter()
            .filter(|f| !f.is_empty() && f.as_str() != leader && !dead(f))
            .collect();
        if alive.is_empty() {
            return None;
        }
        let pick = alive[self.asked % alive.len()].clone();
        self.asked += 1;
        Some(Dial {
            endpoint: pick,
            leader: false,
        })
    }

    /// Nobody to dial: wait, and ask the NameServers for a fresher route.
    pub(crate) fn stuck(&mut self) -> Verdict {
        self.fruitless = 0;
        Verdict {
            pause: self.pause(),
            refresh: true,
        }
    }

    /// Digests the failed attempt `dial` answered with `answer`. The caller marks
    /// an unreachable endpoint dead before asking, so `dead` already counts it.
    pub(crate) fn observe(
        &mut self,
        dial: &Dial,
        answer: &Answer,
        group: &pb::GroupRoute,
        dead: impl Fn(&str) -> bool,
    ) -> Verdict {
        let pause = match answer {
            Answer::Redirect(to) if !dead(to) => {
                self.redirect = Some(to.clone());
                self.hops += 1;
                if self.hops <= MAX_HOPS {
                    Duration::ZERO
                } else {
                    self.hops = 0;
                    self.pause()
                }
            }
            // Named a dead endpoint: this replica has not noticed yet. Not a
            // redirect: wait and ask again (another replica, in turn).
            Answer::Redirect(_) | Answer::Leaderless => {
                self.hops = 0;
                self.fruitless += 1;
                self.pause()
            }
            Answer::Unreachable => {
                self.hops = 0;
                self.fruitless += 1;
                if self.redirect.as_deref() == Some(dial.endpoint.as_str()) {
                    self.redirect = None;
                }
                if self.prompt_spent {
                    self.pause()
                } else {
                    // Its replicas may know the new leader already: ask one now.
                    self.prompt_spent = true;
                    Duration::ZERO
                }
            }
        };
        let replicas = 1 + group.follower_endpoints.len();
        let refresh = self.fruitless >= replicas;
        if refresh {
            self.fruitless = 0;
        }
        Verdict { pause, refresh }
    }

    fn pause(&mut self) -> Duration {
        let p = backoff(self.pauses);
        self.pauses += 1;
        p
    }
}

/// How a group's followers take part in a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Followers {
    /// A follower refuses the call with `NOT_LEADER` naming the leader (sends,
    /// heartbeats): asking a follower is making the call there, and if it leads
    /// by now it simply serves it.
    Redirect,
    /// A follower would serve the call from its own, possibly older, state
    /// (pulls, admin reads): the call goes only to the leader, and followers are
    /// asked who leads with `ClusterStatus`, which every replica answers.
    Ask,
}

/// How one call is bounded and what it is called in errors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spec<'a> {
    /// Named in [`Error::DeadlineExceeded`] (the topic; empty for admin calls).
    pub(crate) label: &'a str,
    /// The whole call, retries included.
    pub(crate) deadline: Duration,
    /// How long the server may hold one request before answering (a pull's long
    /// poll), on top of `request_timeout`. Shrinks near the deadline, so the server
    /// answers before the client gives up on it.
    pub(crate) long_poll: Duration,
    pub(crate) followers: Followers,
}

/// Which group a call wants.
pub(crate) enum Target<'a, P> {
    /// Chosen in `topic`'s route (cached, refreshed as the policy says) by `pick`,
    /// again for every attempt, so a refreshed route is used at once. `pick` also
    /// returns what the request needs of the choice (a producer's queue).
    Topic { topic: &'a str, pick: P },
    /// As `Topic`, for a call that may use any group of the topic (an unkeyed
    /// send): when the chosen group has no reachable leader it is isolated in the
    /// client's [`GroupFaults`] and `pick` is asked again, which must then skip
    /// isolated groups while others remain.
    AnyGroup { topic: &'a str, pick: P },
    /// A group the caller already knows (admin calls, from `ListCluster`).
    Group(pb::GroupRoute),
}

/// One attempt, as the request builder sees it.
pub(crate) struct Attempt<C> {
    pub(crate) channel: crate::route::RpcChannel,
    /// What `pick` returned for this attempt.
    pub(crate) choice: C,
    /// The server-side wait this attempt may ask for (see [`Spec::long_poll`]).
    pub(crate) long_poll: Duration,
}

/// A successful call.
pub(crate) struct Served<T> {
    pub(crate) value: T,
    /// The endpoint that answered.
    pub(crate) endpoint: String,
    pub(crate) group: String,
    /// The route used was provisional (no NameServer knew the topic yet).
    pub(crate) provisional: bool,
}

type Pick<C> = fn(&TopicRoute) -> Result<(pb::GroupRoute, C), Error>;

/// [`follow`] for a group the caller already knows.
pub(crate) async fn follow_group<T, F, Fut>(
    core: &Core,
    spec: Spec<'_>,
    group: pb::GroupRoute,
    op: F,
) -> Result<Served<T>, Error>
where
    F: FnMut(Attempt<()>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    follow::<T, (), Pick<()>, F, Fut>(core, spec, Target::Group(group), op).await
}

/// Runs `op` on the leader of the group `target` names, with the module's policy.
pub(crate) async fn follow<T, C, P, F, Fut>(
    core: &Core,
    spec: Spec<'_>,
    target: Target<'_, P>,
    mut op: F,
) -> Result<Served<T>, Error>
where
    C: Clone + Default,
    P: Fn(&TopicRoute) -> Result<(pb::GroupRoute, C), Error>,
    F: FnMut(Attempt<C>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let started = Instant::now();
    let deadline = started + spec.deadline;
    let request_timeout = core.config.request_timeout;
    let topic = match &target {
        Target::Topic { topic, .. } | Target::AnyGroup { topic, .. } => Some(*topic),
        Target::Group(_) => None,
    };
    let may_move = matches!(target, Target::AnyGroup { .. });
    let mut chase = Chase::default();
    // The group the chase is for: a chase's redirects and dead ends belong to one
    // group, so a different pick (another group, or a refreshed route) starts a
    // new one.
    let mut chased: Option<String> = None;
    // When an attempt on the chased group first ended without an answer (it may
    // have been stored there).
    let mut unknown_since: Option<Instant> = None;
    let mut attempts = 0u32;
    // What the last broker answered: a user given up on learns more from "the
    // node cannot reach a quorum" than from the NameServer lookups that followed.
    let mut last_broker: Option<Error> = None;
    loop {
        let mut from_broker = false;
        let mut abandoned = false;
        let (verdict, last) = 'attempt: {
            let (group, choice, provisional, route) = match &target {
                Target::Group(g) => (g.clone(), C::default(), false, None),
                Target::Topic { topic, pick } | Target::AnyGroup { topic, pick } => {
                    match core.route(topic).await.and_then(|r| {
                        let (g, c) = pick(&r)?;
                        Ok((g, c, r.provisional, Some(r)))
                    }) {
                        Ok(chosen) => chosen,
                        Err(e) if e.is_retriable() => {
                            attempts += 1;
                            break 'attempt (chase.stuck(), e);
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            if chased.as_deref() != Some(group.broker_group.as_str()) {
                if chased.is_some() {
                    chase = Chase::default();
                    unknown_since = None;
                }
                chased = Some(group.broker_group.clone());
            }
            // Moves a call that may use any group off `group`, which has no
            // reachable leader: isolates it and, if the pick then names another
            // group, retries there at once.
            let move_on = |now: Instant, unknown_since: Option<Instant>| -> bool {
                if !may_move || unknown_since.is_some_and(|t| now.duration_since(t) < SWITCH_AFTER_UNKNOWN) {
                    return false;
                }
                let Target::AnyGroup { pick, .. } = &target else {
                    return false;
                };
                core.faults.isolate(&group.broker_group, now);
                let moved = route
                    .as_ref()
                    .and_then(|r| pick(r).ok())
                    .is_some_and(|(g, _)| g.broker_group != group.broker_group);
                if moved {
                    tracing::info!(broker_group = %group.broker_group, "no reachable leader; moving the send to another broker group");
                }
                moved
            };
            let now = Instant::now();
            let Some(dial) = chase.next(&group, |e| core.dead.is_dead(e, now)) else {
                let e = Error::NoRoute {
                    topic: spec.label.to_owned(),
                    reason: format!(
                        "every replica of broker group {} failed within the last {DEAD_FOR:?}",
                        group.broker_group
                    ),
                };
                if move_on(now, unknown_since) {
                    break 'attempt (Verdict::default(), e);
                }
                break 'attempt (chase.stuck(), e);
            };
            attempts += 1;
            let remaining = deadline.saturating_duration_since(now);
            // A request the call's deadline cut short proves nothing when it times
            // out: only one given its whole `request_timeout` may mark a node dead.
            let mut cut_short = request_timeout > remaining;
            let result = if dial.leader || spec.followers == Followers::Redirect {
                let long_poll = spec.long_poll.min(remaining.saturating_sub(request_timeout));
                cut_short |= long_poll < spec.long_poll;
                let timeout = (request_timeout + long_poll).min(remaining);
                let choice = choice.clone();
                let call = core.call(&dial.endpoint, timeout, |channel| {
                    op(Attempt {
                        channel,
                        choice,
                        long_poll,
                    })
                });
                if long_poll.is_zero() {
                    // A long poll is slow on purpose; any other wait past
                    // HEDGE_AFTER asks the replicas whether the leader moved.
                    // Abandoning answers like NOT_LEADER naming the new leader.
                    tokio::select! {
                        result = call => result,
                        moved = leader_moved(core, &group, &dial.endpoint) => Err({
                            abandoned = true;
                            Error::Rpc {
                            endpoint: dial.endpoint.clone(),
                            code: tonic::Code::FailedPrecondition,
                            message: format!(
                                "no answer within {HEDGE_AFTER:?} and its replicas now follow {moved}; \
                                 the request was abandoned, its outcome unknown"
                            ),
                            leader: Some(moved),
                        }}),
                    }
                } else {
                    call.await
                }
            } else {
                Err(ask_who_leads(
                    core,
                    &dial.endpoint,
                    &group.broker_group,
                    request_timeout.min(remaining),
                )
                .await)
            };
            let e = match result {
                Ok(value) => {
                    core.dead.revive(&dial.endpoint);
                    core.faults.clear(&group.broker_group);
                    if let Some(topic) = topic
                        && dial.endpoint != group.leader_endpoint
                    {
                        core.routes.set_leader(topic, &group.broker_group, &dial.endpoint);
                    }
                    return Ok(Served {
                        value,
                        endpoint: dial.endpoint,
                        group: group.broker_group,
                        provisional,
                    });
                }
                Err(e) => e,
            };
            let Some(answer) = Answer::of(&e) else {
                return Err(e);
            };
            let now = Instant::now();
            match &answer {
                Answer::Unreachable if cut_short && matches!(e, Error::Timeout { .. }) => {}
                Answer::Unreachable => {
                    tracing::debug!(endpoint = %dial.endpoint, error = %e, "endpoint failed; asking its replicas who leads");
                    core.dead.mark(&dial.endpoint, now);
                }
                Answer::Redirect(to) => {
                    core.dead.revive(&dial.endpoint);
                    if let Some(topic) = topic
                        && !core.dead.is_dead(to, now)
                    {
                        tracing::debug!(from = %dial.endpoint, to = %to, "not leader; redirecting");
                        core.routes.set_leader(topic, &group.broker_group, to);
                    }
                }
                Answer::Leaderless => core.dead.revive(&dial.endpoint),
            }
            if abandoned {
                // Silent, not redirecting: other calls must not wait on it either.
                core.dead.mark(&dial.endpoint, now);
            }
            from_broker = true;
            let leaderless = match &answer {
                Answer::Unreachable => {
                    // A refused connection carried nothing; anything else may have
                    // reached the leader and been stored.
                    if !never_sent(&e) {
                        unknown_since.get_or_insert(now);
                    }
                    // A group only lacks a leader when none of its replicas is
                    // left to elect one; otherwise the chase asks them.
                    std::iter::once(&group.leader_endpoint)
                        .chain(&group.follower_endpoints)
                        .all(|r| r.is_empty() || core.dead.is_dead(r, now))
                }
                Answer::Leaderless => true,
                Answer::Redirect(to) => core.dead.is_dead(to, now),
            };
            if abandoned {
                unknown_since.get_or_insert(now);
            }
            if leaderless && move_on(now, unknown_since) {
                break 'attempt (Verdict::default(), e);
            }
            (chase.observe(&dial, &answer, &group, |e| core.dead.is_dead(e, now)), e)
        };
        if verdict.refresh
            && let Some(topic) = topic
        {
            core.routes.invalidate(topic);
        }
        if Instant::now() + verdict.pause >= deadline {
            let last = match last_broker {
                Some(broker) if !from_broker => broker,
                _ => last,
            };
            return Err(Error::DeadlineExceeded {
                topic: spec.label.to_owned(),
                attempts,
                elapsed: started.elapsed(),
                last: Box::new(last),
            });
        }
        if !verdict.pause.is_zero() {
            tracing::debug!(error = %last, attempt = attempts, pause = ?verdict.pause, "retrying");
            tokio::time::sleep(verdict.pause).await;
        }
        if from_broker {
            last_broker = Some(last);
        }
    }
}

/// The request failed before reaching the server: the connection was refused or
/// could not be made, so nothing was sent. (tonic reports connect failures as
/// UNAVAILABLE with the connector's message.)
fn never_sent(e: &Error) -> bool {
    match e {
        Error::Rpc {
            code: tonic::Code::Unavailable,
            message,
            ..
        } => {
            let m = message.to_ascii_lowercase();
            m.contains("connection refused") || m.contains("tcp connect error") || m.contains("error trying to connect")
        }
        _ => false,
    }
}

/// Asks `endpoint`, a replica of `group`, who leads. The answer is shaped like
/// the `NOT_LEADER` error a write would have got, so one classification serves
/// both: a redirect to the leader it names (itself, if it leads now), or a
/// leaderless answer. Any failure of the question itself counts as unreachable.
async fn ask_who_leads(core: &Core, endpoint: &str, group: &str, timeout: Duration) -> Error {
    let status = core
        .call(endpoint, timeout, |ch| async move {
            AdminServiceClient::new(ch)
                .cluster_status(pb::ClusterStatusRequest {})
                .await
        })
        .await;
    let leader = match status {
        Ok(resp) => resp
            .groups
            .into_iter()
            .find(|g| g.broker_group == group)
            .map(|g| g.leader_endpoint)
            .unwrap_or_default(),
        Err(e) if Answer::of(&e).is_some() => return e,
        Err(e) => {
            return Error::Rpc {
                endpoint: endpoint.to_owned(),
                code: tonic::Code::Unavailable,
                message: format!("cannot ask it who leads: {e}"),
                leader: None,
            };
        }
    };
    Error::Rpc {
        endpoint: endpoint.to_owned(),
        code: tonic::Code::FailedPrecondition,
        message: "not leader".into(),
        leader: Some(leader),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(leader: &str, followers: &[&str]) -> pb::GroupRoute {
        pb::GroupRoute {
            broker_group: "g".into(),
            leader_endpoint: leader.into(),
            follower_endpoints: followers.iter().map(|f| (*f).to_owned()).collect(),
            queues: 1,
            perm: 6,
            message_type: 0,
        }
    }

    fn dead_set(dead: &[&str]) -> impl Fn(&str) -> bool {
        let dead: Vec<String> = dead.iter().map(|d| (*d).to_owned()).collect();
        move |e| dead.iter().any(|d| d == e)
    }

    fn dial(endpoint: &str, leader: bool) -> Dial {
        Dial {
            endpoint: endpoint.into(),
            leader,
        }
    }

    #[test]
    fn dials_the_route_leader_while_it_is_alive() {
        let g = group("l", &["f1", "f2"]);
        let mut c = Chase::default();
        assert_eq!(c.next(&g, dead_set(&[])), Some(dial("l", true)));
        assert_eq!(c.next(&g, dead_set(&[])), Some(dial("l", true)));
    }

    #[test]
    fn a_dead_leader_sends_the_next_attempt_at_once_to_its_followers_in_turn() {
        let g = group("l", &["f1", "f2"]);
        let dead = dead_set(&["l"]);
        let mut c = Chase::default();
        let v = c.observe(&dial("l", true), &Answer::Unreachable, &g, &dead);
        assert_eq!(v.pause, Duration::ZERO, "the first follower is asked at once");
        assert_eq!(c.next(&g, &dead), Some(dial("f1", false)));
        // f1 has not noticed: it names the dead leader. Not followed; wait, then f2.
        let v = c.observe(&dial("f1", false), &Answer::Redirect("l".into()), &g, &dead);
        assert!(v.pause >= Duration::from_millis(10), "{v:?}");
        assert_eq!(c.next(&g, &dead), Some(dial("f2", false)));
        // f2 knows the new leader: follow it at once, as a leader.
        let v = c.observe(&dial("f2", false), &Answer::Redirect("f1".into()), &g, &dead);
        assert_eq!(v.pause, Duration::ZERO);
        assert_eq!(c.next(&g, &dead), Some(dial("f1", true)));
    }

    #[test]
    fn never_redirects_back_to_an_endpoint_that_just_failed() {
        let g = group("f1", &["l", "f2"]);
        let mut c = Chase::default();
        // A stale route names f1; f1 redirects to l; l is unreachable.
        let v = c.observe(&dial("f1", true), &Answer::Redirect("l".into()), &g, dead_set(&[]));
        assert_eq!(v.pause, Duration::ZERO);
        assert_eq!(c.next(&g, dead_set(&[])), Some(dial("l", true)));
        let dead = dead_set(&["l"]);
        c.observe(&dial("l", true), &Answer::Unreachable, &g, &dead);
        // Back to the route's leader f1, which names l again: no redial of l.
        assert_eq!(c.next(&g, &dead), Some(dial("f1", true)));
        let v = c.observe(&dial("f1", true), &Answer::Redirect("l".into()), &g, &dead);
        assert!(!v.pause.is_zero());
        assert_ne!(c.next(&g, &dead).map(|d| d.endpoint), Some("l".to_owned()));
        // Once l's dead mark expires and its replicas still name it, it is tried again.
        let v = c.observe(&dial("f1", true), &Answer::Redirect("l".into()), &g, dead_set(&[]));
        assert!(v.pause.is_zero());
        assert_eq!(c.next(&g, dead_set(&[])), Some(dial("l", true)));
    }

    #[test]
    fn only_the_first_follower_query_after_a_failure_is_immediate() {
        let g = group("l", &["f1", "f2"]);
        let mut c = Chase::default();
        let v1 = c.observe(&dial("l", true), &Answer::Unreachable, &g, dead_set(&["l"]));
        let v2 = c.observe(&dial("f1", false), &Answer::Unreachable, &g, dead_set(&["l", "f1"]));
        assert_eq!(v1.pause, Duration::ZERO);
        assert_eq!(v2.pause, Duration::from_millis(10));
        assert_eq!(c.next(&g, dead_set(&["l", "f1"])), Some(dial("f2", false)));
    }

    #[test]
    fn every_replica_dead_means_wait_and_refresh_the_route() {
        let g = group("l", &["f1"]);
        let mut c = Chase::default();
        assert_eq!(c.next(&g, dead_set(&["l", "f1"])), None);
        let v = c.stuck();
        assert!(v.refresh && !v.pause.is_zero());
    }

    #[test]
    fn a_round_of_answers_naming_no_leader_refreshes_the_route_once() {
        let g = group("l", &["f1", "f2"]);
        let mut c = Chase::default();
        let none = dead_set(&[]);
        let refreshes: Vec<bool> = (0..6)
            .map(|_| c.observe(&dial("f1", false), &Answer::Leaderless, &g, &none).refresh)
            .collect();
        assert_eq!(refreshes, [false, false, true, false, false, true]);
    }

    #[test]
    fn redirect_ping_pong_is_paused_after_a_few_hops() {
        let g = group("a", &["b"]);
        let mut c = Chase::default();
        let none = dead_set(&[]);
        let pauses: Vec<bool> = (0..5)
            .map(|i| {
                let (from, to) = if i % 2 == 0 { ("a", "b") } else { ("b", "a") };
                !c.observe(&dial(from, true), &Answer::Redirect(to.into()), &g, &none)
                    .pause
                    .is_zero()
            })
            .collect();
        assert_eq!(pauses, [false, false, false, true, false]);
    }

    #[test]
    fn backoff_starts_short_and_is_capped() {
        let p: Vec<u64> = (0..6).map(|i| backoff(i).as_millis() as u64).collect();
        assert_eq!(p, [10, 20, 40, 50, 50, 50]);
    }

    #[test]
    fn the_dead_set_forgets_after_a_while_and_on_any_answer() {
        let d = DeadSet::default();
        let t = Instant::now();
        d.mark("a", t);
        assert!(d.is_dead("a", t));
        assert!(!d.is_dead("a", t + DEAD_FOR));
        d.mark("a", t);
        d.revive("a");
        assert!(!d.is_dead("a", t));
        assert!(!d.is_dead("b", t));
    }

    #[test]
    fn an_isolated_group_is_skipped_until_the_mark_expires_or_a_call_succeeds() {
        let f = GroupFaults::default();
        let t = Instant::now();
        f.isolate("b", t);
        assert!(f.is_isolated("b", t));
        assert!(!f.is_isolated("a", t));
        assert!(!f.is_isolated("b", t + GROUP_FAULT_FOR));
        f.isolate("b", t);
        f.clear("b");
        assert!(!f.is_isolated("b", t));
    }

    #[test]
    fn only_a_connection_never_made_counts_as_never_sent() {
        let unavailable = |message: &str| Error::Rpc {
            endpoint: "e".into(),
            code: tonic::Code::Unavailable,
            message: message.into(),
            leader: None,
        };
        assert!(never_sent(&unavailable("tcp connect error")));
        assert!(never_sent(&unavailable("error trying to connect: Connection refused")));
        assert!(!never_sent(&unavailable("connection reset")));
        assert!(!never_sent(&unavailable("h2 protocol error: stream closed")));
        let timeout = Error::Timeout {
            endpoint: "e".into(),
            timeout: Duration::from_secs(1),
        };
        assert!(!never_sent(&timeout), "a timed-out request may have been stored");
    }

    #[test]
    fn answers_classify_errors() {
        let rpc = |code, leader: Option<&str>| Error::Rpc {
            endpoint: "e".into(),
            code,
            message: String::new(),
            leader: leader.map(str::to_owned),
        };
        assert_eq!(
            Answer::of(&rpc(tonic::Code::FailedPrecondition, Some("l"))),
            Some(Answer::Redirect("l".into()))
        );
        assert_eq!(
            Answer::of(&rpc(tonic::Code::FailedPrecondition, Some(""))),
            Some(Answer::Leaderless)
        );
        assert_eq!(
            Answer::of(&rpc(tonic::Code::Unavailable, None)),
            Some(Answer::Unreachable)
        );
        let timeout = Error::Timeout {
            endpoint: "e".into(),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(Answer::of(&timeout), Some(Answer::Unreachable));
        assert_eq!(Answer::of(&rpc(tonic::Code::FailedPrecondition, None)), None);
        assert_eq!(Answer::of(&rpc(tonic::Code::InvalidArgument, None)), None);
    }
}
