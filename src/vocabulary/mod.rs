//! Words every layer shares, and nothing else: the names of the keys a run's context holds
//! ([`keys`]), the state of a run ([`RunStatus`]) and the limits on what enters the system
//! ([`limits`]). No I/O, no dependency on the rest of the crate: the engine, the service
//! adapters and the distributed runtime all read them from here, so the two runners and the
//! stored rows agree on one spelling.

pub mod keys;
pub mod limits;
mod status;

pub use status::RunStatus;
