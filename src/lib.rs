pub mod config;
pub mod flow;
pub mod metrics;
pub mod store;
pub mod telemetry;
pub mod twilio;
