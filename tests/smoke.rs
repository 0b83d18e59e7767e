//! Smoke test: both ways of starting a sidecar in tests work.

mod util;

#[test]
fn in_process_and_child_sidecars_start() {
    let app = util::spawn_app();
    assert_eq!(app.client.send("GET", "/healthz", None, None).unwrap().status, 200);
    let dir = tempfile::tempdir().unwrap();
    let mut child = util::ChildSidecar::start(dir.path(), &[]);
    assert_eq!(child.client.send("GET", "/readyz", None, None).unwrap().status, 200);
    assert!(child.terminate().success());
}
