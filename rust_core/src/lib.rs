//! allocsvc-core: the allocation hot path in plain Rust, with no Python in sight.
//!
//! - [`beta`]: Gamma/Beta sampling, Thompson selection, the per-thread generator.
//! - [`block`]: reading one user's or one id's rows out of a stored assignment block.
//! - [`keys`]: canonical segment keys, their stable hash, hash bucketing of users.
//! - [`propensity`]: exact selection probabilities of Thompson sampling (the logged
//!   propensity).
//! - [`store`]: the concurrent posterior counter store.
//! - [`cascade`]: choosing the cascade level over the segment tree.
//! - [`decide`]: the [`decide::Engine`] that makes a whole allocation decision in one call.
//! - [`holder`]: the held assignments, with a thread that holds a batch's new ones.
//! - [`shared`]: new assignments as records for the state replicas share (Redis).
//! - [`batch`]: `AllocateBatch` from request bytes to response bytes, with [`context`]
//!   (the segment rules of context extraction) and [`wire`] (protobuf encoding).

pub mod batch;
pub mod beta;
pub mod block;
pub mod cascade;
pub mod compact;
pub mod context;
pub mod decide;
pub mod error;
pub mod filter;
pub mod held;
pub mod holder;
pub mod keyed;
pub mod keys;
pub mod propensity;
pub mod shared;
pub mod store;
pub mod unary;
pub mod wire;

pub use decide::{Decision, Engine, ExperimentConfig, Policy};
pub use error::CoreError;
pub use store::{CountRow, NodeId, Store};
