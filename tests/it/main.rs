//! One integration-test binary: the real server over real HTTP, and the
//! author tools (chat, test, graph) over the real pipeline and binary.

mod author;
mod compliance;
mod conversation;
mod crash;
mod health;
mod helpers;
mod hygiene;
mod process;
mod reload;
mod scripts;
mod store;
mod webhook;
