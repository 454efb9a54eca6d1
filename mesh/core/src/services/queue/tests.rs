use super::*;

const Q: &str = DEFAULT_QUEUE;

struct Harness {
    set: QueueSet,
    index: LogIndex,
    now: u64,
}

impl Harness {
    fn new() -> Self {
        Self {
            set: QueueSet::default(),
            index: 0,
            now: 1_000,
        }
    }

    fn run(&mut self, cmd: QueueCommand) -> (QueueReply, Vec<QueueEvent>) {
        self.index += 1;
        let out = self.set.apply(self.index, self.now, cmd);
        self.set.check().expect("queue indexes consistent");
        let copy: QueueSet =
            postcard::from_bytes(&postcard::to_stdvec(&self.set).unwrap()).unwrap();
        assert_eq!(copy, self.set, "snapshot round trip");
        out
    }

    fn enq(&mut self, key: &str, value: &str) -> MsgId {
        self.enq_dedup(key, value, None).0
    }

    fn enq_dedup(&mut self, key: &str, value: &str, dedup: Option<&str>) -> (MsgId, bool) {
        match self.run(enqueue(Q, &[(key, value, dedup)])).0 {
            QueueReply::Enqueued { ids } => ids[0],
            other => panic!("enqueue: {other:?}"),
        }
    }

    fn deq(&mut self, key: Option<&str>, max: u32, wait_ms: u64) -> QueueReply {
        self.run(QueueCommand::Dequeue {
            queue: Q.into(),
            key: key.map(str::to_owned),
            max,
            visibility_ms: Some(1_000),
            wait_ms,
        })
        .0
    }

    fn deq_one(&mut self) -> Delivery {
        match self.deq(None, 1, 0) {
            QueueReply::Delivered { mut messages } if messages.len() == 1 => messages.remove(0),
            other => panic!("dequeue: {other:?}"),
        }
    }

    fn ack(&mut self, id: MsgId, receipt: Option<u64>) -> QueueReply {
        self.run(QueueCommand::Ack {
            queue: Q.into(),
            ids: vec![(id, receipt)],
        })
        .0
    }

    fn tick(&mut self, ms: u64) -> Vec<QueueEvent> {
        self.now += ms;
        self.index += 1;
        let events = self.set.advance(self.now);
        self.set.check().expect("queue indexes consistent");
        events
    }
}

fn enqueue(queue: &str, messages: &[(&str, &str, Option<&str>)]) -> QueueCommand {
    QueueCommand::Enqueue {
        queue: queue.into(),
        messages: messages
            .iter()
            .map(|(k, v, d)| NewMessage {
                key: (*k).into(),
                value: format!("{v:?}").into_bytes(),
                field: Field::Value,
                dedup_id: d.map(str::to_owned),
            })
            .collect(),
    }
}

fn value(d: &Delivery) -> String {
    String::from_utf8(d.value.clone()).unwrap()
}

#[test]
fn seed_flow_enqueue_dequeue_ack_then_404_then_empty() {
    let mut h = Harness::new();
    let id = h.enq("user:42", "hello");
    let d = h.deq_one();
    assert_eq!(
        (d.id, d.key.as_str(), value(&d).as_str(), d.deliveries),
        (id, "user:42", "\"hello\"", 1)
    );
    assert!(matches!(
        h.ack(id, None),
        QueueReply::Acked { acked: 1, .. }
    ));
    assert_eq!(
        h.ack(id, None),
        QueueReply::Acked {
            acked: 0,
            missing: vec![id],
            stale: vec![],
            undelivered: vec![]
        }
    );
    assert_eq!(
        h.deq(None, 1, 0),
        QueueReply::Delivered { messages: vec![] }
    );
    assert_eq!(h.set.stats().enqueued, 1);
    assert_eq!(h.set.stats().acked, 1);
}

#[test]
fn an_ack_of_a_message_nobody_received_leaves_it_queued() {
    let mut h = Harness::new();
    let id = h.enq("user:42", "hello");
    assert_eq!(
        h.ack(id, None),
        QueueReply::Acked {
            acked: 0,
            missing: vec![],
            stale: vec![],
            undelivered: vec![id]
        }
    );
    let d = h.deq_one();
    assert_eq!((d.id, value(&d).as_str()), (id, "\"hello\""));
    assert!(matches!(
        h.ack(id, Some(d.receipt)),
        QueueReply::Acked { acked: 1, .. }
    ));
}

