//! One integration-test binary: the real server over real HTTP.

mod helpers;
mod webhook;
