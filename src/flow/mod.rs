//! Flows: the operator's conversation logic (this worktree carries only the Rhai sandbox).

pub mod script;
