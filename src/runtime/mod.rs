//! The distributed runtime: how jobs move between processes.
//!
//! A job is a [`message`] on the queue: "execute node N of run R". The [`worker`] consumes
//! jobs and runs the per-job protocol (`worker/job.rs`, read top to bottom); [`scheduling`]
//! says what runs next, and `reads` what work on a node reads of its run; the [`resumer`] resumes awaited nodes, publishes ready successors
//! and completes runs; the [`reconciler`] recovers stalled runs; [`webhook`] receives
//! webhook calls; [`client`] starts, reads, resumes and cancels runs. Everything here
//! reaches RabbitMQ, PostgreSQL and Redis through [`crate::services`], and reports failures
//! as the one [`Error`](error::Error).

pub mod client;
pub mod dashboard;
pub mod error;
pub mod failpoint;
pub mod message;
pub mod metrics;
pub(crate) mod reads;
pub mod reconciler;
pub mod resumer;
pub mod scheduling;
pub mod webhook;
pub mod worker;