#[test]
fn first_deliveries_are_fifo_per_key() {
    let mut h = Harness::new();
    for i in 0..20 {
        h.enq(&format!("k{}", i % 3), &format!("{i}"));
    }
    let mut seen: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for _ in 0..20 {
        let d = h.deq_one();
        let v: u32 = value(&d).trim_matches('"').parse().unwrap();
        seen.entry(d.key).or_default().push(v);
    }
    for (key, values) in seen {
        let mut sorted = values.clone();
        sorted.sort_unstable();
        assert_eq!(values, sorted, "key {key}");
    }
}

#[test]
fn dequeue_by_key_takes_only_that_key() {
    let mut h = Harness::new();
    h.enq("a", "1");
    h.enq("b", "2");
    h.enq("a", "3");
    let QueueReply::Delivered { messages } = h.deq(Some("a"), 10, 0) else {
        panic!()
    };
    let values: Vec<String> = messages.iter().map(value).collect();
    assert_eq!(values, ["\"1\"", "\"3\""]);
}

#[test]
fn a_lease_that_runs_out_redelivers_with_the_payload_and_stales_the_old_receipt() {
    let mut h = Harness::new();
    let id = h.enq("k", "payload");
    let first = h.deq_one();
    assert!(matches!(h.deq(None, 1, 0), QueueReply::Delivered { messages } if messages.is_empty()));
    h.tick(999);
    assert!(matches!(h.deq(None, 1, 0), QueueReply::Delivered { messages } if messages.is_empty()));
    h.tick(1);
    let second = h.deq_one();
    assert_eq!(
        (second.id, second.deliveries, value(&second)),
        (id, 2, "\"payload\"".into())
    );
    assert_ne!(first.receipt, second.receipt);
    assert_eq!(
        h.ack(id, Some(first.receipt)),
        QueueReply::Acked {
            acked: 0,
            missing: vec![],
            stale: vec![id],
            undelivered: vec![]
        }
    );
    assert!(matches!(
        h.ack(id, Some(second.receipt)),
        QueueReply::Acked { acked: 1, .. }
    ));
    assert_eq!(h.set.stats().redeliveries, 1);
}

#[test]
fn poison_message_becomes_a_dead_letter_and_requeue_brings_it_back() {
    let mut h = Harness::new();
    let id = h.enq("k", "poison");
    let mut last_receipt = 0;
    for n in 1..=DEFAULT_MAX_DELIVERIES {
        let d = h.deq_one();
        assert_eq!(d.deliveries, n);
        last_receipt = d.receipt;
        let (reply, _) = h.run(QueueCommand::Nack {
            queue: Q.into(),
            id,
            receipt: Some(d.receipt),
        });
        assert_eq!(reply, QueueReply::Done);
    }
    assert!(matches!(h.deq(None, 1, 0), QueueReply::Delivered { messages } if messages.is_empty()));
    let dead = h.set.dead(Q, 10);
    assert_eq!(
        (dead.len(), dead[0].id, dead[0].deliveries),
        (1, id, DEFAULT_MAX_DELIVERIES)
    );
    let (reply, _) = h.run(QueueCommand::Requeue {
        queue: Q.into(),
        ids: vec![],
        max: 10,
    });
    assert_eq!(reply, QueueReply::Requeued { count: 1 });
    // A consumer of a delivery from before it died acks nothing: its receipt is stale,
    // and without one the message has not been delivered since the requeue.
    assert!(
        matches!(h.ack(id, Some(last_receipt)), QueueReply::Acked { acked: 0, ref stale, .. } if stale == &[id])
    );
    assert!(
        matches!(h.ack(id, None), QueueReply::Acked { acked: 0, ref undelivered, .. } if undelivered == &[id])
    );
    // It comes back with its payload; the count goes on (so it is not taken for a first
    // delivery), and it has a fresh budget of deliveries.
    let d = h.deq_one();
    assert_eq!(
        (d.id, d.deliveries, value(&d)),
        (id, DEFAULT_MAX_DELIVERIES + 1, "\"poison\"".into())
    );
    let (reply, _) = h.run(QueueCommand::Nack {
        queue: Q.into(),
        id,
        receipt: None,
    });
    assert_eq!(reply, QueueReply::Done);
    assert_eq!(h.set.dead(Q, 10).len(), 0, "a fresh budget after requeue");
}

