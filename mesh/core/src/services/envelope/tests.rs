//! Sessions, waits, withdrawals and lock time, one entry at a time.

use super::*;
use crate::services::lock::Mode;
use std::collections::BTreeMap;

struct Log {
    s: Services,
    index: LogIndex,
    term: Term,
    ids: BTreeMap<u64, u64>,
}

impl Log {
    fn new() -> Self {
        Self {
            s: Services::default(),
            index: 0,
            term: 1,
            ids: BTreeMap::new(),
        }
    }

    fn entry(&mut self, e: Envelope) -> Applied {
        self.index += 1;
        let bytes = postcard::to_stdvec(&e).expect("encode");
        self.s.apply_entry(self.index, self.term, Some(&bytes))
    }

    /// A call of client `session`: the first call of a client opens its session, whose
    /// id the log assigns; tests name clients by small numbers.
    fn call(&mut self, session: u64, seq: u64, ack: u64, command: Command) -> Applied {
        let id = if session == 0 { 0 } else { self.id_of(session) };
        let command = match command {
            Command::Withdraw {
                session,
                seq,
                release_grant,
            } => Command::Withdraw {
                session: self.id_of(session),
                seq,
                release_grant,
            },
            other => other,
        };
        let mut applied = self.entry(Envelope::new(id, seq, ack, command));
        // Name calls by the test's client numbers again.
        for c in &mut applied.completions {
            c.call.0 = self.client_of(c.call.0);
        }
        applied
    }

    fn id_of(&mut self, client: u64) -> u64 {
        if let Some(&id) = self.ids.get(&client) {
            return id;
        }
        let opened = self.entry(Envelope::new(0, 0, 0, Command::OpenSession));
        let Some(Reply::SessionOpened { session: id }) = opened.reply else {
            panic!("{opened:?}");
        };
        self.ids.insert(client, id);
        id
    }

    fn client_of(&self, id: u64) -> u64 {
        self.ids
            .iter()
            .find(|(_, v)| **v == id)
            .map_or(id, |(k, _)| *k)
    }

    fn new_term(&mut self) {
        self.term += 1;
        self.index += 1;
        self.s.apply_entry(self.index, self.term, None);
    }
}

fn acquire(key: &str, client: &str, mode: Mode, wait_ms: u64) -> Command {
    Command::Lock(LockCommand::Acquire {
        key: key.into(),
        client: client.into(),
        mode,
        ttl_ms: 10_000,
        wait_ms,
    })
}

/// A withdrawal of test client `client`'s call `seq` that also releases a raced grant.
fn withdraw(client: u64, seq: u64) -> Command {
    Command::Withdraw {
        session: client,
        seq,
        release_grant: true,
    }
}

fn release(key: &str, client: &str) -> Command {
    Command::Lock(LockCommand::Release {
        key: key.into(),
        client: client.into(),
    })
}

fn reply(a: &Applied) -> &Reply {
    a.reply.as_ref().expect("a command entry has a reply")
}

fn token(r: &Reply) -> Option<u64> {
    match r {
        Reply::Lock(LockReply::Granted { token, .. }) => Some(*token),
        _ => None,
    }
}

#[test]
fn a_retried_command_is_applied_once() {
    let mut l = Log::new();
    let first = l.call(7, 1, 1, acquire("A", "c1", Mode::X, 0));
    assert_eq!(
        l.call(7, 2, 1, release("A", "c1")).reply,
        Some(Reply::Lock(LockReply::Released))
    );
    // The same release again (a retry after a leader change) answers the same and does
    // not release a second time.
    assert_eq!(
        l.call(7, 2, 1, release("A", "c1")).reply,
        Some(Reply::Lock(LockReply::Released))
    );
    assert_eq!(
        l.call(7, 1, 1, acquire("A", "c1", Mode::X, 0)).reply,
        first.reply
    );
    assert!(l.s.locks().view("A").holders.is_empty());
}

/// Regression (exactly-once only inside a window): the answer of a call is kept until the
/// client acknowledges it, however many calls come after it, and a retry below the
/// acknowledged mark is refused rather than applied again.
#[test]
fn answers_are_kept_until_acknowledged_and_older_retries_are_refused() {
    let mut l = Log::new();
    l.call(5, 1, 1, acquire("A", "c1", Mode::X, 0));
    let released = l.call(5, 2, 1, release("A", "c1"));
    // 10,000 later calls of other sessions, and of this one while call 2 stays unacked.
    for i in 0..5_000 {
        l.call(100 + i, 1, 1, acquire("B", "x", Mode::S, 0));
    }
    // The client re-acquires under the same id; its release retried after a lost answer
    // must answer as before and leave the new hold alone.
    l.call(5, 3, 2, acquire("A", "c1", Mode::X, 0));
    assert_eq!(l.call(5, 2, 2, release("A", "c1")).reply, released.reply);
    assert_eq!(l.s.locks().view("A").holders.len(), 1);
    // Once the client acknowledges calls below 3, call 2's answer is gone: refused.
    l.call(5, 4, 3, Command::Tick);
    assert_eq!(
        reply(&l.call(5, 2, 3, release("A", "c1"))),
        &Reply::Session(SessionRefusal::Discarded { seq: 2, floor: 3 })
    );
    assert_eq!(l.s.locks().view("A").holders.len(), 1, "not applied again");
    assert_eq!(
        reply(&l.entry(Envelope::new(1_000_000, 1, 1, Command::Tick))),
        &Reply::Session(SessionRefusal::Unknown { session: 1_000_000 })
    );
}

