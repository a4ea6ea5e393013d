//! In-process network faults, for tests: one [`Faults`] handle shared by the
//! replicas of a test cluster, consulted by the Raft transport before each
//! request leaves a node ([`crate::network`]) and by a layer in front of each
//! node's client-facing services ([`ClientFaultLayer`]). Faults switch on and
//! off while a test runs.
//!
//! Faults model what a real network does, silence rather than errors: a cut
//! link holds requests until the sender's own deadline fires, exactly like a
//! partition without resets; a paused node neither sends nor answers (its
//! connections stay open). Dropped messages are decided by a seeded generator,
//! so a failing run can be replayed from the seed it prints.
//!
//! Production nodes have no `Faults` (the config field is `None`), and the
//! transport then skips every check.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use raftmq_raft_store::NodeId;
use tokio::sync::watch;

/// What happens to one request on a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    Pass,
    /// Delivered after this long.
    Delay(Duration),
    /// Lost: the sender hears nothing.
    Drop,
}

#[derive(Debug, Default, Clone)]
struct State {
    /// Directed links `(from, to)` that carry nothing.
    cut: HashSet<(NodeId, NodeId)>,
    /// Directed links whose replication streams the receiver sees break, as when
    /// the connection is torn down (RST) rather than silenced.
    resets: HashSet<(NodeId, NodeId)>,
    /// Nodes that neither send nor answer.
    paused: HashSet<NodeId>,
    /// Fraction of Raft requests lost on every link, 0..=1.
    drop_rate: f64,
    /// Added to every Raft request.
    delay: Duration,
    /// Replies of the client API to drop after the request was served, per node.
    drop_client_replies: Vec<(NodeId, u32)>,
    rng: u64,
}

