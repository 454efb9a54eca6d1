//! `syncmesh bench log` runs against a real disk and reports figures; bad arguments get a
//! clear error, never a panic.

use std::process::Command;

fn syncmesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_syncmesh"))
}

#[test]
fn bench_log_reports_group_commit_figures() {
    let dir = std::env::temp_dir().join(format!("syncmesh-it-bench-{}", std::process::id()));
    let out = syncmesh()
        .args([
            "bench",
            "log",
            "--seconds",
            "0.3",
            "--proposers",
            "1,8",
            "--dir",
        ])
        .arg(&dir)
        .output()
        .expect("run syncmesh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("raw fdatasync"), "{stdout}");
    let rows: Vec<Vec<f64>> = stdout
        .lines()
        .filter_map(|l| {
            let cols: Vec<f64> = l
                .split_whitespace()
                .filter_map(|c| c.trim_end_matches('x').parse().ok())
                .collect();
            (cols.len() == 7).then_some(cols)
        })
        .collect();
    assert_eq!(rows.len(), 2, "one row per proposer count: {stdout}");
    for row in &rows {
        assert!(row[1] > 0.0, "appends per second measured: {stdout}");
        assert!(row[2] >= 1.0, "entries per fsync is at least one: {stdout}");
    }
    assert!(!dir.exists(), "scratch directory removed");
}

#[test]
fn bad_arguments_get_a_clear_error() {
    for args in [
        vec!["bench", "log", "--seconds", "-1"],
        vec!["bench", "log", "--proposers", "0"],
        vec!["bench", "log", "--proposers", "lots"],
        vec!["bench", "nope"],
    ] {
        let out = syncmesh().args(&args).output().expect("run syncmesh");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(
            stderr.contains("error"),
            "{args:?}: no clear error: {stderr}"
        );
    }
}
