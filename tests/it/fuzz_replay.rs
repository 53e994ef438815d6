//! Replays the committed fuzz corpus (`tests/fuzz/corpus/<target>/`)
//! through the fuzz targets' bodies, as a normal test: the targets keep
//! compiling against the library, and inputs that once crashed a parser
//! (kept in the corpus) stay fixed. Fuzzing itself is `cargo fuzz run`; see
//! "Fuzzing" in the README.

#[path = "../fuzz/targets.rs"]
mod targets;

use std::fs;
use std::path::Path;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target);
    let mut n = 0;
    for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = e.unwrap().path();
        let data = fs::read(&path).unwrap();
        let run = std::panic::catch_unwind(|| body(&data));
        assert!(
            run.is_ok(),
            "fuzz target {target} panicked on {}",
            path.display()
        );
        n += 1;
    }
    assert!(n >= 3, "the {target} corpus has only {n} inputs");
}

#[test]
fn fuzz_corpus_replays_without_a_crash() {
    replay("bundle", targets::bundle);
    replay("manifest", targets::manifest);
    replay("tar", targets::tar);
    replay("config", targets::config);
    replay("grubenv", targets::grubenv);
    replay("ubootenv", targets::ubootenv);
}
