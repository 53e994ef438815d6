//! The chunk-authenticated bundle format through the CLI: spliced and
//! corrupted streams stop before the spare slot is touched, `bundle info`
//! checks the whole bundle only when given a key and shows the layout, named
//! pipes are read as streams, and manifests that are signed but make no sense
//! (several payloads, sizes near 2^64) are refused before any write.

use crate::util::*;
use serde_json::Value;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Installs `bundle` from booted A.
fn install(env: &Env, bundle: &Path) -> Run {
    env.abup(&["--booted-slot", "A", "install", s(bundle)])
}

/// Everything a refusal must leave as it was: slot A and the grubenv
/// (`snapshot`), and also every byte of the spare slot B and its state.
struct Before {
    snap: Snapshot,
    slot_b: String,
}

fn before(env: &Env) -> Before {
    Before {
        snap: env.snapshot(),
        slot_b: env.disk.sha256_of_partition("rootB"),
    }
}

#[track_caller]
fn assert_spare_untouched(env: &Env, b: &Before) {
    env.assert_untouched(&b.snap);
    assert_eq!(
        env.disk.sha256_of_partition("rootB"),
        b.slot_b,
        "the spare slot was written"
    );
    assert_eq!(env.status(Some("A"))["slots"]["B"]["state"], "empty");
}

/// A copy of `bundle` whose manifest JSON was changed by `edit` and signed
/// again with the release key (a trusted signer making a hostile manifest).
/// The hash lists, payload and end marker are kept as they were.
fn resigned(env: &Env, bundle: &Path, name: &str, edit: impl Fn(&mut Value)) -> PathBuf {
    let bytes = fs::read(bundle).unwrap();
    let h = abup::bundle::read_header(&mut &bytes[..]).unwrap();
    let mut v: Value = serde_json::from_slice(&h.manifest_bytes).unwrap();
    edit(&mut v);
    let manifest = serde_json::to_vec_pretty(&v).unwrap();
    let key = abup::bundle::load_signing_key(&env.secret).unwrap();
    let sig = abup::bundle::SignatureInfo::sign(&key, &manifest)
        .to_bytes()
        .unwrap();
    let l = &h.layout;
    let mut out = bytes[..12].to_vec();
    out.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
    out.extend_from_slice(&manifest);
    out.extend_from_slice(&(sig.len() as u32).to_le_bytes());
    out.extend_from_slice(&sig);
    out.extend_from_slice(&bytes[l.hash_lists[0].offset as usize..l.padding.offset as usize]);
    out.resize(out.len().next_multiple_of(4096), 0);
    out.extend_from_slice(&bytes[l.payloads[0].offset as usize..]);
    let path = env.path(name);
    fs::write(&path, out).unwrap();
    path
}

/// A genuine signed header followed by the payload of another bundle: the
/// attack of someone in the path of a stream, who has no key. Refused at the
/// first chunk, before the spare is marked bad or formatted, from a file and
/// from a pipe alike.
#[test]
fn spliced_stream_is_stopped_before_the_spare_is_touched() {
    let env = Env::new();
    let genuine = env.simple_bundle("1.0.0");
    let evil_tree = env.path("evil");
    simple_rootfs(&evil_tree, "6.6.6");
    // Incompressible and larger than the genuine payload, so the spliced
    // bytes fill the genuine first chunk (a shorter one is "truncated").
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..20_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    fs::write(evil_tree.join("etc/evil"), noise).unwrap();
    let other = env.bundle_opts(
        Source::Rootfs(&evil_tree),
        "6.6.6",
        "zstd",
        None,
        COMPATIBLE,
    );

    let g = fs::read(&genuine).unwrap();
    let o = fs::read(&other).unwrap();
    let gr = payload_range(&genuine);
    let or = payload_range(&other);
    let mut spliced = g[..gr.start as usize].to_vec();
    spliced.extend_from_slice(&o[or.start as usize..]);
    let path = env.path("spliced.abup");
    fs::write(&path, &spliced).unwrap();
    let b = before(&env);

    let run = env.abup_stdin(&["--booted-slot", "A", "install", "-"], spliced);
    let line = run.failed(3, &["chunk 0", "does not match its signed hash"]);
    assert!(line.starts_with("error: check: "), "{line}");
    assert_spare_untouched(&env, &b);

    // Same length as the genuine payload or not, a file fails the same way
    // (the length check may speak first when the lengths differ).
    let run = install(&env, &path);
    assert_eq!(run.code, 3, "{run}");
    assert_spare_untouched(&env, &b);

    // And the genuine bundle still installs.
    install(&env, &genuine).ok();
}

