//! PostgreSQL: each run's context and status rows ([`store`]), the public key-by-key context
//! API ([`context`]) and the embedded migrations ([`migrate`]).

pub mod context;
pub mod migrate;
pub mod store;
