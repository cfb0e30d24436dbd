//! One integration-test binary: the real server over real HTTP.

mod conversation;
mod crash;
mod helpers;
mod process;
mod reload;
mod webhook;
