//! The bodies of abup's fuzz targets, one function per parser that reads
//! untrusted bytes. Each must return for every input: an `Err` is fine, a
//! panic, a hang or an unbounded allocation is a bug. Where a parser has a
//! writer, the target also checks that what it writes reads back the same.
//!
//! Shared by the libFuzzer binaries in `fuzz_targets/` (run with
//! cargo-fuzz) and by the corpus replay test (`tests/it/fuzz_replay.rs`),
//! which runs every committed corpus file through them in the normal test
//! run, so the targets keep compiling and past crashes stay fixed.

use abup::boot::grub::GrubEnv;
use abup::boot::ubootenv;
use abup::bundle::manifest::Manifest;
use abup::bundle::reader::{check_payloads, read_header};
use abup::config::SystemConfig;
use abup::write::pax::{parse_acl_text, parse_records, TarReader};
use std::path::Path;

/// Largest total payload size a bundle input may declare before the target
/// skips decompressing it: a few hundred fuzz bytes can inflate to
/// gigabytes, which tests the machine's patience, not the parser.
const MAX_DECLARED: u64 = 64 << 20;

/// A bundle as read from a pipe: header (magic, version, manifest,
/// signature block), then every payload (decompressed, hashed, sizes
/// checked) and the end marker.
pub fn bundle(data: &[u8]) {
    let mut r = data;
    let Ok(header) = read_header(&mut r) else {
        return;
    };
    let declared = header
        .manifest
        .payloads
        .iter()
        .try_fold(0u64, |sum, p| sum.checked_add(p.size.max(p.stored_size)));
    if declared.is_some_and(|d| d <= MAX_DECLARED) {
        let _ = check_payloads(&mut r, &header);
    }
}

/// The manifest JSON; a manifest that parses must serialise and parse back
/// to itself.
pub fn manifest(data: &[u8]) {
    let Ok(m) = Manifest::parse(data) else {
        return;
    };
    let bytes = m
        .to_bytes()
        .expect("a parsed manifest serialises (it was validated)");
    let again = Manifest::parse(&bytes).expect("a serialised manifest parses");
    assert_eq!(again, m, "manifest round trip changed it");
}

/// The tar reader: every member and its data, then the PAX record and ACL
/// text parsers on the raw bytes.
pub fn tar(data: &[u8]) {
    let mut t = TarReader::new(data);
    // A member per 512-byte block at most: a bound that cannot loop.
    for _ in 0..=data.len() / 512 {
        match t.next_member() {
            Ok(Some(_)) => loop {
                match t.data(1 << 16) {
                    Ok([]) | Err(_) => break,
                    Ok(_) => {}
                }
            },
            Ok(None) | Err(_) => break,
        }
    }
    let _ = parse_records(data);
    let _ = parse_acl_text(data);
}

/// The system config (TOML), as `SystemConfig::load` reads it.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = SystemConfig::parse(text, Path::new("fuzz.toml"));
    }
}

/// The GRUB environment block; a block that parses must write out and
/// parse back to the same variables.
pub fn grubenv(data: &[u8]) {
    let path = Path::new("fuzz/grubenv");
    let Ok(env) = GrubEnv::parse(data, path) else {
        return;
    };
    let Ok(bytes) = env.to_bytes() else {
        return;
    };
    let again = GrubEnv::parse(&bytes, path).expect("a written grubenv parses");
    let vars = |e: &GrubEnv| -> Vec<(Vec<u8>, Vec<u8>)> {
        e.vars().map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
    };
    assert_eq!(vars(&again), vars(&env), "grubenv round trip changed it");
}

/// A U-Boot environment block (`header` = 4, or 5 with the redundant
/// copy's flag byte), with the CRC fixed up so that the variable list is
/// reached; a block that decodes must encode and decode back to the same
/// variables. Then the bytes as an `fw_env.config`.
pub fn ubootenv(data: &[u8]) {
    for header in [4, 5] {
        if data.len() <= header {
            continue;
        }
        let mut block = data.to_vec();
        let crc = crc32fast::hash(&block[header..]).to_le_bytes();
        block[..4].copy_from_slice(&crc);
        let Ok(vars) = ubootenv::decode(&block, header) else {
            continue;
        };
        let flags = (header == 5).then_some(block[4]);
        let Ok(again) = ubootenv::encode(&vars, block.len(), flags) else {
            continue;
        };
        let back = ubootenv::decode(&again, header).expect("an encoded block decodes");
        assert_eq!(back, vars, "U-Boot env round trip changed it");
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ubootenv::parse_fw_env_config(text, Path::new("fuzz/fw_env.config"));
    }
}
