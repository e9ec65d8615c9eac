//! The distributed worker: one consumer thread, a fixed pool of worker threads, and a
//! reconciler and a heartbeat on timer threads.
//!
//! ```text
//!             deliveries (bounded by prefetch)            publish successors (confirms)
//!  RabbitMQ ──► consumer thread ──crossbeam──► worker threads ──► PostgreSQL / Redis / RabbitMQ
//!                   ▲                               │
//!                   └──── done: ack / reject ───────┘   (acks go out on the consuming channel)
//! ```
//!
//! A delivery is acked only after its effects are committed and its successor jobs are
//! confirmed by the broker. Where to read what:
//!
//! | file | what |
//! | --- | --- |
//! | [`job`] | **the per-job protocol**, top to bottom, with its crash windows |
//! | [`thread`] | a worker thread's loop ([`WorkerThread`](thread::WorkerThread)) |
//! | [`tail`] | commit → coordinate → publish → complete, batched across threads |
//! | [`consumer`] | the consumer thread's loop and the [`Settler`](consumer::Settler): ack after confirms |
//! | [`acks`] | coalesced acknowledgements |
//! | [`pause`] | `wait`, `sleep`, `webhook`, `subflow`: pausing and waking nodes |
//! | [`supervisor`] | one connection's life (a session), reconnecting with backoff |
//! | [`adapter`] | [`RabbitMqAdapter`]: starting the threads; [`WorkerHandle`]: stopping them |
//! | [`builder`] | [`RabbitMqAdapterBuilder`] and its defaults |
//! | [`shared`] | what the threads share |
//! | [`backoff`] | a worker thread's pause while a service fails |
//! | [`timers`] | the heartbeat and reconciler threads |
//!
//! When the connection is lost the session ends — unacked deliveries go back to the queue —
//! and the worker reconnects with backoff. [`WorkerHandle::shutdown`] stops consuming, lets
//! in-flight jobs finish and be acked, then closes cleanly.

mod acks;
mod adapter;
mod backoff;
mod builder;
mod consumer;
mod job;
mod pause;
mod read_ahead;
mod shared;
mod supervisor;
mod tail;
mod thread;
mod timers;

pub use adapter::{RabbitMqAdapter, WorkerHandle};
pub use builder::{
    RabbitMqAdapterBuilder, DEFAULT_EVENTS_EXCHANGE, DEFAULT_PUBLIC_URL, DEFAULT_QUEUE,
};
