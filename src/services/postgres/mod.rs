//! PostgreSQL: each run's context and status rows ([`store`]), its history and the list of
//! runs ([`history`]), the public key-by-key context API ([`context`]) and the embedded
//! migrations ([`migrate`]).

pub mod context;
pub mod history;
pub mod migrate;
pub mod store;
