//! The service adapters: the only code that talks to a service. [`rabbitmq`] (connections
//! with TCP_NODELAY, queues, publisher confirms), [`postgres`] (each run's context and
//! status rows, migrations), [`redis`] (joins, locks and the run's job ledger), and
//! [`group`], which lets concurrent callers of one statement or pipeline share a round
//! trip; [`http`] serves HTTP (the webhook receiver) to hostile clients, and [`url`] masks
//! and decodes URLs. Each adapter has its own error type; the runtime's
//! [`Error`](crate::Error) wraps them.

pub mod group;
pub mod http;
pub mod postgres;
pub mod rabbitmq;
pub mod redis;
pub mod url;
