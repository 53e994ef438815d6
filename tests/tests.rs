//! abup's integration tests: one test binary (as in ripgrep), with the
//! modules under `tests/it/` so that cargo does not build each file as a
//! test binary of its own.
//!
//! Every test builds its own GPT disk image with the real `sgdisk`,
//! `mkfs.ext4` and `grub-editenv`, runs the built `abup` binary against it,
//! and inspects the result through loop devices and read-only mounts. The
//! tests need root and working loop devices; loop devices and mounts are
//! RAII guards, so a failing test leaks neither.

#[path = "it/backends.rs"]
mod backends;
#[path = "it/bad_input.rs"]
mod bad_input;
#[path = "it/bootfiles.rs"]
mod bootfiles;
#[path = "it/bootfiles_boot.rs"]
mod bootfiles_boot;
#[path = "it/crash.rs"]
mod crash;
#[path = "it/custom_boot.rs"]
mod custom_boot;
#[path = "it/format.rs"]
mod format;
#[path = "it/fuzz_replay.rs"]
mod fuzz_replay;
#[path = "it/grub_boot.rs"]
mod grub_boot;
#[path = "it/harness.rs"]
mod harness;
#[path = "it/hostile.rs"]
mod hostile;
#[path = "it/install.rs"]
mod install;
#[path = "it/migrate.rs"]
mod migrate;
#[path = "it/migrate_boot.rs"]
mod migrate_boot;
#[path = "it/pipeline.rs"]
mod pipeline;
#[path = "it/qemu.rs"]
mod qemu;
#[path = "it/sdboot.rs"]
mod sdboot;
#[path = "it/sdboot_boot.rs"]
mod sdboot_boot;
#[path = "it/slots.rs"]
mod slots;
#[path = "it/tar_fidelity.rs"]
mod tar_fidelity;
#[path = "it/uboot_boot.rs"]
mod uboot_boot;
#[path = "it/util.rs"]
mod util;
#[path = "it/ux.rs"]
mod ux;
