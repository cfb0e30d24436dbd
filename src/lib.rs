pub mod config;
pub mod metrics;
pub mod store;
pub mod telemetry;
pub mod twilio;