#[test]
fn kept_answers_are_bounded_by_the_calls_in_flight() {
    let mut l = Log::new();
    // One call waits a long time; the same session goes on with 2,000 calls, each
    // acknowledging the one before it. What is kept stays small.
    l.call(1, 1, 1, acquire("H", "holder", Mode::X, 0));
    l.call(2, 1, 1, acquire("H", "waiter", Mode::X, 60_000));
    for seq in 2..2_000 {
        l.call(1, seq, seq, Command::Tick);
        assert!(l.s.kept_calls() <= 3, "kept {}", l.s.kept_calls());
    }
    let waiter = l.id_of(2);
    assert!(l.s.kept_reply((waiter, 1)).is_some_and(Reply::is_waiting));
}

/// Withdrawals of calls that have not arrived keep a placeholder each, but only for calls
/// that can still come: made-up sequence numbers far above a session's floor, or more
/// than a session may have in flight, keep nothing.
#[test]
fn withdrawals_of_made_up_calls_keep_nothing() {
    let mut l = Log::new();
    l.call(1, 1, 1, Command::Tick);
    let before = l.s.kept_calls();
    for seq in 0..5_000u64 {
        l.call(0, 0, 0, withdraw(1, 10_000 + seq * 7));
    }
    assert_eq!(l.s.kept_calls(), before, "far above the floor");
    for seq in 2..5_000u64 {
        l.call(0, 0, 0, withdraw(1, seq));
    }
    assert!(
        l.s.kept_calls() <= MAX_CALLS_PER_SESSION,
        "bounded by the calls a session may have in flight: {}",
        l.s.kept_calls()
    );
    // A withdrawal that came first still wins over its call.
    let late = l.call(1, 2, 2, acquire("W", "c1", Mode::X, 0));
    assert_eq!(reply(&late), &Reply::Withdrawn);
}

/// Regression (an upgrade answered as granted): waits are per call. The kept answer of
/// a queued call is replaced by its real outcome, and the completion names that call.
#[test]
fn a_wait_completes_the_call_that_waited() {
    let mut l = Log::new();
    l.call(1, 1, 1, acquire("U", "c1", Mode::S, 0));
    l.call(2, 1, 1, acquire("U", "c2", Mode::S, 0));
    let up = l.call(1, 2, 2, acquire("U", "c1", Mode::X, 1_500));
    assert!(reply(&up).is_waiting(), "{up:?}");
    let done = l.call(2, 2, 2, release("U", "c2"));
    let [c] = &done.completions[..] else {
        panic!("one completion: {done:?}")
    };
    assert_eq!(c.call, (1, 2));
    assert!(matches!(
        c.reply,
        Reply::Lock(LockReply::Granted { mode: Mode::X, .. })
    ));
    // A retry of the waiting call now answers the grant.
    assert_eq!(
        l.call(1, 2, 2, acquire("U", "c1", Mode::X, 1_500)).reply,
        Some(c.reply.clone())
    );
}

#[test]
fn a_withdrawal_cancels_the_wait_or_releases_the_grant_that_raced_it() {
    let mut l = Log::new();
    l.call(1, 1, 1, acquire("A", "h", Mode::X, 0));
    l.call(2, 1, 1, acquire("A", "w", Mode::X, 5_000));
    let w = l.call(0, 0, 0, withdraw(2, 1));
    assert_eq!(
        w.completions,
        vec![Completion {
            call: (2, 1),
            reply: Reply::Withdrawn
        }]
    );
    assert!(l.s.locks().view("A").waiters.is_empty());
    assert_eq!(
        reply(&l.call(2, 1, 1, acquire("A", "w", Mode::X, 5_000))),
        &Reply::Withdrawn
    );
    // The grant races the withdrawal: granted first, withdrawn after.
    l.call(3, 1, 1, acquire("A", "g", Mode::X, 5_000));
    let granted = l.call(1, 2, 2, release("A", "h"));
    let t = token(&granted.completions[0].reply).expect("granted to g");
    // A retry of the same client id, under a new call, holds the key later...
    l.call(0, 0, 0, withdraw(3, 1));
    assert!(
        l.s.locks().view("A").holders.is_empty(),
        "raced grant released"
    );
    let later = l.call(3, 2, 2, acquire("A", "g", Mode::X, 0));
    assert!(token(reply(&later)).is_some_and(|n| n > t));
    // ... and a repeated withdrawal of the old call never touches it.
    l.call(0, 0, 0, withdraw(3, 1));
    assert_eq!(l.s.locks().view("A").holders.len(), 1);
    // A withdrawal that overtakes its call: the call is never applied.
    l.id_of(9);
    l.call(0, 0, 0, withdraw(9, 1));
    assert_eq!(
        reply(&l.call(9, 1, 1, acquire("B", "z", Mode::X, 0))),
        &Reply::Withdrawn
    );
    assert!(l.s.locks().view("B").holders.is_empty());
}

