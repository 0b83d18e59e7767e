//! A real full disk on a single node: the data directory on a small tmpfs,
//! filled to the last byte while a `prefsd serve` child takes writes.
//! Writes are refused with a 5xx JSON error, checks go on, writes resume
//! once there is room again, and after a SIGKILL and a restart every
//! acknowledged write is there and no refused one is.
//!
//! Needs `mount -t tmpfs` (root): skipped with a SKIP line where mounting
//! is refused, failed instead under `PREFSD_TEST_REQUIRE_ALL=1`.

mod util;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use prefsd::client::Client;

/// A tmpfs mounted for this test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount -t tmpfs failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// PUTs an opt-out for `customer`: `Ok(seq)` when acknowledged, `Err((status, body))` when not.
fn opt_out(client: &Client, customer: u64) -> Result<u64, (u16, serde_json::Value)> {
    let body = serde_json::json!({"status": "opted_out"}).to_string().into_bytes();
    let answer = client
        .send(
            "PUT",
            &format!("/v1/customers/{customer}/preferences/rating/email"),
            Some("application/json"),
            Some(body),
        )
        .expect("the sidecar answers");
    let json = answer.json();
    match (answer.status, json["seq"].as_u64()) {
        (200, Some(seq)) => Ok(seq),
        (status, _) => Err((status, json)),
    }
}

fn allowed(client: &Client, customer: u64) -> bool {
    let answer = client
        .call("GET", &format!("/v1/check?customer={customer}&service=rating&channel=email"), None)
        .expect("checks are answered");
    answer["allowed"].as_bool().expect("a check answers allowed")
}

/// Fills the file system holding `path` until a write fails.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut chunk = vec![0xa5u8; 1 << 20];
    while chunk.len() >= 512 {
        if f.write_all(&chunk).is_err() {
            chunk.truncate(chunk.len() / 2);
        }
    }
    let _ = f.sync_all();
}

#[test]
fn a_full_disk_refuses_writes_keeps_checks_and_loses_nothing_acknowledged() {
    let test = "a_full_disk_refuses_writes_keeps_checks_and_loses_nothing_acknowledged";
    let tmp = tempfile::tempdir().unwrap();
    let _mount = match Tmpfs::mount(&tmp.path().join("mnt"), "24m") {
        Ok(m) => m,
        Err(why) => return util::skip(test, &why),
    };
    let data = tmp.path().join("mnt/data");
    let filler = tmp.path().join("mnt/filler");
    let env = [("PREFSD_CACHE_BYTES", "4194304")];
    let mut child = util::ChildSidecar::start(&data, &env);
    let client = child.client.clone();
    client
        .call("POST", "/v1/services", Some(&serde_json::json!({"slug": "rating", "name": "Ratings"})))
        .unwrap();

    let mut acked = BTreeSet::new();
    let mut refused = BTreeSet::new();
    for c in 1..=50 {
        opt_out(&client, c).expect("writes before the disk fills");
        acked.insert(c);
    }

    fill(&filler);
    // Writes are refused once the log (or redb) needs a page the disk does
    // not have; the first few may still fit in the log's last page.
    let mut customer = 1000;
    let mut refusal = None;
    while refusal.is_none() && customer < 6000 {
        match opt_out(&client, customer) {
            Ok(_) => {
                acked.insert(customer);
            }
            Err((status, body)) => {
                refused.insert(customer);
                refusal = Some((status, body));
            }
        }
        customer += 1;
    }
    let (status, body) = refusal.expect("a write refused on the full disk");
    assert!((500..600).contains(&status), "refused with {status}: {body}");
    assert!(body["error"]["code"].is_string() && body["error"]["message"].is_string(), "{body}");
    println!("first refusal after {} writes on the full disk: {status} {body}", customer - 1001);
    // Some more writes while the disk stays full: each acknowledged or refused, never lost.
    for _ in 0..100 {
        match opt_out(&client, customer) {
            Ok(_) => acked.insert(customer),
            Err((status, body)) => {
                assert!((500..600).contains(&status), "{status}: {body}");
                refused.insert(customer)
            }
        };
        customer += 1;
    }
    // Checks go on, from the index.
    assert!(!allowed(&client, 1), "customer 1 opted out before the disk filled");
    assert!(allowed(&client, 999_999), "an unknown customer is allowed");

    // Room again: writes resume.
    std::fs::remove_file(&filler).unwrap();
    let resumed = util::wait_for("writes to resume after the disk has room", Duration::from_secs(60), || {
        let c = customer;
        customer += 1;
        match opt_out(&client, c) {
            Ok(_) => Some(c),
            Err(_) => {
                refused.insert(c);
                None
            }
        }
    });
    acked.insert(resumed);
    for _ in 0..50 {
        opt_out(&client, customer).expect("writes after the disk has room");
        acked.insert(customer);
        customer += 1;
    }
    println!("{} writes acknowledged, {} refused", acked.len(), refused.len());

    // Nothing acknowledged lost, nothing refused come back, after a crash.
    child.kill();
    let child = util::ChildSidecar::start(&data, &env);
    for &c in &acked {
        assert!(!allowed(&child.client, c), "acknowledged opt-out of customer {c} lost");
    }
    for &c in &refused {
        assert!(allowed(&child.client, c), "refused opt-out of customer {c} became real");
    }
}
