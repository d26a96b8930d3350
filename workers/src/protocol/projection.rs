//! The read-model projection script: how one event changes the read model of
//! its promotion. Lives here, beside the command-side scripts, because this
//! module is the one place that defines Lua scripts; `read_model` calls it.

use std::sync::LazyLock;

use redis::Script;

/// Source of `project` (one event into one promotion's read-model hash).
pub const PROJECT_SOURCE: &str = include_str!("lua/project.lua");

/// `project`: `KEYS[1]` the promotion's read-model hash; see the script header
/// for ARGV. Answers the phase after the event (`Active` or `Finished`).
pub static PROJECT: LazyLock<Script> = LazyLock::new(|| Script::new(PROJECT_SOURCE));