#[test]
fn a_soft_withdrawal_leaves_a_grant_a_retry_may_have_reported() {
    let mut l = Log::new();
    l.call(1, 1, 1, acquire("A", "h", Mode::X, 0));
    l.call(2, 1, 1, acquire("A", "w", Mode::X, 5_000));
    l.call(1, 2, 2, release("A", "h"));
    let soft = Command::Withdraw {
        session: 2,
        seq: 1,
        release_grant: false,
    };
    l.call(0, 0, 0, soft.clone());
    assert_eq!(l.s.locks().view("A").holders[0].client, "w");
    // Still queued: a soft withdrawal does withdraw it.
    l.call(3, 1, 1, acquire("A", "q", Mode::X, 5_000));
    l.call(
        0,
        0,
        0,
        Command::Withdraw {
            session: 3,
            seq: 1,
            release_grant: false,
        },
    );
    assert!(l.s.locks().view("A").waiters.is_empty());
    // And it never leaves a tombstone for a call that has not arrived.
    l.id_of(4);
    l.call(
        0,
        0,
        0,
        Command::Withdraw {
            session: 4,
            seq: 1,
            release_grant: false,
        },
    );
    assert!(token(reply(&l.call(4, 1, 1, acquire("B", "z", Mode::X, 0)))).is_some());
}

#[test]
fn acknowledging_a_waiting_call_withdraws_its_wait() {
    let mut l = Log::new();
    l.call(1, 1, 1, acquire("A", "h", Mode::X, 0));
    l.call(2, 1, 1, acquire("A", "w", Mode::X, 5_000));
    l.call(2, 2, 2, Command::Tick);
    assert!(l.s.locks().view("A").waiters.is_empty());
}

/// Regression (lock time on the leader's wall clock): lock time is the last committed
/// lock time plus the current leader's monotonic time since it took office.
#[test]
fn lock_time_runs_on_the_leaders_office_time_and_failovers_only_lengthen() {
    let mut l = Log::new();
    let id = l.id_of(1);
    l.new_term();
    let mut e = Envelope::new(id, 1, 1, acquire("A", "c1", Mode::X, 0));
    e.elapsed_ms = 5_000;
    let granted = l.entry(e);
    assert!(matches!(
        reply(&granted),
        Reply::Lock(LockReply::Granted {
            expires_ms: 15_000,
            ..
        })
    ));
    assert_eq!(l.s.clock().now_ms, 5_000);
    // A new leader: its office time starts at 0, on top of the committed 5,000.
    l.new_term();
    let mut tick = Envelope::new(0, 0, 0, Command::Tick);
    tick.elapsed_ms = 9_999;
    l.entry(tick.clone());
    assert_eq!(l.s.clock().now_ms, 14_999);
    assert_eq!(
        l.s.locks().view("A").holders.len(),
        1,
        "lease not shortened"
    );
    // An entry stamped earlier within the term never moves time back.
    tick.elapsed_ms = 100;
    l.entry(tick.clone());
    assert_eq!(l.s.clock().now_ms, 14_999);
    tick.elapsed_ms = 10_000;
    l.entry(tick);
    assert!(
        l.s.locks().view("A").holders.is_empty(),
        "expired at 15,000"
    );
}

#[test]
fn snapshot_round_trip_and_bad_bytes() {
    let mut l = Log::new();
    l.call(1, 1, 1, acquire("A", "c1", Mode::X, 0));
    l.call(2, 1, 1, acquire("A", "c2", Mode::X, 5_000));
    let mut copy = Services::default();
    copy.restore(&l.s.snapshot()).expect("restore");
    assert_eq!(copy, l.s);
    assert_eq!(copy.digest(), l.s.digest());
    assert!(matches!(
        l.s.apply_entry(9, 1, Some(&[0xFF, 0x01])).reply,
        Some(Reply::Invalid(_))
    ));
    assert!(matches!(l.s.query_bytes(&[0xFF]), QueryReply::Invalid(_)));
    assert!(copy.restore(&[0xFF, 0xFF]).is_err());
    // A snapshot says which state format it is in; another format is refused by name,
    // never decoded into the wrong fields.
    let bytes = l.s.snapshot();
    assert_eq!(&bytes[..4], SNAPSHOT_MAGIC);
    let before = copy.clone();
    let headerless = copy.restore(&bytes[6..]).expect_err("no header");
    assert!(
        headerless.to_string().contains("no format header"),
        "{headerless}"
    );
    let mut newer = bytes.clone();
    newer[4..6].copy_from_slice(&(SNAPSHOT_FORMAT + 1).to_le_bytes());
    let newer = copy.restore(&newer).expect_err("a newer format");
    assert!(
        newer
            .to_string()
            .contains(&format!("format {}", SNAPSHOT_FORMAT + 1)),
        "{newer}"
    );
    assert!(copy.restore(&bytes[..5]).is_err());
    assert_eq!(copy, before, "a refused snapshot changes nothing");
}
