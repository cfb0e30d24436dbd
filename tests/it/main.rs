//! One integration-test binary: the real server over real HTTP.

mod conversation;
mod helpers;
mod process;
mod reload;
mod webhook;
