//! Faults a test can put into a running node process: answers lost after the call was
//! carried out, the case a client's retry must survive.
//!
//! The simulator loses answers at will; a real cluster over HTTP only loses them when a
//! node dies at the wrong instant. So a node started with `SYNCMESH_FAULT_INJECTION=1`
//! serves two more admin endpoints: `POST /fault/hold-answers` makes the node hold back
//! its answer to the next proposal it is asked, and to every repeat of that very request
//! (a retry sends the same bytes), until `POST /fault/lose-held`, which resets those
//! streams unanswered. The calls themselves are carried out as usual; only their answers
//! go missing. `POST /fault/isolate` cuts the node off from its peers (every Raft message
//! in or out is dropped; clients still reach it) until `POST /fault/heal`: a node that is
//! alive but partitioned away. Without the variable none of this exists: no endpoint, no
//! check.

use std::sync::Mutex;
use tokio::sync::watch;

/// The answer-loss plan of one node. Cheap to check when nothing is armed.
#[derive(Debug)]
pub struct AnswerFaults {
    state: Mutex<FaultState>,
    /// Bumped by every `lose_held`: held answers wait on it.
    lost: watch::Sender<u64>,
    /// Cut off from the peers.
    isolated: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct FaultState {
    /// The next proposal's answer is to be held.
    armed: bool,
    /// The request whose answers are held.
    held: Option<Vec<u8>>,
    /// Answers held right now.
    holding: usize,
}

/// What `serve_call` is to do with one answer.
pub enum AnswerFate {
    /// Write it.
    Send,
    /// Hold it until this changes, then reset the stream.
    Hold(watch::Receiver<u64>),
}

impl Default for AnswerFaults {
    fn default() -> Self {
        Self {
            state: Mutex::new(FaultState::default()),
            lost: watch::channel(0).0,
            isolated: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl AnswerFaults {
    /// Hold the next proposal's answers (see the module comment).
    pub fn hold_next(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.armed = true;
        s.held = None;
    }

    /// Cut the node off from its peers (`true`) or heal it.
    pub fn set_isolated(&self, on: bool) {
        self.isolated
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the node is cut off from its peers.
    pub fn isolated(&self) -> bool {
        self.isolated.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Lose every held answer; how many there were.
    pub fn lose_held(&self) -> usize {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.armed = false;
        s.held = None;
        let n = std::mem::take(&mut s.holding);
        self.lost.send_modify(|v| *v += 1);
        n
    }

    /// Answers held right now, and whether a request is being held.
    pub fn holding(&self) -> (usize, bool) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (s.holding, s.held.is_some())
    }

    /// The fate of the answer to `request` (its encoded bytes), a proposal or not.
    pub fn fate(&self, request: &[u8], proposal: bool) -> AnswerFate {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let hold = match &s.held {
            Some(held) => held.as_slice() == request,
            None if s.armed && proposal => {
                s.armed = false;
                s.held = Some(request.to_vec());
                true
            }
            None => false,
        };
        if hold {
            s.holding += 1;
            AnswerFate::Hold(self.lost.subscribe())
        } else {
            AnswerFate::Send
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_the_next_proposal_and_its_repeats_until_lost() {
        let f = AnswerFaults::default();
        assert!(matches!(f.fate(b"a", true), AnswerFate::Send));
        f.hold_next();
        assert!(matches!(f.fate(b"read", false), AnswerFate::Send));
        let AnswerFate::Hold(first) = f.fate(b"b", true) else {
            panic!("the next proposal is held");
        };
        assert!(matches!(f.fate(b"c", true), AnswerFate::Send));
        assert!(matches!(f.fate(b"b", true), AnswerFate::Hold(_)));
        assert_eq!(f.holding(), (2, true));
        assert_eq!(f.lose_held(), 2);
        assert!(first.has_changed().unwrap_or(false));
        assert!(matches!(f.fate(b"b", true), AnswerFate::Send));
    }
}
