//! abup: an A/B partition OS updater for embedded and edge Linux devices.
//!
//! The design in a few lines:
//! - [`config`] turns the system config file into a validated [`config::SystemConfig`].
//! - [`disk`] reads the GPT and resolves slots A and B to block devices.
//! - [`bundle`] is the signed, streamable bundle format (manifest first).
//! - [`install`] is the update transaction as a short list of named steps:
//!   checks → plan → mark spare bad → format + stream + verify → preserve
//!   files → record → flip (the only flip, and the last write).
//! - [`boot`] holds the one [`boot::BootBackend`] trait and its implementations,
//!   chosen once from the config.
//! - [`state`] records what each slot holds, so `status` tells the truth.
//! - [`report`] is the run report: every step ends unchanged, changed or failed.
//! - [`mount`], [`lock`], [`signal`] and [`runlog`] make a run safe to kill:
//!   a private mount namespace and self-detaching loop devices, one run per
//!   disk, signals that stop at safe points, and a record of how it ended.

pub mod boot;
pub mod bootfiles;
pub mod bootpart;
pub mod bundle;
pub mod cli;
pub mod commands;
pub mod config;
pub mod control;
pub mod disk;
pub mod events;
pub mod failpoint;
pub mod history;
pub mod install;
pub mod leftovers;
pub mod lock;
pub mod migrate;
pub mod mount;
pub mod queue;
pub mod report;
pub mod runlog;
pub mod seal;
pub mod signal;
pub mod slot;
pub mod state;
pub mod system;
pub mod util;
pub mod write;