#[test]
fn bundle_info_verifies_everything_only_with_a_key() {
    let env = Env::new();
    let bundle = env.simple_bundle("1.0.0");
    let bytes = fs::read(&bundle).unwrap();

    // Without a key: the layout, and an honest "not verified".
    let info = bundle_info(&bundle);
    assert_eq!(info["verified"], false, "{info:#}");
    let l = &info["layout"];
    assert_eq!(l["length"], bytes.len() as u64);
    assert_eq!(l["manifest"]["offset"], 16);
    let m_len = l["manifest"]["length"].as_u64().unwrap() as usize;
    let manifest: Value = serde_json::from_slice(&bytes[16..16 + m_len]).unwrap();
    assert_eq!(manifest, info["manifest"]);
    let sig = &l["signature"];
    assert_eq!(sig["offset"], 20 + m_len as u64);
    assert!(sig["length"].as_u64().unwrap() > 0);
    let list = &l["hash_list"];
    let p = &l["payloads"][0];
    assert_eq!(
        p["hash_list"], *list,
        "one payload: its list is the whole list"
    );
    assert_eq!(
        list["length"].as_u64().unwrap(),
        32 * p["chunks"].as_u64().unwrap()
    );
    let range = payload_range(&bundle);
    assert_eq!(range.start % 4096, 0);
    let end = &l["end_marker"];
    assert_eq!(end["offset"], range.end);
    assert_eq!(&bytes[range.end as usize..], b"ABUPEND\0");
    let text = env.abup(&["bundle", "info", s(&bundle)]);
    text.ok();
    assert!(text.stdout.contains("(not verified"), "{text}");

    // With the key: every byte is checked.
    let run = env.abup(&[
        "--json",
        "bundle",
        "info",
        "--key",
        s(&env.public),
        s(&bundle),
    ]);
    run.ok();
    assert_eq!(run.json()["verified"], true);
    let text = env.abup(&["bundle", "info", "--key", s(&env.public), s(&bundle)]);
    text.ok();
    assert!(text.stdout.contains("(verified"), "{text}");

    let cut = env.path("cut.abup");
    // The cut was 5000 bytes; a small bundle may be shorter than
    // that, so cut inside it whatever its length.
    let at = (bytes.len() - 1).min(5000);
    fs::write(&cut, &bytes[..at]).unwrap();
    let run = env.abup(&["bundle", "info", "--key", s(&env.public), s(&cut)]);
    assert_ne!(run.code, 0, "{run}");
    assert!(run.stderr.contains("truncated"), "{run}");

    for (at, needle) in [
        (range.end - 3, "does not match its signed hash"),
        (range.end + 2, "end marker"),
        (list["offset"].as_u64().unwrap() + 1, "hash list"),
    ] {
        let mut bad = bytes.clone();
        bad[at as usize] ^= 0x40;
        let path = env.path("bad.abup");
        fs::write(&path, &bad).unwrap();
        let run = env.abup(&["bundle", "info", "--key", s(&env.public), s(&path)]);
        assert_ne!(run.code, 0, "flip at {at}: {run}");
        assert!(run.stderr.contains(needle), "flip at {at}: {run}");
    }
}

/// A bundle handed over as a named pipe is read as a stream.
#[test]
fn bundle_from_a_named_pipe() {
    let env = Env::new();
    let bundle = env.simple_bundle("1.0.0");
    let fifo = env.path("bundle.fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let feed = |fifo: PathBuf, bytes: Vec<u8>| {
        std::thread::spawn(move || {
            // Blocks until abup opens the pipe; abup may stop reading early.
            let mut f = fs::OpenOptions::new().write(true).open(fifo).unwrap();
            let _ = f.write_all(&bytes);
        })
    };
    let t = feed(fifo.clone(), fs::read(&bundle).unwrap());
    let info = env.abup(&[
        "--json",
        "bundle",
        "info",
        "--key",
        s(&env.public),
        s(&fifo),
    ]);
    t.join().unwrap();
    info.ok();
    assert_eq!(info.json()["verified"], true);

    let t = feed(fifo.clone(), fs::read(&bundle).unwrap());
    let run = install(&env, &fifo);
    t.join().unwrap();
    run.ok();
    assert_eq!(env.status(Some("A"))["slots"]["B"]["version"], "1.0.0");
}

/// Signed manifests that a careless or hostile builder could make: several
/// payloads in either order, sizes that would wrap. Refused before anything
/// is written, with exit 3.
#[test]
fn signed_but_unusable_manifests_are_refused_before_writing() {
    let env = Env::new();
    let bundle = env.simple_bundle("1.0.0");
    let b = before(&env);

    for (name, first) in [("aux-first.abup", true), ("aux-last.abup", false)] {
        let path = resigned(&env, &bundle, name, |v| {
            let mut aux = v["payloads"][0].clone();
            aux["name"] = "aux".into();
            let list = v["payloads"].as_array_mut().unwrap();
            if first {
                list.insert(0, aux);
            } else {
                list.push(aux);
            }
        });
        install(&env, &path).failed(3, &["2 payloads", "exactly one"]);
        assert_spare_untouched(&env, &b);
        let run = env.abup(&["bundle", "info", s(&path)]);
        assert_ne!(run.code, 0, "{run}");
    }

    let huge = resigned(&env, &bundle, "huge.abup", |v| {
        v["payloads"][0]["installed_size"] = u64::MAX.into();
    });
    install(&env, &huge).failed(3, &["more than 2^64", "slot B"]);
    assert_spare_untouched(&env, &b);

    let wrapping = resigned(&env, &bundle, "wrap.abup", |v| {
        v["payloads"][0]["stored_size"] = (u64::MAX - 100).into();
        v["payloads"][0]["compression"] = "zstd".into();
        v["payloads"][0]["chunk_size"] = (16u64 << 20).into();
    });
    install(&env, &wrapping).failed(3, &["hash lists take more than"]);
    assert_spare_untouched(&env, &b);
}

/// Bundles of container version 1 (payloads verified only at their end) are
/// refused with a message saying to rebuild them.
#[test]
fn version_1_bundles_are_refused_clearly() {
    let env = Env::new();
    let bundle = env.simple_bundle("1.0.0");
    let mut bytes = fs::read(&bundle).unwrap();
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    let old = env.path("old.abup");
    fs::write(&old, bytes).unwrap();
    let b = before(&env);
    install(&env, &old).failed(
        3,
        &["container version 1 is no longer supported", "rebuild"],
    );
    assert_spare_untouched(&env, &b);
}