/// A switchboard of faults shared by every node of a test cluster.
#[derive(Clone)]
pub struct Faults {
    state: Arc<Mutex<State>>,
    /// Bumped on every change, so held requests wake when a fault is healed.
    changed: watch::Sender<u64>,
    seed: u64,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl Faults {
    /// No faults yet; `seed` drives the choice of dropped messages.
    pub fn new(seed: u64) -> Self {
        Faults {
            state: Arc::new(Mutex::new(State {
                // Spread nearby seeds apart; xorshift must not start at zero.
                rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
                ..State::default()
            })),
            changed: watch::channel(0).0,
            seed,
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.send_modify(|v| *v += 1);
    }

    fn read<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Nothing crosses between `a` and `b`, either way.
    pub fn partition(&self, a: &[NodeId], b: &[NodeId]) {
        self.update(|s| {
            for &x in a {
                for &y in b {
                    s.cut.insert((x, y));
                    s.cut.insert((y, x));
                }
            }
        });
    }

    /// `from`'s requests no longer reach `to`; `to`'s still reach `from`.
    pub fn cut_one_way(&self, from: NodeId, to: NodeId) {
        self.update(|s| {
            s.cut.insert((from, to));
        });
    }

    /// Cuts `node` off from every node in `others`, both ways.
    pub fn isolate(&self, node: NodeId, others: &[NodeId]) {
        self.partition(&[node], others);
    }

    /// Restores the links between `a` and `b`, both ways.
    pub fn mend(&self, a: NodeId, b: NodeId) {
        self.update(|s| {
            s.cut.remove(&(a, b));
            s.cut.remove(&(b, a));
        });
    }

    /// `to` sees replication streams from `from` break, now and whenever one is
    /// opened, until healed: what a follower sees of a connection torn down.
    pub fn reset_streams(&self, from: NodeId, to: NodeId) {
        self.update(|s| {
            s.resets.insert((from, to));
        });
    }

    /// Resolves while streams `from -> to` are to be reset.
    pub async fn reset_signalled(&self, from: NodeId, to: NodeId) {
        let mut changed = self.changed.subscribe();
        while !self.read(|s| s.resets.contains(&(from, to))) {
            if changed.changed().await.is_err() {
                futures::future::pending::<()>().await;
            }
        }
    }

    /// `node` stops sending and answering, its connections left open (SIGSTOP).
    pub fn pause(&self, node: NodeId) {
        self.update(|s| {
            s.paused.insert(node);
        });
    }

    pub fn resume(&self, node: NodeId) {
        self.update(|s| {
            s.paused.remove(&node);
        });
    }

    /// Loses this fraction of Raft requests on every link (0 turns it off).
    pub fn drop_fraction(&self, rate: f64) {
        self.update(|s| s.drop_rate = rate.clamp(0.0, 1.0));
    }

    /// Delays every Raft request by `delay` (zero turns it off).
    pub fn delay(&self, delay: Duration) {
        self.update(|s| s.delay = delay);
    }

    /// The next `count` client-API replies of `node` are lost after the request
    /// was served: the client cannot tell whether it took effect.
    pub fn drop_client_replies(&self, node: NodeId, count: u32) {
        self.update(|s| s.drop_client_replies.push((node, count)));
    }

    /// Every fault off.
    pub fn heal(&self) {
        self.update(|s| {
            s.cut.clear();
            s.resets.clear();
            s.paused.clear();
            s.drop_rate = 0.0;
            s.delay = Duration::ZERO;
            s.drop_client_replies.clear();
        });
    }

    fn blocked(s: &State, from: NodeId, to: NodeId) -> bool {
        s.cut.contains(&(from, to)) || s.paused.contains(&from) || s.paused.contains(&to)
    }

    /// Is the link `from -> to` open now (not cut, neither end paused)?
    pub fn link_open(&self, from: NodeId, to: NodeId) -> bool {
        self.read(|s| !Self::blocked(s, from, to))
    }

    /// The fate of one Raft request on `from -> to`, decided now.
    pub fn verdict(&self, from: NodeId, to: NodeId) -> Verdict {
        self.read(|s| {
            if Self::blocked(s, from, to) {
                return Verdict::Drop;
            }
            if s.drop_rate > 0.0 {
                // xorshift64: deterministic for a seed, good enough to pick losses.
                s.rng ^= s.rng << 13;
                s.rng ^= s.rng >> 7;
                s.rng ^= s.rng << 17;
                let uniform = (s.rng >> 11) as f64 / (1u64 << 53) as f64;
                if uniform < s.drop_rate {
                    return Verdict::Drop;
                }
            }
            if s.delay.is_zero() {
                Verdict::Pass
            } else {
                Verdict::Delay(s.delay)
            }
        })
    }

    /// Waits while `from -> to` is cut or an end is paused: a held request, like
    /// a TCP segment on a dead link, goes on only when the link comes back.
    pub async fn hold_while_blocked(&self, from: NodeId, to: NodeId) {
        let mut changed = self.changed.subscribe();
        while !self.link_open(from, to) {
            if changed.changed().await.is_err() {
                return;
            }
        }
    }

    /// Waits while `node` is paused.
    pub async fn hold_while_paused(&self, node: NodeId) {
        let mut changed = self.changed.subscribe();
        while self.read(|s| s.paused.contains(&node)) {
            if changed.changed().await.is_err() {
                return;
            }
        }
    }

    /// Takes one pending dropped client reply of `node`, if any.
    fn take_dropped_reply(&self, node: NodeId) -> bool {
        self.read(|s| {
            let Some(slot) = s.drop_client_replies.iter_mut().find(|(n, c)| *n == node && *c > 0) else {
                return false;
            };
            slot.1 -= 1;
            true
        })
    }
}

/// Puts [`Faults`] in front of one node's client-facing gRPC services: a paused
/// node holds requests until resumed, and a dropped reply is never sent (the
/// client's own deadline decides). Without faults (production) it adds nothing,
/// not even an allocation.
#[derive(Clone, Debug)]
pub struct ClientFaultLayer {
    pub faults: Option<Faults>,
    pub node: NodeId,
}

impl<S> tower::Layer<S> for ClientFaultLayer {
    type Service = ClientFaultService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientFaultService {
            inner,
            faults: self.faults.clone(),
            node: self.node,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ClientFaultService<S> {
    inner: S,
    faults: Option<Faults>,
    node: NodeId,
}

impl<S, B> tower::Service<http::Request<B>> for ClientFaultService<S>
where
    S: tower::Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        futures::future::Either<S::Future, futures::future::BoxFuture<'static, Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let Some(faults) = self.faults.clone() else {
            return futures::future::Either::Left(self.inner.call(req));
        };
        // The ready clone serves this call; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let node = self.node;
        futures::future::Either::Right(Box::pin(async move {
            faults.hold_while_paused(node).await;
            let response = inner.call(req).await;
            if faults.take_dropped_reply(node) {
                tracing::info!(node, "fault layer: dropping a client reply after serving it");
                futures::future::pending::<()>().await;
            }
            response
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_are_directed_and_heal() {
        let f = Faults::new(7);
        f.cut_one_way(1, 2);
        assert!(!f.link_open(1, 2));
        assert!(f.link_open(2, 1));
        f.isolate(3, &[1, 2]);
        assert!(!f.link_open(3, 1) && !f.link_open(2, 3));
        f.mend(3, 1);
        assert!(f.link_open(1, 3) && !f.link_open(3, 2));
        f.heal();
        assert!(f.link_open(1, 2) && f.link_open(3, 2));
    }

    #[test]
    fn a_paused_node_neither_sends_nor_answers() {
        let f = Faults::new(1);
        f.pause(2);
        assert_eq!(f.verdict(2, 1), Verdict::Drop);
        assert_eq!(f.verdict(1, 2), Verdict::Drop);
        assert_eq!(f.verdict(1, 3), Verdict::Pass);
        f.resume(2);
        assert_eq!(f.verdict(1, 2), Verdict::Pass);
    }

    #[test]
    fn drops_follow_the_rate_and_replay_from_the_seed() {
        let losses = |seed| {
            let f = Faults::new(seed);
            f.drop_fraction(0.3);
            (0..10_000)
                .map(|_| f.verdict(1, 2) == Verdict::Drop)
                .collect::<Vec<_>>()
        };
        let (a, b) = (losses(42), losses(42));
        assert!(a == b, "same seed, same losses");
        let rate = a.iter().filter(|d| **d).count() as f64 / a.len() as f64;
        assert!((0.27..0.33).contains(&rate), "{rate}");
        assert!(a != losses(43), "another seed, other losses");
    }

    #[tokio::test]
    async fn a_held_request_goes_on_when_the_link_heals() {
        let f = Faults::new(1);
        f.partition(&[1], &[2]);
        let held = tokio::spawn({
            let f = f.clone();
            async move { f.hold_while_blocked(1, 2).await }
        });
        tokio::task::yield_now().await;
        assert!(!held.is_finished());
        f.heal();
        tokio::time::timeout(Duration::from_secs(5), held)
            .await
            .expect("released on heal")
            .expect("task");
    }
}
