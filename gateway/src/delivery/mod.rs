//! Delivery: turning queued deliveries into signed HTTP attempts.
//!
//! The [`worker`] claims due deliveries from the store under a lease, the
//! [`message`] module builds and signs what is sent, the [`sender`] makes the
//! HTTP request through the URL-safety resolver, and [`retry`] decides from
//! the result what happens next: success, another attempt later, or dead.

pub mod message;
pub mod retry;
pub mod sender;
pub mod worker;

pub use retry::RetryPolicy;
pub use sender::Sender;
pub use worker::{ExecutionOutcome, Worker, WorkerConfig};
