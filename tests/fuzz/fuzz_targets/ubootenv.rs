#![no_main]
//! libFuzzer entry point; the body is [`targets::ubootenv`], shared with the
//! corpus replay test in `tests/it/fuzz_replay.rs`.

#[path = "../targets.rs"]
#[allow(dead_code)]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::ubootenv(data));
