# syncmesh tasks. `just` alone runs the tests. Install just with: cargo install just --locked

set shell := ["bash", "-euo", "pipefail", "-c"]

# Run every test (the README's test command).
test:
    cargo test --workspace

# Start the local cluster (3 nodes; pass e.g. `--nodes 5`), until Ctrl-C.
cluster *args:
    cargo run --release -- cluster {{args}}

# Make the cluster's certificates (CA, node1..node3, gateway, admin) in .syncmesh/certs.
certs *args:
    cargo run --release -- certs init {{args}}

# Run the deterministic simulator over many seeds: `just sim 20000`.
sim seeds="20000" start="0":
    cargo run -p mesh-sim --release -- --seeds {{seeds}} --start-seed {{start}}

# The simulator soak that CI runs after the tests: 2,000 seeds beyond cargo test's 300.
soak seeds="2000":
    cargo run -p mesh-sim --release -- --seeds {{seeds}} --start-seed 300

# Replay one simulator seed step for step, printing every nemesis action.
sim-repro seed:
    cargo run -p mesh-sim --release -- --replay {{seed}}

# Lock workload (acquire X + release; 1/16/64 clients, distinct keys and one hot key)
# through the gateway of a fresh local cluster.
bench *args:
    cargo run --release -- bench lock {{args}}

# Queue enqueue workload (1/16/64 clients; single messages and batches of 100) through the
# gateway of a fresh local cluster.
bench-enq *args:
    cargo run --release -- bench enq {{args}}

# Cache workloads (gets on a warm key set, puts on owned and moving lines, durable puts) on a
# node's own port and through the gateway of a fresh local cluster.
bench-cache *args:
    cargo run --release -- bench cache {{args}}

# Queue dequeue + ack workload (single and batched) through the gateway of a fresh cluster.
bench-deq-ack *args:
    cargo run --release -- bench deq-ack {{args}}

# What a queue of a million messages costs a node (memory, snapshot view, encode, restore).
bench-queue-state *args:
    cargo run --release -- bench queue-state {{args}}

# Storage benchmark: raw fdatasync vs group-committed appends (1, 16, 64 proposers).
bench-log seconds="3":
    cargo run --release -- bench log --seconds {{seconds}}

# Kill the leader 10 times and print how long until a new leader commits.
bench-failover kills="10" quiet="10":
    cargo run --release -- bench failover --kills {{kills}} --quiet-secs {{quiet}}

# Read-only checks: formatting, lints, docs, tests, a fixed-seed simulator smoke run.
verify:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
    cargo test --workspace
    cargo run -p mesh-sim --release -- --seeds 1000

# The only task that rewrites files.
fix:
    cargo fmt --all
    cargo clippy --workspace --all-targets --fix --allow-dirty -- -D warnings
