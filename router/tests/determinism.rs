//! The same map gives the same answer in every process.
//!
//! Nothing in the router may depend on per-process state (a seeded
//! `RandomState`, addresses, native endianness of a `Hash` impl). The test
//! here re-runs this very test binary as a child process and compares the
//! child's view of the reference map with the parent's.

mod common;

use std::env;
use std::fmt::Write as _;
use std::process::Command;

use common::{five_shard_map, four_shard_map, table_checksum};
use router::{bucket_of, UserId};

/// Set in the child to make [`prints_the_reference_routing_when_run_as_a_child`] print.
const CHILD_ENV: &str = "ROUTER_PRINT_MAP";
const CHILD_TEST: &str = "prints_the_reference_routing_when_run_as_a_child";
const BEGIN: &str = "--- router reference routing ---\n";
const END: &str = "--- end ---\n";

/// Checksums pinned when the router was written. A change means the routing
/// of existing users changed (e.g. a `hashring`/`siphasher`/`crc32fast`
/// upgrade that altered a hash): every stored map would still route the same,
/// but new maps built from weights would not match old ones.
const FOUR_SHARD_TABLE_CRC32: u32 = 0x7549_6366;
const FIVE_SHARD_TABLE_CRC32: u32 = 0x032c_8c41;

const USERNAMES: &[&str] = &[
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "grace",
    "heidi",
    "mallory",
    "oscar",
    "peggy",
    "trent",
    "victor",
    "walter",
    "",
    "ünïcödé",
    "user-12345",
];

/// Everything a process computes about the reference map, as text.
fn reference_routing() -> String {
    let map = four_shard_map();
    let mut out = format!("table_crc32={:08x}\n", table_checksum(&map));
    for name in USERNAMES {
        let user = UserId::for_username(name);
        writeln!(
            out,
            "{name:?} {user} bucket={} shard={}",
            bucket_of(&user),
            map.shard_of(&user)
        )
        .expect("invariant: writing to a String cannot fail");
    }
    out
}

#[test]
fn prints_the_reference_routing_when_run_as_a_child() {
    if env::var_os(CHILD_ENV).is_none() {
        return;
    }
    print!("{BEGIN}{}{END}", reference_routing());
}

#[test]
fn a_fresh_process_routes_the_reference_map_identically() {
    let exe = env::current_exe().expect("invariant: a running test binary has a path");
    let out = Command::new(exe)
        .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .expect("invariant: the test binary can re-execute itself");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 passed"),
        "child did not run exactly the printing test:\n{stdout}"
    );

    let child = stdout
        .split_once(BEGIN)
        .and_then(|(_, rest)| rest.split_once(END))
        .map(|(body, _)| body)
        .unwrap_or_else(|| panic!("child printed no reference routing:\n{stdout}"));
    assert_eq!(child, reference_routing());
}

#[test]
fn reference_maps_match_the_pinned_checksums() {
    assert_eq!(
        (
            table_checksum(&four_shard_map()),
            table_checksum(&five_shard_map())
        ),
        (FOUR_SHARD_TABLE_CRC32, FIVE_SHARD_TABLE_CRC32)
    );
}