#[test]
fn a_long_poll_is_woken_by_an_enqueue_and_times_out_empty_otherwise() {
    let mut h = Harness::new();
    let QueueReply::Waiting { wait } = h.deq(None, 1, 5_000) else {
        panic!()
    };
    let (reply, events) = h.run(enqueue(Q, &[("k", "v", None)]));
    assert!(matches!(reply, QueueReply::Enqueued { .. }));
    let id = match events.as_slice() {
        [QueueEvent::Delivered { wait: w, messages }] => {
            assert_eq!((*w, messages.len()), (wait, 1));
            messages[0].id
        }
        other => panic!("{other:?}"),
    };
    h.ack(id, None);
    // Nothing left for a second waiter, which times out on lock time.
    let QueueReply::Waiting { wait } = h.deq(None, 1, 2_000) else {
        panic!()
    };
    assert!(h.tick(1_999).is_empty());
    assert_eq!(h.tick(1), vec![QueueEvent::TimedOut { wait }]);
}

#[test]
fn a_lease_that_runs_out_wakes_a_waiter() {
    let mut h = Harness::new();
    h.enq("k", "v");
    let first = h.deq_one();
    let QueueReply::Waiting { wait } = h.deq(None, 1, 10_000) else {
        panic!()
    };
    let events = h.tick(1_000);
    match events.as_slice() {
        [QueueEvent::Delivered { wait: w, messages }] => {
            assert_eq!(
                (*w, messages[0].id, messages[0].deliveries),
                (wait, first.id, 2)
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_keyed_waiter_does_not_block_others() {
    let mut h = Harness::new();
    let QueueReply::Waiting { wait: keyed } = h.deq(Some("x"), 1, 5_000) else {
        panic!()
    };
    let QueueReply::Waiting { wait: any } = h.deq(None, 1, 5_000) else {
        panic!()
    };
    let (_, events) = h.run(enqueue(Q, &[("y", "v", None)]));
    assert!(matches!(events.as_slice(), [QueueEvent::Delivered { wait, .. }] if *wait == any));
    let (_, events) = h.run(enqueue(Q, &[("x", "v", None)]));
    assert!(matches!(events.as_slice(), [QueueEvent::Delivered { wait, .. }] if *wait == keyed));
}

#[test]
fn dedup_id_stores_once_inside_the_window() {
    let mut h = Harness::new();
    let (a, dup_a) = h.enq_dedup("k", "v", Some("order-1"));
    let (b, dup_b) = h.enq_dedup("k", "v", Some("order-1"));
    assert_eq!((a, dup_a, dup_b), (b, false, true));
    assert_eq!(h.set.counts().0, 1);
    // A batch repeating an id inside itself stores it once too.
    let (reply, _) = h.run(enqueue(Q, &[("k", "1", Some("x")), ("k", "2", Some("x"))]));
    let QueueReply::Enqueued { ids } = reply else {
        panic!()
    };
    assert!(!ids[0].1 && ids[1].1, "{ids:?}");
    assert_eq!(h.set.counts().0, 2);
    h.tick(DEFAULT_DEDUP_WINDOW_MS);
    let (c, dup_c) = h.enq_dedup("k", "v", Some("order-1"));
    assert!(!dup_c && c != a);
    assert_eq!(h.set.stats().deduplicated, 2);
}

#[test]
fn a_full_queue_refuses_the_whole_batch() {
    let mut h = Harness::new();
    h.set = QueueSet::with_limits(3, 1 << 20);
    h.enq("k", "1");
    h.enq("k", "2");
    let (reply, _) = h.run(enqueue(Q, &[("k", "3", None), ("k", "4", None)]));
    assert!(
        matches!(reply, QueueReply::Full { ref code, .. } if code == "queue_full"),
        "{reply:?}"
    );
    assert_eq!(h.set.counts().0, 2, "nothing half-stored");
    // Dead letters count against the bound; acks free it.
    let d = h.deq_one();
    h.ack(d.id, None);
    h.enq("k", "3");
    h.enq("k", "4");
}

#[test]
fn the_caps_over_all_queues_are_replicated_commands() {
    let mut h = Harness::new();
    h.enq("k", "1");
    h.enq("k", "2");
    let (reply, _) = h.run(QueueCommand::Limits {
        max_messages: Some(2),
        max_bytes: None,
    });
    assert!(
        matches!(
            reply,
            QueueReply::Limits { max_messages: 2, max_bytes, messages: 2, .. } if max_bytes == DEFAULT_MAX_BYTES
        ),
        "{reply:?}"
    );
    let (reply, _) = h.run(enqueue("other", &[("k", "3", None)]));
    assert!(
        matches!(reply, QueueReply::Full { ref code, .. } if code == "queue_full"),
        "{reply:?}"
    );
    for (max_messages, max_bytes) in [
        (Some(0), None),
        (None, Some(0)),
        (Some(CEILING_MAX_MESSAGES + 1), None),
        (None, Some(u64::MAX)),
    ] {
        let (reply, _) = h.run(QueueCommand::Limits {
            max_messages,
            max_bytes,
        });
        assert!(matches!(reply, QueueReply::Invalid(_)), "{reply:?}");
    }
    let (reply, _) = h.run(QueueCommand::Limits {
        max_messages: Some(3),
        max_bytes: None,
    });
    assert!(matches!(
        reply,
        QueueReply::Limits {
            max_messages: 3,
            ..
        }
    ));
    h.enq("k", "3");
}

#[test]
fn dequeue_without_key_is_fair_across_partitions() {
    let mut h = Harness::new();
    // Ten messages on each of two keys that land in different partitions.
    let ring = HashRing::new(DEFAULT_PARTITIONS);
    let a = "a".to_string();
    let b = (0..100)
        .map(|i| format!("b{i}"))
        .find(|k| ring.partition(k) != ring.partition(&a))
        .unwrap();
    for i in 0..10 {
        h.enq(&a, &i.to_string());
    }
    for i in 0..10 {
        h.enq(&b, &i.to_string());
    }
    let keys: Vec<String> = (0..6).map(|_| h.deq_one().key).collect();
    let from_a = keys.iter().filter(|k| **k == a).count();
    assert_eq!(from_a, 3, "alternates: {keys:?}");
}

#[test]
fn extend_keeps_the_lease_and_nack_frees_it_at_once() {
    let mut h = Harness::new();
    let id = h.enq("k", "v");
    let d = h.deq_one();
    h.tick(900);
    let (reply, _) = h.run(QueueCommand::Extend {
        queue: Q.into(),
        id,
        receipt: Some(d.receipt),
        visibility_ms: 5_000,
    });
    assert_eq!(reply, QueueReply::Done);
    h.tick(4_000);
    assert!(matches!(h.deq(None, 1, 0), QueueReply::Delivered { messages } if messages.is_empty()));
    let (reply, _) = h.run(QueueCommand::Nack {
        queue: Q.into(),
        id,
        receipt: None,
    });
    assert_eq!(reply, QueueReply::Done);
    assert_eq!(h.deq_one().id, id);
    // An unknown id is not found, on every command.
    let ghost = MsgId {
        partition: 0,
        seq: 999,
    };
    let (reply, _) = h.run(QueueCommand::Nack {
        queue: Q.into(),
        id: ghost,
        receipt: None,
    });
    assert_eq!(reply, QueueReply::NotFound { id: ghost });
}

#[test]
fn withdrawn_deliveries_are_visible_again_and_still_counted() {
    let mut h = Harness::new();
    let id = h.enq("k", "v");
    let d = h.deq_one();
    h.index += 1;
    h.set.withdraw_deliveries(Q, &[(id, d.receipt)]);
    h.set.check().unwrap();
    let again = h.deq_one();
    assert_eq!((again.id, again.deliveries), (id, 2));
    // A withdrawal naming an older receipt leaves the newer delivery alone.
    h.index += 1;
    h.set.withdraw_deliveries(Q, &[(id, d.receipt)]);
    assert!(matches!(h.deq(None, 1, 0), QueueReply::Delivered { messages } if messages.is_empty()));
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    let mut h = Harness::new();
    let bad = [
        enqueue(Q, &[("", "v", None)]),
        enqueue("bad name!", &[("k", "v", None)]),
        QueueCommand::Enqueue {
            queue: Q.into(),
            messages: vec![],
        },
        QueueCommand::Enqueue {
            queue: Q.into(),
            messages: vec![NewMessage {
                key: "k".into(),
                value: vec![b'1'; MAX_VALUE_BYTES + 1],
                field: Field::Value,
                dedup_id: None,
            }],
        },
        QueueCommand::Dequeue {
            queue: Q.into(),
            key: None,
            max: 0,
            visibility_ms: None,
            wait_ms: 0,
        },
        QueueCommand::Dequeue {
            queue: Q.into(),
            key: None,
            max: 1,
            visibility_ms: Some(MAX_VISIBILITY_MS + 1),
            wait_ms: 0,
        },
        QueueCommand::Dequeue {
            queue: Q.into(),
            key: None,
            max: 1,
            visibility_ms: None,
            wait_ms: MAX_WAIT_MS + 1,
        },
        QueueCommand::Configure {
            queue: Q.into(),
            settings: QueueSettings {
                partitions: MAX_PARTITIONS + 1,
                ..QueueSettings::default()
            },
        },
    ];
    for cmd in bad {
        let (reply, _) = h.run(cmd.clone());
        assert!(
            matches!(reply, QueueReply::Invalid(_)),
            "{cmd:?} -> {reply:?}"
        );
    }
    assert_eq!(h.set.counts(), (0, 0, 0));
}

#[test]
fn the_partition_count_is_fixed_at_creation() {
    let mut h = Harness::new();
    let settings = QueueSettings {
        partitions: 4,
        ..QueueSettings::default()
    };
    let (reply, _) = h.run(QueueCommand::Configure {
        queue: "jobs".into(),
        settings,
    });
    assert_eq!(reply, QueueReply::Configured { settings });
    let (reply, _) = h.run(QueueCommand::Configure {
        queue: "jobs".into(),
        settings: QueueSettings::default(),
    });
    assert!(matches!(reply, QueueReply::Invalid(_)));
    let (reply, _) = h.run(enqueue("jobs", &[("k", "v", None)]));
    let QueueReply::Enqueued { ids } = reply else {
        panic!()
    };
    assert!(ids[0].0.partition < 4);
    assert_eq!(h.set.view("jobs").unwrap().partitions.len(), 4);
}

#[test]
fn two_leases_in_one_entry_get_different_receipts() {
    // A lease runs out and is handed to one waiter by the entry whose own command (a
    // nack without a receipt) ends that delivery and hands the message to a second
    // waiter: the first waiter's receipt must not ack the second's lease.
    let mut h = Harness::new();
    let id = h.enq("k", "v");
    h.deq_one();
    let QueueReply::Waiting { wait: w1 } = h.deq(None, 1, 10_000) else {
        panic!()
    };
    let QueueReply::Waiting { wait: w2 } = h.deq(None, 1, 10_000) else {
        panic!()
    };
    h.now += 1_000;
    let (reply, events) = h.run(QueueCommand::Nack {
        queue: Q.into(),
        id,
        receipt: None,
    });
    assert_eq!(reply, QueueReply::Done);
    let receipt_of = |w| {
        events.iter().find_map(|e| match e {
            QueueEvent::Delivered { wait, messages } if *wait == w => Some(messages[0].receipt),
            _ => None,
        })
    };
    let (r1, r2) = (
        receipt_of(w1).expect("w1 served"),
        receipt_of(w2).expect("w2 served"),
    );
    assert_ne!(r1, r2);
    assert_eq!(
        h.ack(id, Some(r1)),
        QueueReply::Acked {
            acked: 0,
            missing: vec![],
            stale: vec![id],
            undelivered: vec![]
        }
    );
    assert!(matches!(
        h.ack(id, Some(r2)),
        QueueReply::Acked { acked: 1, .. }
    ));
}
